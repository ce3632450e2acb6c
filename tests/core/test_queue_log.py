"""The queue log (tampu.queue_log) and the filesystem store's durable path at its failure
points: group commit, torn records, a crash in the same boot (the page cache survived) and a
power loss (an earlier boot), items only in the log written back, lazy deliveries and
``.done`` items, a log write that fails."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tampu import files
from tampu.files import HAVE_SYNCFS, BatchThread, boot_id, process_start
from tampu.item import QueueItem, Recipient
from tampu.log_format import SPARE_PREFIX, SUFFIX, SegmentName, read_roots, read_segment, record
from tampu.queue_log import SPARE_MIN, SPARE_STEP, QueueLog
from tampu.store_files import INLINE_BYTES, FilesystemStore

pytestmark = pytest.mark.skipif(not HAVE_SYNCFS, reason="the queue log needs syncfs (Linux)")
BOOT = boot_id()[:16]


def _item(store: FilesystemStore, rcpt: str = "b@example.test") -> QueueItem:
    return QueueItem(id=store.new_id(), mail_from="a@example.org",
                     recipients=[Recipient(rcpt, rcpt)])


def _segments(store: FilesystemStore) -> list[Path]:
    return sorted((store.dir / "log").glob(f"*{SUFFIX}"))


def _dead_copy(segment: Path, boot: str) -> Path:
    """The segment as a process that is gone left it (``boot``: the one it ran in)."""
    dead = segment.with_name(f"{boot}-4194303-1-1{SUFFIX}")  # no such PID
    assert process_start(4194303) is None
    shutil.copy(segment, dead)
    return dead


# ------------------------------------------------------------------------- the format


def test_group_commit_one_fdatasync_for_a_batch(tmp_path):
    store = FilesystemStore(tmp_path / "q", 1000)
    items = [_item(store) for _ in range(40)]

    async def put_all() -> None:
        await asyncio.gather(*(store.put(i, f"Subject: {n}\r\n\r\nbody\r\n".encode())
                               for n, i in enumerate(items)))

    asyncio.run(put_all())
    assert store._log is not None and store._io is not None
    assert store._io.batches == 1 and store._log.syncs == 2  # the segment's name, one batch
    (segment,) = _segments(store)
    contents = read_segment(segment)
    assert not contents.torn and sorted(contents.puts) == sorted(i.id for i in items)
    assert not list(store.dir.glob("*.item"))  # no file yet: the log holds them
    assert sorted(store.ids_now()) == sorted(i.id for i in items)
    asyncio.run(store.close())  # retires the segment: the items get their files first
    assert _segments(store) == []
    assert sorted(store.ids_now()) == sorted(i.id for i in items)
    for item in items:  # the record is the item file, byte for byte
        assert contents.puts[item.id] == store.item_path(item.id).read_bytes()


def test_a_torn_or_damaged_record_ends_the_segment(tmp_path):
    path = tmp_path / f"{BOOT}-1-1-1{SUFFIX}"
    head = b"tampu queue log 1\n{}\n"
    recs = [b"".join(record(b"P", f"id{n}", [b"payload %d" % n])) for n in range(3)]
    path.write_bytes(head + b"".join(recs))
    assert sorted(read_segment(path).puts) == ["id0", "id1", "id2"]
    path.write_bytes(head + b"".join(recs)[:-3])  # the last write did not make it whole
    got = read_segment(path)
    assert sorted(got.puts) == ["id0", "id1"] and got.torn
    damaged = bytearray(head + b"".join(recs))
    damaged[len(head) + len(recs[0]) + 14] ^= 0xFF  # a byte of the second record's ID
    got = read_segment(path) if path.write_bytes(bytes(damaged)) else None
    assert got is not None and sorted(got.puts) == ["id0"] and got.torn
    assert SegmentName.parse(path.name) == SegmentName(BOOT, 1, 1, 1)
    assert SegmentName.parse("roots") is None


def test_batch_thread_runs_jobs_in_order_and_reports_errors():
    seen: list[int] = []
    after: list[int] = []
    thread = BatchThread("test-batch", after=lambda batch: after.append(len(batch)))

    def job(n: int) -> int:
        if n == 3:
            raise ValueError("three")
        seen.append(n)
        return n * 10

    async def run() -> list[object]:
        futures = [thread.submit(job, n) for n in range(6)]
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(run())
    assert results[:3] == [0, 10, 20] and isinstance(results[3], ValueError)
    assert results[4:] == [40, 50] and seen == [0, 1, 2, 4, 5] and after == [6]
    thread.close()


def test_inline_batches_run_on_the_loop_unless_a_job_is_heavy_or_the_disk_is_slow(
        monkeypatch):
    """BatchThread(inline=True): a batch runs on the event loop; one with a job submitted
    ``inline=False`` goes to the thread; when the step after a batch (the fdatasync) was slow
    SLOW_BATCHES times of the last 8, the next batches go to the thread (INLINE_RETRY s)."""
    monkeypatch.setattr(files, "INLINE_MAX", 0.005)
    after: list[int] = []
    disk = {"pause": 0.0}

    def sync(batch: list[object]) -> None:
        after.append(len(batch))
        time.sleep(disk["pause"])

    thread = BatchThread("test-inline", after=sync, inline=True)

    def where(pause: float = 0.0) -> int:
        time.sleep(pause)
        return threading.get_ident()

    async def run() -> list[list[int]]:
        loop_thread = threading.get_ident()
        light = await asyncio.gather(*(thread.submit(where) for _ in range(3)))
        heavy = await asyncio.gather(thread.submit(where), thread.submit(where, inline=False))
        busy = [await thread.submit(where, 0.01) for _ in range(files.SLOW_BATCHES)]
        disk["pause"] = 0.01
        slow = [await thread.submit(where) for _ in range(files.SLOW_BATCHES)]
        disk["pause"] = 0.0
        later = [await thread.submit(where)]
        return [[t == loop_thread for t in ts] for ts in (light, heavy, busy, slow, later)]

    light, heavy, busy, slow, later = asyncio.run(run())
    thread.close()
    assert light == [True] * 3 and heavy == [False, False]
    n = files.SLOW_BATCHES
    assert busy == [True] * n  # slow jobs: CPU the loop would wait for in a thread too
    assert slow == [True] * n and later == [False]
    assert after == [3, 2] + [1] * (2 * n + 1) and thread.inline_batches == 1 + 2 * n


def test_inline_batch_never_runs_beside_one_in_the_thread():
    """While the thread runs a batch, a new batch is not run on the loop at once: it waits
    for the thread (the log is written by one batch at a time)."""
    release = threading.Event()
    running: list[str] = []

    def job(name: str) -> str:
        running.append(f"start {name}")
        if name == "heavy":
            release.wait(5)
        running.append(f"end {name}")
        return name

    thread = BatchThread("test-exclusive", inline=True)

    async def run() -> list[str]:
        heavy = thread.submit(job, "heavy", inline=False)
        await asyncio.sleep(0.05)  # the thread has started it
        light = thread.submit(job, "light")
        await asyncio.sleep(0.05)
        assert running == ["start heavy"]  # the light batch did not run on the loop
        release.set()
        return list(await asyncio.gather(heavy, light))

    assert asyncio.run(run()) == ["heavy", "light"]
    thread.close()
    assert running == ["start heavy", "end heavy", "start light", "end light"]
    assert thread.inline_batches == 0


def test_store_writes_small_items_on_the_loop_and_big_ones_in_the_thread(tmp_path):
    store = FilesystemStore(tmp_path / "q", 100)
    small, big = _item(store), _item(store)
    asyncio.run(store.put(small, b"Subject: s\r\n\r\nbody\r\n"))
    assert store._io is not None and store._io.inline_batches == 1
    body = b"Subject: b\r\n\r\n" + b"x" * 998 + b"\r\n"
    asyncio.run(store.put(big, body * (INLINE_BYTES // 1000 + 1)))
    assert store._io.inline_batches == 1 and store._io.batches == 2
    assert store.load_now(big.id).size > INLINE_BYTES and store.load_now(small.id).size < 100
    asyncio.run(store.close())


# ------------------------------------------------------------------------- crashes


def test_same_boot_crash_writes_back_what_only_the_log_held(tmp_path):
    """A process killed in this boot: the items that were only in its log get their files
    back; those that left (D, or L after lazy deliveries: the page cache kept them) do not,
    nor one whose file was written (F) and then removed by another process (delivered)."""
    store = FilesystemStore(tmp_path / "q", 100)
    maildir = tmp_path / "mail"
    maildir.mkdir()
    kept, finished, lazily, handed = (_item(store) for _ in range(4))
    for item in (kept, finished, lazily, handed):
        asyncio.run(store.put(item, b"Subject: x\r\n\r\nbody\r\n"))
    queued = store.item_bytes_now(kept.id)
    asyncio.run(store.remove(finished))  # delivered durably: D
    assert store.defer_sync(lazily.id, maildir)
    asyncio.run(store.remove(lazily))  # delivered without fsync: L
    asyncio.run(store.save_state(handed))  # its file and an F record
    assert store.item_path(handed.id).exists() and not store.item_path(kept.id).exists()
    (segment,) = _segments(store)
    contents = read_segment(segment)
    assert (contents.done, contents.left, contents.filed) == (
        {finished.id}, {lazily.id}, {handed.id})
    dead = _dead_copy(segment, BOOT)
    asyncio.run(store.close())
    for item in (kept, handed):  # as the crash left them: `handed` delivered elsewhere
        store.item_path(item.id).unlink()
        store.state_path(item.id).unlink(missing_ok=True)
    again = FilesystemStore(tmp_path / "q", 100)
    assert asyncio.run(again.recover()) == [kept.id]
    assert again.item_path(kept.id).read_bytes() == queued
    assert not dead.exists() and _segments(again) == []
    asyncio.run(again.close())


def test_a_dead_workers_items_only_in_its_log_are_taken_over(tmp_path):
    """The main process lists the items of a process that died (``ids``): those only in
    its log are written back first, once (one delivered since is not written back again)."""
    store = FilesystemStore(tmp_path / "q", 100)
    first, second = _item(store), _item(store)
    for item in (first, second):
        asyncio.run(store.put(item, b"Subject: x\r\n\r\nbody\r\n"))
    (segment,) = _segments(store)
    dead = _dead_copy(segment, BOOT)
    asyncio.run(store.close())
    for item in (first, second):
        store.item_path(item.id).unlink()  # as the worker's crash left them: only logged
    main = FilesystemStore(tmp_path / "q", 100)
    main.prepare()
    main._thread()
    main._adopt = True  # as after recover()

    async def take_over() -> list[str]:
        ids = await main.ids()
        await main.remove(await main.load(first.id))  # delivered by the main process
        return ids + await main.ids()

    assert asyncio.run(take_over()) == sorted([first.id, second.id]) + [second.id]
    main.checkpoint()  # retires the dead segment
    assert not dead.exists() and main.ids_now() == [second.id]
    asyncio.run(main.close())


def test_power_loss_replays_the_log(tmp_path):
    """An earlier boot: item files written without fsync may be missing or cut short; every
    item logged and not reported done is written back whole (and delivered again)."""
    store = FilesystemStore(tmp_path / "q", 100)
    lost, cut, whole, done = (_item(store) for _ in range(4))
    body = b"Subject: x\r\n\r\n" + b"y" * 3000 + b"\r\n"
    for item in (lost, cut, whole, done):
        asyncio.run(store.put(item, body))
    asyncio.run(store.remove(done))  # delivered durably: a D record
    originals = {i.id: store.item_bytes_now(i.id) for i in (lost, cut, whole)}
    (segment,) = _segments(store)
    dead = _dead_copy(segment, "f" * 16)  # what this process wrote, as an earlier boot's
    asyncio.run(store.close())
    assert sorted(read_segment(dead).puts) == sorted(i.id for i in (lost, cut, whole, done))
    assert read_segment(dead).done == {done.id}
    log = QueueLog(tmp_path / "q" / "log")
    assert log.dead_segments() == [dead]
    store.item_path(lost.id).unlink()
    with open(store.item_path(cut.id), "r+b") as fh:
        fh.truncate(100)
    store.item_path(done.id).write_bytes(b"{}\n")  # its unlink did not reach the disk
    again = FilesystemStore(tmp_path / "q", 100)
    ids = asyncio.run(again.recover())
    assert sorted(ids) == sorted([lost.id, cut.id, whole.id])
    for qid, data in originals.items():
        assert again.item_path(qid).read_bytes() == data
        assert again.load_now(qid).size == len(body)
    assert not again.item_path(done.id).exists()
    assert not dead.exists()
    asyncio.run(again.close())


def test_lazy_delivery_of_an_old_item_waits_for_a_checkpoint(tmp_path, monkeypatch):
    """A delivery written without fsync (defer_sync) for an item whose log record was
    already retired: the item waits as .done until the next checkpoint's sync."""
    monkeypatch.setattr(FilesystemStore, "_checkpoints", lambda self: None)  # by hand here
    store = FilesystemStore(tmp_path / "q", 100)
    maildir = tmp_path / "mail"
    maildir.mkdir()
    fresh, old = _item(store), _item(store)
    asyncio.run(store.put(fresh, b"x\r\n"))
    asyncio.run(store.put(old, b"x\r\n"))
    assert store._log is not None
    assert store.defer_sync(fresh.id, maildir)
    asyncio.run(store.remove(fresh))  # its record is still to be retired: it goes at once
    assert not any(store.dir.glob(f"{fresh.id}*"))
    store._log.seal()
    store.checkpoint()  # the segment is retired: `old` is durable by itself now
    assert _segments(store) == []
    assert store.defer_sync(old.id, maildir)
    asyncio.run(store.remove(old))
    assert [p.name for p in store.dir.glob(f"{old.id}*")] == [f"{old.id}.done.{BOOT}"]
    assert store.ids_now() == []
    store.checkpoint()
    assert not any(store.dir.glob(f"{old.id}*"))
    asyncio.run(store.close())


def test_done_items_after_a_crash(tmp_path):
    """``.done`` items left by a crash: of this boot, removed (the deliveries are in the
    page cache); of an earlier boot, delivered again (they may be lost), state and all."""
    store = FilesystemStore(tmp_path / "q", 100)
    this, earlier = _item(store), _item(store)
    for item in (this, earlier):
        item.recipients.append(Recipient("c@example.test", "c@example.test"))
        asyncio.run(store.put(item, b"x\r\n"))
        item.recipients[1].status = item.recipients[1].status.SENT
        asyncio.run(store.save_state(item))
    asyncio.run(store.close())
    store.item_path(this.id).rename(store.done_path(this.id, BOOT))
    store.item_path(earlier.id).rename(store.done_path(earlier.id, "e" * 16))
    again = FilesystemStore(tmp_path / "q", 100)
    assert asyncio.run(again.recover()) == [earlier.id]
    assert not any(again.dir.glob(f"{this.id}*"))
    assert [r.status.value for r in again.load_now(earlier.id).recipients] == [
        "pending", "sent"]
    asyncio.run(again.close())


def test_a_state_that_says_delivered_follows_a_sync_of_lazy_deliveries(tmp_path):
    store = FilesystemStore(tmp_path / "q", 100)
    item = _item(store)
    asyncio.run(store.put(item, b"x\r\n"))
    assert store._log is not None
    assert store.defer_sync(item.id, tmp_path)
    before = store._log.syncs
    asyncio.run(store.save_state(item))
    assert store._log.syncs == before + 1  # syncfs before the state is written
    asyncio.run(store.save_state(item))
    assert store._log.syncs == before + 1  # nothing lazy any more
    asyncio.run(store.close())


def test_a_failed_log_write_fails_the_put_and_the_next_one_works(tmp_path):
    """The file size limit makes the log's write fail (EFBIG, as a full disk's ENOSPC):
    that message is refused and leaves no file; the store goes on in a new segment."""
    script = textwrap.dedent(f"""
        import asyncio, json, resource, signal
        from pathlib import Path
        from tampu.item import QueueItem, Recipient
        from tampu.store_files import INLINE_BYTES, FilesystemStore
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = FilesystemStore(Path({str(tmp_path / "q")!r}), 10)
        store.prepare()
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
        out = []
        for size in (3000, 3000, 500):  # the second one does not fit in the segment
            item = QueueItem(id=store.new_id(), mail_from="a@x.test",
                             recipients=[Recipient("b@x.test", "b@x.test")])
            try:
                asyncio.run(store.put(item, b"x" * size))
                out.append([item.id, "ok"])
            except OSError as exc:
                out.append([item.id, exc.errno])
        asyncio.run(store.close())
        print(json.dumps(out))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r[1] for r in results] == ["ok", 27, "ok"], done.stderr  # 27: EFBIG
    queue = tmp_path / "q"
    assert sorted(p.name for p in queue.glob("*.item")) == sorted(
        f"{results[i][0]}.item" for i in (0, 2))
    assert not list(queue.glob(".tmp-*")) and not list((queue / "log").iterdir())


def test_segments_of_live_processes_are_left_alone(tmp_path):
    store = FilesystemStore(tmp_path / "q", 100)
    asyncio.run(store.put(_item(store), b"x\r\n"))
    (mine,) = _segments(store)
    other = FilesystemStore(tmp_path / "q", 100)
    asyncio.run(other.recover())
    assert mine.exists(), "the segment of a live process (this one) was retired"
    assert other._log is not None and other._log.dead_segments() == []
    header = mine.read_bytes().split(b"\n")[1]
    assert json.loads(header)["owner"] == other._log.owner
    asyncio.run(store.close())
    asyncio.run(other.close())


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second filesystem")
def test_lazy_deliveries_on_another_filesystem_are_listed_once(tmp_path):
    """A Maildir on another filesystem than the queue goes into the roots file (durably,
    once), so that recovery after a power loss syncs it; one on the queue's filesystem does
    not (every checkpoint syncs that one); asking again costs no write."""
    (tmp_path / "log").mkdir()
    log = QueueLog(tmp_path / "log")
    same = tmp_path / "mail" / "u"
    same.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if Path(other).stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same filesystem here")
        log.add_root(same)
        assert read_roots(log.dir) == []
        log.add_root(Path(other))
        assert read_roots(log.dir) == [other]
        syncs = log.syncs
        for _ in range(3):
            log.add_root(Path(other))
            log.add_root(same)
        assert log.syncs == syncs and read_roots(log.dir) == [other]
        assert str(Path(other)) in log.roots.values()


def test_a_busy_segment_gets_its_successor_written_with_zeros_beforehand(tmp_path):
    """After a segment that held SPARE_MIN bytes or more, the next one is a spare: written
    full of zeros and synced before it is needed (fdatasyncs then write data only). Its
    records are read back up to the zeros, which are no damage; a quiet log makes none."""
    (tmp_path / "log").mkdir()
    log = QueueLog(tmp_path / "log")

    async def run() -> None:
        async def put(prefix: str, n: int, size: int) -> None:
            for i in range(n):
                log.add_put(f"{prefix}{i}", [b"x" * size])
                await log.durable(f"{prefix}{i}", log.commit())

        await put("q", 3, 100)  # a quiet segment: no spare after it
        log.seal()
        log.prepare_spare()
        assert not list(log.dir.glob(f"{SPARE_PREFIX}*"))
        await put("a", (SPARE_MIN // 4096) + 2, 4096)
        log.seal()
        log.prepare_spare()
        spares = list(log.dir.glob(f"{SPARE_PREFIX}*"))
        assert len(spares) == 1 and spares[0].stat().st_size == SPARE_STEP
        await put("b", 3, 100)
        await log.group.drain()
        log.group.close()

    asyncio.run(run())
    assert not list(log.dir.glob(f"{SPARE_PREFIX}*"))  # renamed into place
    newest = max(_log_segments(log.dir), key=lambda p: SegmentName.parse(p.name).seq)
    assert newest.stat().st_size == SPARE_STEP  # the records overwrote zeros
    contents = read_segment(newest)
    assert set(contents.puts) == {"b0", "b1", "b2"} and not contents.torn
    assert contents.puts["b2"] == b"x" * 100


def test_spares_of_dead_processes_are_removed(tmp_path):
    (tmp_path / "log").mkdir()
    log = QueueLog(tmp_path / "log")
    dead = log.dir / f"{SPARE_PREFIX}{BOOT}-999999999-1-1"
    mine = log.dir / f"{SPARE_PREFIX}{log.owner}-1"
    dead.write_bytes(b"\0" * 10)
    mine.write_bytes(b"\0" * 10)
    assert log.checkpoint(adopt=True)
    assert not dead.exists() and mine.exists()


def _log_segments(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if SegmentName.parse(p.name) is not None]


def test_a_busy_current_segment_has_its_successor_prepared(tmp_path):
    """Under sustained load the second segment is already a spare: the spare is prepared
    while the first one is still taking records."""
    (tmp_path / "log").mkdir()
    log = QueueLog(tmp_path / "log")

    async def run() -> None:
        for i in range(SPARE_MIN // 4096 + 2):
            log.add_put(f"a{i}", [b"x" * 4096])
            await log.durable(f"a{i}", log.commit())
        log.prepare_spare()  # the current segment is not sealed
        assert len(list(log.dir.glob(f"{SPARE_PREFIX}*"))) == 1
        log.seal()
        log.add_put("b", [b"y"])
        await log.durable("b", log.commit())
        assert not list(log.dir.glob(f"{SPARE_PREFIX}*"))  # the new segment is the spare
        await log.group.drain()
        log.group.close()

    asyncio.run(run())
    newest = max(_log_segments(log.dir), key=lambda p: SegmentName.parse(p.name).seq)
    assert newest.stat().st_size == SPARE_STEP and set(read_segment(newest).puts) == {"b"}
