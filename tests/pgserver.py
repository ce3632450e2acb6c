"""A real PostgreSQL server for tests and benchmarks: initdb + pg_ctl in a temporary directory.

    with PostgresServer() as pg:
        dsn = pg.create_database("t1")      # postgresql://tampu:...@127.0.0.1:PORT/t1

It listens on 127.0.0.1 on a free port (its unix socket in the temporary directory), with
password (SCRAM) authentication for the user ``tampu``. PostgreSQL refuses to run as root: run
as root, the server runs as an unprivileged user (``nobody``, or ``TAMPU_PG_USER``). The
binaries are Debian's (``/usr/lib/postgresql/<version>/bin``) or ``pg_ctl`` on the PATH.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def find_bindir() -> Path | None:
    """The directory of initdb/pg_ctl/psql, newest version first; None if not installed."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True,
                            key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit()
                            else 0):
        if os.access(os.path.join(candidate, "initdb"), os.X_OK):
            return Path(candidate)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, stopped and removed by ``stop``."""

    def __init__(self, bindir: Path | None = None, *, fsync: bool = True,
                 settings: dict[str, str] | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise FileNotFoundError("PostgreSQL (initdb, pg_ctl) is not installed")
        self.bindir = found
        self.fsync = fsync
        self.settings = settings or {}
        self.user = "tampu"
        self.password = secrets.token_hex(12)
        self.port = 0
        self.dir: Path | None = None
        self._run_as: dict[str, Any] = {}

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def _cmd(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        done = subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=timeout, cwd=self.dir,
                              env={**os.environ, "PGPASSWORD": self.password, "LC_ALL": "C"},
                              **self._run_as)
        if check and done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tampu-pg-"))
        if os.geteuid() == 0:  # postgres will not run as root
            account = pwd.getpwnam(os.environ.get("TAMPU_PG_USER", "nobody"))
            os.chown(self.dir, account.pw_uid, account.pw_gid)
            self._run_as = {"user": account.pw_uid, "group": account.pw_gid,
                            "extra_groups": []}
        pwfile = self.dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._run_as:
            os.chown(pwfile, self._run_as["user"], self._run_as["group"])
        self._cmd("initdb", "-D", str(self.dir / "data"), "-U", self.user, "-A",
                  "scram-sha-256", "--pwfile", str(pwfile), "-E", "UTF8", "--no-instructions",
                  timeout=120)
        pwfile.unlink()
        options = {"listen_addresses": self.host, "unix_socket_directories": str(self.dir),
                   "fsync": "on" if self.fsync else "off", "max_connections": "200",
                   "shared_buffers": "64MB", **self.settings}
        for attempt in range(5):
            self.port = _free_port()
            opts = " ".join(f"-c {k}={v}" for k, v in {**options, "port": str(self.port)}.items())
            try:
                self._cmd("pg_ctl", "-D", str(self.dir / "data"), "-l",
                          str(self.dir / "server.log"), "-o", opts, "-w", "-t", "60", "start",
                          timeout=90)
                break
            except RuntimeError:
                if attempt == 4:
                    raise RuntimeError(f"PostgreSQL did not start:\n{self.log()}") from None
                time.sleep(0.2)

    def log(self) -> str:
        try:
            return (self.dir / "server.log").read_text() if self.dir else ""
        except OSError:
            return ""

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._cmd("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
                         self.host, "-p", str(self.port), "-U", self.user, "-d", database,
                         "-c", sql)

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its DSN."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        if (self.dir / "data" / "postmaster.pid").exists():
            self._cmd("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop",
                      check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
