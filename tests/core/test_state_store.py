"""The local state store (the default): durable values in files, values with an expiry in
memory; compare-and-set shared by separate store objects on the same folder (as the processes
of one server are)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from tampu.state_store import LocalStateStore, update


def test_values_without_expiry_are_files_and_survive_a_new_store(tmp_path):
    store = LocalStateStore(tmp_path)

    async def run() -> None:
        assert await store.get("ns", "a/b") is None
        await store.put("ns", "a/b", {"x": 1})
        await store.put("ns", ".hidden", [1])
        assert await store.get("ns", "a/b") == {"x": 1}
        assert await LocalStateStore(tmp_path).get("ns", "a/b") == {"x": 1}
        assert sorted(p.name for p in (tmp_path / "ns").glob("*.json")) == [
            "%2Ehidden.json", "a%2Fb.json"]  # no path escapes, no hidden files
        assert json.loads((tmp_path / "ns" / "a%2Fb.json").read_text()) == {"x": 1}
        assert await store.items("ns") == [(".hidden", [1]), ("a/b", {"x": 1})]
        assert await store.delete("ns", "a/b") and not await store.delete("ns", "a/b")

    asyncio.run(run())


def test_expiry_counters_and_compare_and_set_in_memory(tmp_path):
    store = LocalStateStore(tmp_path)

    async def run() -> None:
        assert [await store.incr("c", "k", ttl=0.3) for _ in range(3)] == [1, 2, 3]
        assert await store.incr("c", "k", 5, ttl=0.3) == 8
        await asyncio.sleep(0.35)
        assert await store.incr("c", "k", ttl=0.3) == 1  # a new window
        assert await store.compare_and_set("t", "k", None, "first", ttl=0.2)
        assert not await store.compare_and_set("t", "k", None, "second", ttl=0.2)
        assert await store.get("t", "k") == "first"
        await asyncio.sleep(0.25)
        assert await store.get("t", "k") is None  # expired: absent again
        assert await store.compare_and_set("t", "k", None, "again", ttl=5)
        assert not list(tmp_path.rglob("*.json"))  # nothing with an expiry on disk

    asyncio.run(run())


def test_compare_and_set_across_store_objects_never_loses_an_update(tmp_path):
    """Ten threads, each with its own store on the same folder, add to one durable counter
    through update(): the flock-protected compare-and-set keeps every increment."""

    def worker() -> None:
        store = LocalStateStore(tmp_path)

        async def run() -> None:
            for _ in range(10):
                await update(store, "ns", "n", lambda old: (old or 0) + 1, attempts=200)

        asyncio.run(run())

    threads = [threading.Thread(target=worker) for _ in range(10)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - start < 60
    assert asyncio.run(LocalStateStore(tmp_path).get("ns", "n")) == 100
