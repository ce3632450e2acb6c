"""Helpers shared by the benchmarks: ports, waiting for a server, a benchmark config dir."""

from __future__ import annotations

import shutil
import socket
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PASSWORD = "benchpass"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def write_bench_config(root: Path, server_toml: str) -> None:
    """A configuration directory: the repository's conf.d with its ``[server]`` file replaced
    by ``server_toml`` (dedented), and the local user user@example.test."""
    from tampu.plugins.auth.userdb import UserDB, hash_password

    (root / "conf.d").mkdir(parents=True)
    (root / "domains" / "example.test").mkdir(parents=True)
    UserDB(root / "domains" / "example.test" / "users").write(
        {"user": hash_password(PASSWORD, log_n=10)})
    for src in sorted((ROOT / "conf.d").glob("*.toml")):  # the shipped plugin configuration
        if src.name != "00-server.toml":
            shutil.copy(src, root / "conf.d" / src.name)
    (root / "conf.d" / "00-server.toml").write_text(textwrap.dedent(server_toml))
