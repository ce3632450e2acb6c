"""The core's DNS client against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

from tampu.dns import DnsTempError, Resolver, parse_server
from tests.dnsserver import DNSServer

ZONE = {
    "example.test": {"MX": ["10 mx.example.test."], "TXT": ['"v=spf1 " "-all"'],
                     "A": ["192.0.2.1"]},
    "alias.example.test": {"CNAME": ["example.test."]},
    "faß.example.test": {"A": ["192.0.2.7"]},
    "big.example.test": {"TXT": [f'"{c * 200}"' for c in "vwxyz"]},
    "xn--fa-hia.example.test": {"A": ["192.0.2.8"]},
}


def run(coro, res=None):
    async def main():
        try:
            return await coro
        finally:
            if res is not None:
                res.close()

    return asyncio.run(main())


def test_records_cache_and_coalescing():
    with DNSServer(ZONE) as server:
        res = Resolver([parse_server(server.address)], timeout=2)

        async def main():
            answers = await asyncio.gather(*(res.query("example.test", "MX") for _ in range(5)))
            again = await res.query("EXAMPLE.test.", "mx")
            return answers, again

        answers, again = run(main(), res)
        assert [a.records[0].exchange.to_text() for a in answers] == ["mx.example.test."] * 5
        assert again is answers[0]  # from the cache
        assert server.queries.count(("example.test.", "MX")) == 1
        assert answers[0].ttl == 60 and not answers[0].authenticated


def test_concurrent_first_queries_share_one_socket():
    """Two names asked at once before any socket exists: one socket, none leaked (a
    ResourceWarning would fail the test)."""
    with DNSServer(ZONE) as server:
        res = Resolver([parse_server(server.address)], timeout=2)

        async def main():
            found = await asyncio.gather(res.query("example.test", "A"),
                                         res.query("big.example.test", "TXT"),
                                         res.query("alias.example.test", "A"))
            return found, len(res._sockets)

        found, sockets = run(main(), res)
        assert [bool(a) for a in found] == [True, True, True] and sockets == 1


def test_txt_strings_joined_and_cname_followed():
    with DNSServer(ZONE) as server:
        res = Resolver([parse_server(server.address)], timeout=2)
        assert run(res.txt("example.test"), res) == ["v=spf1 -all"]
        answer = run(res.query("alias.example.test", "A"), res)
        assert [r.address for r in answer.records] == ["192.0.2.1"]


def test_nxdomain_nodata_and_no_negative_cache_without_soa():
    with DNSServer(ZONE) as server:
        res = Resolver([parse_server(server.address)], timeout=2)
        nx = run(res.query("nope.example.test", "A"), res)
        assert nx.nxdomain and not nx
        nodata = run(res.query("example.test", "AAAA"), res)
        assert not nodata.nxdomain and not nodata.records
        run(res.query("nope.example.test", "A"), res)
        assert server.queries.count(("nope.example.test.", "A")) == 2


def test_nxdomain_and_nodata_with_an_soa_are_cached_for_its_minimum():
    """RFC 2308: a negative answer carrying the zone's SOA is cached for min(SOA TTL,
    MINIMUM); the server's next answers for the name are not asked for within that."""
    with DNSServer(ZONE, negative_ttl=30) as server:
        res = Resolver([parse_server(server.address)], timeout=2)

        async def main():
            first = [await res.query("nope.example.test", "A"),
                     await res.query("example.test", "AAAA")]
            again = [await res.query("nope.example.test", "A"),
                     await res.query("example.test", "AAAA")]
            return first, again

        first, again = run(main(), res)
        assert first[0].nxdomain and not first[1].nxdomain and not first[1].records
        assert [a.ttl for a in first] == [30, 30]
        assert again[0] is first[0] and again[1] is first[1]
        assert server.queries.count(("nope.example.test.", "A")) == 1
        assert server.queries.count(("example.test.", "AAAA")) == 1


def test_ttl_zero_is_not_cached():
    with DNSServer(ZONE, ttl=0) as server:
        res = Resolver([parse_server(server.address)], timeout=2)
        run(res.query("example.test", "A"), res)
        run(res.query("example.test", "A"), res)
        assert server.queries.count(("example.test.", "A")) == 2


def test_truncated_answer_is_asked_again_over_tcp():
    with DNSServer(ZONE) as server:
        res = Resolver([parse_server(server.address)], timeout=2)
        texts = run(res.txt("big.example.test"), res)
        assert sorted(texts) == [c * 200 for c in "vwxyz"]


def test_unicode_names_are_sent_as_a_labels():
    with DNSServer(ZONE) as server:
        res = Resolver([parse_server(server.address)], timeout=2)
        answer = run(res.query("faß.example.test", "A"), res)
        assert [r.address for r in answer.records] == ["192.0.2.8"]


def test_timeout_and_servfail_are_temporary_errors():
    with DNSServer(ZONE, timeout={"slow.example.test"}) as server:
        server.servfail.add("broken.example.test")
        res = Resolver([parse_server(server.address)], timeout=0.5)
        start = time.monotonic()
        with pytest.raises(DnsTempError, match="timeout"):
            run(res.query("slow.example.test", "TXT"), res)
        assert time.monotonic() - start < 1.5
        with pytest.raises(DnsTempError, match="SERVFAIL"):
            run(res.query("broken.example.test", "TXT"), res)


def test_ad_bit_is_reported():
    with DNSServer(ZONE, authenticated=True) as server:
        res = Resolver([parse_server(server.address)], timeout=2)
        assert run(res.query("example.test", "A"), res).authenticated


def test_server_specs():
    assert parse_server("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_server("[::1]:53") == ("::1", 53)
    assert parse_server("::1") == ("::1", 53)
    for bad in ("127.0.0.1:x", "dns.example:53", "[::1", ":53", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_server(bad)
