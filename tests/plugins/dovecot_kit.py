"""A real Dovecot for tests: its auth service only, in a temporary directory.

``DovecotServer(root, users)`` writes a dovecot.conf (no protocols, ``ssl = no``, base_dir,
state_dir and logs under ``root``), a passwd-file with the users and a checkpassword script
that answers "temporary failure" for users starting with ``tempfail`` (so Dovecot's own
``FAIL ... code=temp_fail`` can be tested), starts ``dovecot -F`` and waits for the sockets.
``stop()`` ends that process by its PID; no system Dovecot is touched.

Dovecot's auth process runs as the ``dovecot`` user when the tests run as root, so its files
live in a directory of their own under /tmp that it may read (pytest's tmp_path is 0700 root):
``DovecotServer.temporary(users)`` makes one and removes it on ``stop()``.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

from tests.conftest import require_tool

TEMPFAIL_PREFIX = "tempfail"

_CHECKPASSWORD = f"""\
#!/bin/sh
# Test backend after passwd-file: users starting with {TEMPFAIL_PREFIX} are a temporary
# failure (111), the rest unknown (userdb lookups: 3) or refused (1).
user=$(head -c 1024 <&3 | tr '\\000' '\\n' | head -n 1)
case "$user" in
  {TEMPFAIL_PREFIX}*) exit 111 ;;
esac
[ -n "$AUTHORIZED" ] && exit 3
exit 1
"""


def hash_password(password: str, scheme: str = "SHA512-CRYPT") -> str:
    """``{SCHEME}hash`` made by doveadm, as an administrator would."""
    doveadm = require_tool("doveadm")
    out = subprocess.run([doveadm, "pw", "-s", scheme, "-p", password], capture_output=True,
                         text=True, timeout=30, check=True)
    return out.stdout.strip()


def socket_ready(path: Path) -> bool:
    try:
        if not stat.S_ISSOCK(path.stat().st_mode):
            return False
    except OSError:
        return False
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


class DovecotServer:
    """One ``dovecot -F`` with passdb/userdb ``passwd-file`` over ``users``.

    ``users`` maps ``user@domain`` to a password field (``{PLAIN}secret`` or a doveadm hash).
    ``listeners`` are the auth socket names to create in base_dir (each a client or userdb
    listener by its name's ending).
    """

    def __init__(self, root: Path, users: dict[str, str], *, realm: str = "",
                 failure_delay: str = "0",
                 listeners: tuple[str, ...] = ("auth-client", "auth-userdb",
                                               "auth-chasquid-client",
                                               "auth-chasquid-userdb")) -> None:
        self.binary = require_tool("dovecot")
        self.root = root
        self.base_dir = root / "run"
        self.log_path = root / "dovecot.log"
        self.conf_path = root / "dovecot.conf"
        self.listeners = listeners
        self.proc: subprocess.Popen[bytes] | None = None
        self.remove_root = False
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("run", "state"):
            (root / sub).mkdir(exist_ok=True)
        lines = "".join(f"{address}:{password}::::::\n" for address, password in users.items())
        (root / "users").write_text(lines)
        script = root / "checkpassword.sh"
        script.write_text(_CHECKPASSWORD)
        script.chmod(0o755)
        self.conf_path.write_text(self._config(realm, failure_delay))

    def _config(self, realm: str, failure_delay: str) -> str:
        root = self.root
        rootless = ""
        owner = ""
        uid_fields = "uid=nobody gid=nogroup"
        if os.geteuid() != 0:  # Dovecot's HowTo.Rootless: every service as this user
            import grp
            import pwd

            user = pwd.getpwuid(os.geteuid()).pw_name
            group = grp.getgrgid(os.getegid()).gr_name
            rootless = textwrap.dedent(f"""\
                default_internal_user = {user}
                default_internal_group = {group}
                default_login_user = {user}
                service anvil {{
                  chroot =
                }}
                """)
            owner = f"    user = {user}\n"
            uid_fields = f"uid={os.geteuid()} gid={os.getegid()}"
        listeners = "".join(f"  unix_listener {name} {{\n    mode = 0600\n{owner}  }}\n"
                            for name in self.listeners)
        return textwrap.dedent(f"""\
            # Written by tests/plugins/dovecot_kit.py: the auth service only.
            base_dir = {self.base_dir}
            state_dir = {root / "state"}
            log_path = {self.log_path}
            protocols =
            ssl = no
            auth_mechanisms = plain login
            auth_failure_delay = {failure_delay}
            auth_verbose = yes
            auth_default_realm = {realm}
            """) + rootless + textwrap.dedent(f"""\
            passdb {{
              driver = passwd-file
              args = {root / "users"}
            }}
            passdb {{
              driver = checkpassword
              args = {root / "checkpassword.sh"}
            }}
            userdb {{
              driver = passwd-file
              args = {root / "users"}
              default_fields = {uid_fields} home={root}
            }}
            userdb {{
              driver = checkpassword
              args = {root / "checkpassword.sh"}
            }}
            """) + "service auth {\n" + listeners + "}\n"

    @classmethod
    def temporary(cls, users: dict[str, str], *, realm: str = "",
                  failure_delay: str = "0") -> DovecotServer:
        """A server in a new directory under /tmp (mode 0755), removed by ``cleanup()``."""
        root = Path(tempfile.mkdtemp(prefix="tampu-dovecot-"))
        root.chmod(0o755)
        server = cls(root, users, realm=realm, failure_delay=failure_delay)
        server.remove_root = True
        return server

    def cleanup(self) -> None:
        """Stop, and remove the directory if ``temporary()`` made it."""
        self.stop()
        if self.remove_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def socket(self, name: str) -> Path:
        return self.base_dir / name

    @property
    def userdb(self) -> str:
        return str(self.socket("auth-userdb"))

    @property
    def client(self) -> str:
        return str(self.socket("auth-client"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 20) -> DovecotServer:
        with open(self.root / "dovecot.out", "wb") as out:
            self.proc = subprocess.Popen([self.binary, "-F", "-c", str(self.conf_path)],
                                         stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not all(socket_ready(self.socket(n)) for n in self.listeners):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = (self.root / "dovecot.out").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"dovecot did not start:\n{output}\n{self.log()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM to our dovecot master (by PID), and wait for it to exit."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> DovecotServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
