"""The DNS client keeps one UDP socket per server, even when its first queries run at once."""

from __future__ import annotations

import asyncio
import gc
import warnings

from tampu.dns import Resolver


def test_concurrent_first_queries_share_one_socket(make_dns):
    server = make_dns({f"n{i}.test": {"A": ["192.0.2.1"]} for i in range(5)})

    async def main():
        resolver = Resolver([("127.0.0.1", server.port)], timeout=2.0)
        try:
            answers = await asyncio.gather(*(resolver.query(f"n{i}.test", "A")
                                             for i in range(5)))
            assert all(a.records for a in answers)
            assert len(resolver._sockets) == 1
        finally:
            resolver.close()
            await asyncio.sleep(0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    leaked = [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, [str(w.message) for w in leaked]
