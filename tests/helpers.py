"""Shared helpers for the reception tests: a raw SMTP line client, queue-file parsing, the CLI.

Kept out of conftest.py (owned by the lead); import with ``from tests.helpers import ...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENHANCED = r"^[245]\.\d{1,3}\.\d{1,3}$"


class RawClient:
    """A line-by-line SMTP client over a real socket, for what smtplib will not send.

    ``reply()`` returns ``(code, lines)`` with the text of each line (after ``NNN-``/``NNN ``).
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout: float = 10,
                 tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = "localhost", source: str | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=timeout,
                                        source_address=(source, 0) if source else None)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname=server_hostname)
        self.sock: socket.socket = sock
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        self.sock.sendall(data + b"\r\n")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by server (buffer {self.buf!r})")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, list[str]]:
        lines = []
        while True:
            raw = self.readline().decode("utf-8", "replace")
            lines.append(raw)
            if raw[3:4] != "-":
                return int(raw[:3]), [ln[4:] for ln in lines]

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send(line)
        return self.reply()

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        code, lines = self.cmd("STARTTLS")
        assert code == 220, lines
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def closed_by_server(self, timeout: float = 5) -> bool:
        """True once the server closed the connection (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
            return True
        except TimeoutError:
            return False


def read_queue_item(srv: Any, qid: str) -> tuple[dict[str, Any], bytes]:
    """An item as queued by the running test server ``srv``, in its file's format:
    (JSON header, message bytes): one JSON line, ``\\n``, message."""
    raw = srv.queue_item_bytes(qid)
    header, sep, message = raw.partition(b"\n")
    assert sep, f"item {qid} has no header line"
    return json.loads(header), message


def only_queue_item(srv: Any) -> tuple[str, dict[str, Any], bytes]:
    items = srv.queue_items()
    assert len(items) == 1, items
    header, message = read_queue_item(srv, items[0])
    return items[0], header, message


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (bound to port 0, then released)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tampu_command() -> list[str]:
    """The real ``tampu`` console script (falls back to ``python -m tampu.cli``)."""
    found = shutil.which("tampu", path=os.path.dirname(sys.executable))
    return [found] if found else [sys.executable, "-m", "tampu.cli"]


def run_tampu(*args: str, stdin: str | None = None, timeout: float = 60,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*tampu_command(), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env={**os.environ, **env} if env else None)


def add_user(config_dir: Path, address: str, password: str) -> None:
    """``tampu user add --config-dir DIR ADDRESS --password-stdin`` (password on stdin)."""
    done = run_tampu("user", "add", "--config-dir", str(config_dir), address,
                     "--password-stdin", stdin=password + "\n")
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr


def wait_for_port(port: int, timeout: float = 20, proc: subprocess.Popen[Any] | None = None
                  ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def issue_cert(ca: Any, certs_dir: Path, name: str, *hosts: str) -> Path:
    """A certificate for ``hosts`` (default: ``name``) in ``certs_dir/<name>/``, chasquid's way."""
    cert = ca.issue_cert(*(hosts or (name,)))
    target = certs_dir / name
    target.mkdir(parents=True, exist_ok=True)
    cert.private_key_pem.write_to_path(str(target / "privkey.pem"))
    with open(target / "fullchain.pem", "wb") as fh:
        for pem in cert.cert_chain_pems:
            fh.write(pem.bytes())
    return target


@contextlib.contextmanager
def serving(root: Path, port: int) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``tampu serve`` in a subprocess (log in ``root/serve.log``), listening on ``port``;
    killed at the end if still running."""
    log = root / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([*tampu_command(), "serve", "--config-dir", str(root)],
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
    try:
        try:
            wait_for_port(port, proc=proc)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; tampu serve log:\n{log.read_text()}") from None
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def smtp_conf(port: int, server: str = "", more: str = "", *,
              shutdown_timeout: float = 2) -> str:
    """A conf.d file: one SMTP listener on 127.0.0.1:``port`` for example.test's users;
    ``server``: more ``[server]`` keys (lines), ``more``: more sections (the delivery)."""
    return textwrap.dedent(f"""\
        [server]
        hostname = "localhost"
        local_domains = ["example.test"]
        shutdown_timeout = {shutdown_timeout:g}
        """) + server + textwrap.dedent(f"""\
        [server.listeners.smtp]
        kind = "smtp"
        addresses = ["127.0.0.1:{port}"]
        [plugins.localusers]
        enabled = true
        """) + textwrap.dedent(more)


def maildir_conf(port: int, server: str = "", more: str = "", *,
                 shutdown_timeout: float = 2) -> str:
    """:func:`smtp_conf` delivering to the Maildirs of example.test's users."""
    return smtp_conf(port, server, "[plugins.delivery_maildir]\nenabled = true\n"
                     + textwrap.dedent(more), shutdown_timeout=shutdown_timeout)
