"""What tampu uses of aiosmtpd, checked against the installed version (pinned in pyproject).

tampu has its own SMTP protocol (core/smtp_wire.py, core/smtp.py); of aiosmtpd it uses only
``aiosmtpd.proxy_protocol``: ``get_proxy(reader)`` over an object with async ``readexactly``,
``readuntil`` and ``read``, the ``ProxyData`` fields and the ``AF``/``V2_CMD`` enums. If an aiosmtpd
release changes them, this test fails before a PROXY deployment does.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress

from aiosmtpd import proxy_protocol
from aiosmtpd.proxy_protocol import AF, V2_CMD, get_proxy


class Feed:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def readexactly(self, n: int) -> bytes:
        if len(self.data) < n:
            raise asyncio.IncompleteReadError(self.data, n)
        out, self.data = self.data[:n], self.data[n:]
        return out

    async def read(self, n: int = -1) -> bytes:
        return await self.readexactly(n if n >= 0 else len(self.data))

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        end = self.data.index(separator) + len(separator)
        out, self.data = self.data[:end], self.data[end:]
        return out


def test_the_api_tampu_relies_on():
    assert inspect.iscoroutinefunction(get_proxy)
    assert list(inspect.signature(get_proxy).parameters) == ["reader_func"]
    assert {AF.UNSPEC, AF.INET, AF.INET6, AF.UNIX} and V2_CMD.LOCAL is not None
    fields = set(inspect.signature(proxy_protocol.ProxyData).parameters)
    assert "version" in fields


def test_v1_and_v2_headers_parse_as_tampu_reads_them():
    v1 = asyncio.run(get_proxy(Feed(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 25\r\nEHLO")))
    assert v1.valid and v1.version == 1
    assert v1.src_addr == ipaddress.ip_address("203.0.113.7") and v1.src_port == 40000
    header = (b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c" + bytes([198, 51, 100, 9])
              + bytes([127, 0, 0, 1]) + (40001).to_bytes(2, "big") + (25).to_bytes(2, "big"))
    v2 = asyncio.run(get_proxy(Feed(header)))
    assert v2.valid and v2.version == 2 and v2.command == V2_CMD.PROXY
    assert v2.family == AF.INET and str(v2.src_addr) == "198.51.100.9"
    local = asyncio.run(get_proxy(Feed(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")))
    assert local.valid and local.command == V2_CMD.LOCAL
    bad = asyncio.run(get_proxy(Feed(b"HELLO there\r\n")))
    assert not bad.valid and bad.error
