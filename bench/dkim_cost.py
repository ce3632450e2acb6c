#!/usr/bin/env python3
"""DKIM cost per message: signing (RSA 2048/3072, Ed25519) and verifying one signature.

* **sign**: ``tampu.plugins.dkim.sign.sign`` (what ``queue_add_headers`` runs, in a worker
  thread) with one key;
* **verify (CPU)**: ``Verifier.check``, dkimpy's verification of one signature with the key
  record already fetched (what runs in the worker thread);
* **verify (whole)**: ``Verifier.verify`` on the event loop with the key record in the
  resolver's cache (parse, cache hit, hand-off to the thread, verification): what
  ``smtp_data`` waits for.

    python bench/dkim_cost.py                 # 5 kB messages, 200 rounds
    python bench/dkim_cost.py --size 50000 -n 50

Times are per call (best of 3 runs of n calls). Needs nothing but tampu installed: the key
record is served by ``tests/dnsserver.py`` on loopback, queried once, then cached.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import timeit
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)


def message(size: int) -> bytes:
    head = (b"From: Some One <user@example.test>\r\nTo: friend@example.org\r\n"
            b"Subject: benchmark\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"Message-ID: <1@example.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def best(func: object, n: int) -> float:
    return min(timeit.repeat(func, number=n, repeat=3)) / n  # type: ignore[arg-type]


def main() -> None:
    from tampu.dns import Resolver
    from tampu.plugins.dkim.keys import generate_key, key_path, load_key, write_key_file
    from tampu.plugins.dkim.sign import sign
    from tampu.plugins.dkim.verify import Verifier
    from tests.dnsserver import DNSServer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=5000, help="message size in bytes")
    ap.add_argument("-n", type=int, default=200, help="calls per run")
    args = ap.parse_args()
    msg = message(args.size)
    print(f"message: {len(msg)} bytes, {args.n} calls x 3 runs, best run")
    with tempfile.TemporaryDirectory() as tmp:
        for alg in ("rsa2048", "rsa3072", "ed25519"):
            path = key_path(Path(tmp), alg)
            write_key_file(path, generate_key(alg))
            key = load_key(path, "example.test")
            n = max(10, args.n // 4) if alg.startswith("rsa") else args.n
            t_sign = best(lambda: sign(msg, [key]), n)
            name, value = sign(msg, [key])[0]
            signed = f"{name}: {value}\r\n".encode() + msg
            rdata = " ".join(f'"{t[i:i + 200]}"' for t in [key.txt_record()]
                             for i in range(0, len(t), 200))
            with DNSServer({f"{alg}._domainkey.example.test": {"TXT": [rdata]}}) as dns:
                resolver = Resolver([("127.0.0.1", dns.port)], timeout=2)
                verifier = Verifier(resolver)

                async def run() -> tuple[float, float, str]:
                    got = await verifier.verify(signed)  # fetches and caches the record
                    sigs, _ = verifier.parse(signed)
                    await verifier._fetch(sigs)
                    t_cpu = best(lambda: verifier.check(signed, sigs), args.n)
                    start = time.perf_counter()
                    for _ in range(args.n):
                        await verifier.verify(signed)
                    t_all = (time.perf_counter() - start) / args.n
                    resolver.close()
                    return t_cpu, t_all, got[0].result

                t_cpu, t_all, result = asyncio.run(run())
            print(f"{alg:8}  sign {t_sign * 1e3:7.2f} ms   verify (CPU) {t_cpu * 1e3:6.2f} ms"
                  f"   verify (whole, cached key) {t_all * 1e3:6.2f} ms   [{result}]")


if __name__ == "__main__":
    main()
