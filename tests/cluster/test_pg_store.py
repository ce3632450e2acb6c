"""queue_postgres against a real PostgreSQL: schema migrations, the queue store (put, state,
claims and leases, operator actions), the state store, the DSN secret, import-queue."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tampu.backends import SharedQueueStore
from tampu.config import load_config
from tampu.errors import ConfigError, QueueError
from tampu.item import QueueItem, Recipient, RecipientStatus
from tampu.stores import Stores, make_stores
from tampu.testing import make_config_dir
from tests.helpers import run_tampu

PG_CONF = """\
[server]
queue_store = "postgres"
node = "{node}"
[plugins.queue_postgres]
enabled = true
dsn = "$env:TAMPU_PG_DSN"
lease_seconds = {lease}
poll_interval = 0.2
"""


def config_for(root: Path, node: str = "n1", lease: float = 2.0, extra: str = "") -> Any:
    make_config_dir(root, conf={"50-pg.toml": PG_CONF.format(node=node, lease=lease) + extra})
    return load_config(root)


@pytest.fixture
def dsn_env(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TAMPU_PG_DSN", pg_dsn)
    return pg_dsn


def migrate(root: Path, dsn: str) -> str:
    done = run_tampu("db", "migrate", "--config-dir", str(root), env={"TAMPU_PG_DSN": dsn})
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def item(qid: str, *rcpts: str) -> QueueItem:
    return QueueItem(id=qid, mail_from="a@example.org",
                     recipients=[Recipient(r, r) for r in rcpts or ("u@example.test",)])


async def opened(config: Any) -> Stores:
    stores = make_stores(config)
    await stores.open()
    return stores


def test_migrate_status_and_a_node_refuses_an_unmigrated_database(tmp_path, dsn_env):
    config = config_for(tmp_path / "c")

    async def start() -> None:
        await opened(config)

    with pytest.raises(Exception, match="schema version 0.*tampu db migrate"):
        asyncio.run(start())
    out = migrate(tmp_path / "c", dsn_env)
    assert "applied migration 1" in out
    password = dsn_env.split(":")[2].split("@")[0]
    assert password not in out
    again = migrate(tmp_path / "c", dsn_env)
    assert "already" in again and "applied migration" not in again
    status = run_tampu("db", "status", "--config-dir", str(tmp_path / "c"),
                       env={"TAMPU_PG_DSN": dsn_env})
    assert status.returncode == 0, status.stderr
    assert "schema version 1" in status.stdout and "0 item(s)" in status.stdout
    assert password not in status.stdout + status.stderr


def test_dsn_from_env_is_required_and_never_shown(tmp_path, monkeypatch):
    monkeypatch.delenv("TAMPU_PG_DSN", raising=False)
    config = config_for(tmp_path / "c")
    with pytest.raises(ConfigError, match="TAMPU_PG_DSN is not set"):
        make_stores(config)
    monkeypatch.setenv("TAMPU_PG_DSN", "postgresql://u:hunter2@127.0.0.1:1/db")
    shown = run_tampu("config", "show", "--config-dir", str(tmp_path / "c"),
                      env={"TAMPU_PG_DSN": "postgresql://u:hunter2@127.0.0.1:1/db"})
    assert shown.returncode == 0, shown.stderr
    assert "hunter2" not in shown.stdout and "(secret)" in shown.stdout
    check = run_tampu("check", "--config-dir", str(tmp_path / "c"),
                      env={"TAMPU_PG_DSN": "postgresql://u:hunter2@127.0.0.1:1/db"})
    assert check.returncode == 0, check.stderr  # check validates; it does not connect

    async def start() -> None:
        await opened(load_config(tmp_path / "c"))

    with pytest.raises(Exception, match="cannot connect to u@127.0.0.1:1/db") as exc:
        asyncio.run(start())
    assert "hunter2" not in str(exc.value)


def test_unknown_store_and_missing_plugin_table(tmp_path):
    make_config_dir(tmp_path / "a", conf={"50.toml": '[server]\nqueue_store = "redis"\n'})
    with pytest.raises(ConfigError, match="unknown store 'redis'.*filesystem.*postgres"):
        make_stores(load_config(tmp_path / "a"))
    make_config_dir(tmp_path / "b", conf={"50.toml": '[server]\nqueue_store = "postgres"\n'})
    with pytest.raises(ConfigError, match=r"needs \[plugins.queue_postgres\]"):
        make_stores(load_config(tmp_path / "b"))


def test_queue_store_round_trip_and_fenced_state(tmp_path, dsn_env):
    migrate_root = tmp_path / "a"
    config_a = config_for(migrate_root, "a")
    config_b = config_for(tmp_path / "b", "b")
    migrate(migrate_root, dsn_env)

    async def run() -> None:
        a, b = await opened(config_a), await opened(config_b)
        qa, qb = a.queue, b.queue
        assert isinstance(qa, SharedQueueStore) and isinstance(qb, SharedQueueStore)
        try:
            it = item(qa.new_id(), "x@example.test", "y@example.test")
            message = b"Subject: hi\r\n\r\n" + bytes(range(256)) * 40
            await qa.put(it, message)
            assert await qb.exists(it.id) and await qb.ids() == [it.id]
            got = await qb.load(it.id)
            assert [r.address for r in got.recipients] == ["x@example.test", "y@example.test"]
            assert got.size == len(message) and await qb.read_message(it.id) == message
            # a unleased put is claimable by any node; only one gets it
            claims = await asyncio.gather(qa.claim(10), qb.claim(10))
            assert sorted(claims, key=len) == [[], [it.id]]
            winner, loser = (qa, qb) if claims[0] else (qb, qa)
            got.recipients[0].status = RecipientStatus.SENT
            got.next_attempt = time.time() + 3600
            await loser.save_state(got)  # fenced: the loser holds no lease
            assert (await qa.load(it.id)).recipients[0].status is RecipientStatus.PENDING
            await winner.save_state(got)
            assert (await qa.load(it.id)).recipients[0].status is RecipientStatus.SENT
            await winner.release(it.id)
            assert await qa.claim(10) == [] and await qb.claim(10) == []  # due in an hour
            assert await qa.apply("retry", []) == 1
            assert await qb.claim(10) == [it.id]
            await qb.remove(got)
            assert not await qa.exists(it.id)
            with pytest.raises(QueueError, match="no queue item"):
                await qa.load(it.id)
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_a_dead_nodes_lease_expires_and_another_node_claims(tmp_path, dsn_env):
    config_a = config_for(tmp_path / "a", "a", lease=1.0)
    config_b = config_for(tmp_path / "b", "b", lease=1.0)
    migrate(tmp_path / "a", dsn_env)

    async def run() -> None:
        a, b = await opened(config_a), await opened(config_b)
        qa, qb = a.queue, b.queue
        assert isinstance(qa, SharedQueueStore) and isinstance(qb, SharedQueueStore)
        try:
            qa.lease_on_put = True  # a delivering node leases what it receives
            items = [item(qa.new_id()) for _ in range(5)]
            for it in items:
                await qa.put(it, b"Subject: x\r\n\r\nbody\r\n")
            assert await qb.claim(10) == []
            await asyncio.sleep(2.0)  # a's heartbeat keeps its leases alive
            assert await qb.claim(10) == []
            holders = await qb.holders()
            assert {h[0] for h in holders.values()} == {"a"} and len(holders) == 5
            # "kill" a: its heartbeat stops, nothing is released
            assert a.backends[0]._heartbeat is not None  # type: ignore[attr-defined]
            a.backends[0]._heartbeat.cancel()  # type: ignore[attr-defined]
            deadline = time.monotonic() + 5
            taken: list[str] = []
            while len(taken) < 5 and time.monotonic() < deadline:
                taken += await qb.claim(10)
                await asyncio.sleep(0.1)
            assert sorted(taken) == sorted(i.id for i in items)
            assert set(await qb.holders()) == set(taken)
        finally:
            qa.leased.clear()  # type: ignore[attr-defined]
            await a.close()
            await b.close()

    asyncio.run(run())


def test_operator_actions_every_node_sees(tmp_path, dsn_env):
    config_a = config_for(tmp_path / "a", "a")
    config_b = config_for(tmp_path / "b", "b")
    migrate(tmp_path / "a", dsn_env)

    async def run() -> None:
        a, b = await opened(config_a), await opened(config_b)
        qa, qb = a.queue, b.queue
        assert isinstance(qa, SharedQueueStore) and isinstance(qb, SharedQueueStore)
        try:
            ids = []
            for _ in range(3):
                it = item(qa.new_id())
                await qa.put(it, b"Subject: x\r\n\r\n")
                ids.append(it.id)
            assert await qa.apply("hold", [ids[0]]) == 1
            assert (await qb.load(ids[0])).held
            waiter = asyncio.ensure_future(qb.wait_due(10))
            await asyncio.sleep(0.1)
            assert sorted(await qb.claim(10)) == sorted(ids[1:])  # held: not claimed
            for qid in ids[1:]:
                await qb.release(qid)  # retry_at 0: due again, and nodes are told
            await asyncio.wait_for(waiter, 5)
            assert await qa.apply("release", [ids[0]]) == 1
            assert not (await qb.load(ids[0])).held
            assert await qa.apply("delete", [ids[1]]) == 1
            assert sorted(await qb.ids()) == sorted([ids[0], ids[2]])
            assert await qb.apply("delete", []) == 2
            assert await qa.ids() == []
            with pytest.raises(QueueError, match="unknown queue action"):
                await qa.apply("explode", [])
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_batched_puts_each_wait_for_the_commit(tmp_path, dsn_env):
    config = config_for(tmp_path / "a", "a")
    migrate(tmp_path / "a", dsn_env)

    async def run() -> None:
        stores = await opened(config)
        q = stores.queue
        try:
            items = [item(q.new_id()) for _ in range(300)]
            await asyncio.gather(*(q.put(i, b"Subject: %d\r\n\r\n" % n)
                                   for n, i in enumerate(items)))
            assert sorted(await q.ids()) == sorted(i.id for i in items)
            assert await q.read_message(items[123].id) == b"Subject: 123\r\n\r\n"
            with pytest.raises(QueueError, match="already"):
                await q.put(items[0], b"again")
        finally:
            await stores.close()

    asyncio.run(run())


def test_state_store_shared_between_nodes(tmp_path, dsn_env):
    config_a = config_for(tmp_path / "a", "a")
    config_b = config_for(tmp_path / "b", "b")
    migrate(tmp_path / "a", dsn_env)

    async def run() -> None:
        a, b = await opened(config_a), await opened(config_b)
        sa, sb = a.state, b.state
        assert sa.shared and sb.shared
        try:
            assert await sa.get("ns", "k") is None
            await sa.put("ns", "k", {"level": "tls", "n": 1})
            assert await sb.get("ns", "k") == {"level": "tls", "n": 1}
            assert not await sb.compare_and_set("ns", "k", {"level": "plain"}, {"x": 1})
            assert await sb.compare_and_set("ns", "k", {"n": 1, "level": "tls"}, {"x": 2})
            assert await sa.get("ns", "k") == {"x": 2}
            assert await sa.compare_and_set("ns", "new", None, [1, 2])
            assert not await sb.compare_and_set("ns", "new", None, [3])
            counts = await asyncio.gather(*(s.incr("c", "ip:1", ttl=1.0)
                                            for s in (sa, sb) for _ in range(10)))
            assert sorted(counts) == list(range(1, 21))
            assert await sb.incr("c", "ip:1", 5, ttl=1.0) == 25
            await asyncio.sleep(1.1)
            assert await sa.incr("c", "ip:1", ttl=1.0) == 1  # a new window
            await sa.put("t", "short", True, ttl=0.3)
            assert await sb.get("t", "short") is True
            await asyncio.sleep(0.4)
            assert await sb.get("t", "short") is None
            assert await sb.compare_and_set("t", "short", None, "again", ttl=10)
            assert [k for k, _ in await sa.items("ns")] == ["k", "new"]
            assert await sa.delete("ns", "k") and not await sb.delete("ns", "k")
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())


def test_import_queue_moves_a_single_servers_queue(tmp_path, dsn_env, tampu_server):
    root = tmp_path / "c"
    config = config_for(root, "a")
    migrate(root, dsn_env)
    from tampu.store_files import FilesystemStore

    files = FilesystemStore(config.data_dir / "queue", 100)

    async def fill() -> list[str]:
        ids = []
        for n in range(5):
            it = item(files.new_id(), "p@example.test", "q@example.test")
            await files.put(it, b"Subject: %d\r\n\r\n" % n)
            it.recipients[0].status = RecipientStatus.SENT
            it.held = n == 0
            await files.save_state(it)
            ids.append(it.id)
        return ids

    ids = asyncio.run(fill())
    # one more that a server killed before it had its own file left only in its queue log
    crashed = FilesystemStore(config.data_dir / "queue", 100)
    lost = item(crashed.new_id(), "p@example.test", "q@example.test")
    asyncio.run(crashed.put(lost, b"Subject: lost\r\n\r\n"))
    (segment,) = [p for p in (crashed.dir / "log").glob("*.seg")
                  if p.name.startswith(crashed._boot)
                  and f"-{os.getpid()}-" in p.name and lost.id.encode() in p.read_bytes()]
    shutil.copy(segment, segment.with_name(f"{crashed._boot}-4194303-1-1.seg"))  # no such PID
    asyncio.run(crashed.close())
    crashed.item_path(lost.id).unlink()  # as the crash left it: only in the dead segment
    done = run_tampu("db", "import-queue", "--config-dir", str(root),
                     env={"TAMPU_PG_DSN": dsn_env})
    assert done.returncode == 0, done.stderr
    assert "imported 6 item(s)" in done.stdout
    assert files.ids_now() == []
    ids.append(lost.id)

    async def check() -> None:
        stores = await opened(config)
        try:
            assert sorted(await stores.queue.ids()) == sorted(ids)
            first = await stores.queue.load(ids[0])
            assert first.held and first.recipients[0].status is RecipientStatus.SENT
            assert first.recipients[1].pending
            assert await stores.queue.read_message(ids[3]) == b"Subject: 3\r\n\r\n"
        finally:
            await stores.close()

    asyncio.run(check())
    again = run_tampu("db", "import-queue", "--config-dir", str(root),
                      env={"TAMPU_PG_DSN": dsn_env})
    assert again.returncode == 0 and "nothing to import" in again.stdout
    assert os.environ["TAMPU_PG_DSN"] not in done.stdout + done.stderr


def test_tampu_queue_commands_act_on_the_shared_queue(tmp_path, dsn_env):
    root = tmp_path / "c"
    config = config_for(root, "a")
    migrate(root, dsn_env)

    async def fill() -> list[str]:
        stores = await opened(config)
        try:
            ids = []
            for n in range(2):
                it = item(stores.queue.new_id(), f"r{n}@remote.test")
                await stores.queue.put(it, b"Subject: q\r\n\r\nbody\r\n")
                ids.append(it.id)
            return ids
        finally:
            await stores.close()

    ids = asyncio.run(fill())
    env = {"TAMPU_PG_DSN": dsn_env}

    def tampu_queue(*args: str) -> str:
        done = run_tampu("queue", *args, "--config-dir", str(root), env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = tampu_queue("list")
    assert all(qid in listed for qid in ids) and "in 2 item(s)" in listed
    assert "hold applied to 1 item(s) of the shared queue" in tampu_queue("hold", ids[0])
    assert f"{ids[0]}!" in tampu_queue("list")  # held, as every node sees it
    assert "Subject: q" in tampu_queue("show", ids[1])
    assert "release applied to 1" in tampu_queue("release", ids[0])
    assert "delete applied to 2" in tampu_queue("delete", "ALL")
    assert "queue is empty" in tampu_queue("list")


def test_a_node_name_in_use_elsewhere_is_reported_and_its_leases_kept(tmp_path, dsn_env,
                                                                      caplog):
    config = config_for(tmp_path / "a", "same", lease=5.0)
    migrate(tmp_path / "a", dsn_env)

    async def run() -> None:
        first, second = await opened(config), await opened(config)
        q1, q2 = first.queue, second.queue
        db1, db2 = first.backends[0], second.backends[0]
        try:
            await db1.become_node()  # type: ignore[attr-defined]
            q1.lease_on_put = True  # type: ignore[attr-defined]
            it = item(q1.new_id())
            await q1.put(it, b"Subject: x\r\n\r\n")
            db2.instance = "another-host/1"  # type: ignore[attr-defined]
            await db2.become_node()  # type: ignore[attr-defined]
            assert db2.name_in_use  # type: ignore[attr-defined]
            assert await q2.recover() == []
            holders = await q2.holders()  # type: ignore[attr-defined]
            assert holders[it.id][0] == "same"  # not released: it may be the other's
        finally:
            await first.close()
            await second.close()

    asyncio.run(run())
    assert "node name 'same' was in use" in caplog.text


def test_a_restarted_node_gives_up_its_previous_runs_leases_not_its_own(tmp_path, dsn_env):
    config = config_for(tmp_path / "a", "a", lease=30.0)
    migrate(tmp_path / "a", dsn_env)

    async def run() -> None:
        old, new = await opened(config), await opened(config)
        q_old, q_new = old.queue, new.queue
        db_old, db_new = old.backends[0], new.backends[0]
        try:
            await db_old.become_node()  # type: ignore[attr-defined]
            q_old.lease_on_put = True  # type: ignore[attr-defined]
            before = [item(q_old.new_id()) for _ in range(3)]
            for it in before:
                await q_old.put(it, b"Subject: old\r\n\r\n")
            db_old._heartbeat.cancel()  # type: ignore[attr-defined]  # the old run dies
            q_old.leased.clear()  # type: ignore[attr-defined]
            async with db_new.connection() as conn:  # type: ignore[attr-defined]
                await conn.execute("UPDATE tampu_nodes SET heartbeat = heartbeat - 100")
            db_new.instance = "restarted/2"  # type: ignore[attr-defined]
            await db_new.become_node()  # type: ignore[attr-defined]
            assert not db_new.name_in_use  # type: ignore[attr-defined]
            q_new.lease_on_put = True  # type: ignore[attr-defined]
            mine = item(q_new.new_id())
            await q_new.put(mine, b"Subject: new\r\n\r\n")  # before recovery (background)
            assert await q_new.recover() == []
            holders = await q_new.holders()  # type: ignore[attr-defined]
            assert list(holders) == [mine.id]  # the old run's three are claimable now
            assert isinstance(q_new, SharedQueueStore)
            assert sorted(await q_new.claim(10)) == sorted(i.id for i in before)
        finally:
            await old.close()
            await new.close()

    asyncio.run(run())


def test_a_serving_node_exports_its_lag_and_leases(tampu_server, dsn_env):
    """An in-process server on PostgreSQL (schema made by auto_migrate) with the metrics
    plugin: the per-node gauges of the shared queue are in /metrics."""
    import urllib.request

    srv = tampu_server(deliver=True, conf={
        "50-pg.toml": PG_CONF.format(node="m1", lease=5) + "auto_migrate = true\n",
        "60-metrics.toml": '[plugins.metrics]\nenabled = true\naddress = "127.0.0.1:0"\n'})
    assert isinstance(srv.store, SharedQueueStore)
    port = srv.server.registry.plugins["metrics"].obj.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for gauge in ("tampu_queue_lag_seconds", "tampu_queue_due_items", "tampu_queue_leases",
                  "tampu_store_up", "tampu_cluster_nodes"):
        assert f'{gauge}{{node="m1"}}' in text, gauge
    assert 'tampu_store_up{node="m1"} 1.0' in text
    assert 'tampu_cluster_nodes{node="m1"} 1.0' in text
