"""``hooks``: chasquid's post-data hook program (``hooks/post-data`` in the config directory).

After DATA and before queueing, the program runs with the message on stdin, the configuration
directory as working directory and chasquid's environment (``REMOTE_ADDR``, ``MAIL_FROM``,
``RCPT_TO``, ``AUTH_AS``, ``SPF_PASS``, ...). Exit 0: its stdout holds headers added on top of
the message (all of them, or none when the output is not a valid header block). Otherwise the
last line of stdout is the error returned to the client: permanent (554) for exit code 20,
temporary (451) for anything else, a timeout included. No program, no hook.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal

from pydantic import Field

from tampu import (
    Envelope,
    Message,
    PluginContext,
    PluginSettings,
    Reply,
    Session,
    dry_run_unsafe,
    hookimpl,
)
from tampu.authres import results
from tampu.envelope import valid_header_name

PERMANENT_EXIT = 20
_EHLO_SAFE = re.compile(r"[^a-zA-Z0-9\-.\[\]:]")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\s+(.*)$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


class HooksSettings(PluginSettings):
    priority: int = Field(default=200, description="Order on each hook: lower runs first. High "
                          "by default so the program runs last and sees the headers other "
                          "plugins added (Received-SPF).")
    program: str = Field(default="hooks/post-data", description="The program to run, relative "
                         "to the configuration directory. Absent: nothing is run.")
    timeout: float = Field(default=60.0, gt=0, description="Seconds the program may run before "
                           "it is killed and the message refused temporarily (chasquid: 60).")
    hook_timeout: float | None = Field(
        default=75.0, gt=0, description="Seconds the core lets this plugin's hooks run: above "
        "timeout, so the program's own timeout answers first.")


def sanitize_ehlo(helo: str) -> str:
    """chasquid's shell-safe EHLO domain: letters, digits and ``-.[]:`` only."""
    return _EHLO_SAFE.sub("", helo)


def remote_addr(host: str, port: int) -> str:
    """``ip:port`` like Go's net.Addr (``[v6]:port``), as chasquid's hooks get it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_headers(output: str) -> list[tuple[str, str]] | None:
    """The header fields of the program's output; None if it is not a valid header block."""
    text = output.replace("\r\n", "\n")
    if not text:
        return []
    if not text.endswith("\n") or "\n\n" in text or text == "\n":
        return None
    fields: list[tuple[str, str]] = []
    for line in text[:-1].split("\n"):
        if line[:1] in (" ", "\t"):
            if not fields:
                return None  # a continuation with no header before it
            name, value = fields[-1]
            fields[-1] = (name, f"{value}\r\n{line}")
            continue
        name, colon, value = line.partition(":")
        if not colon or not valid_header_name(name) or "\0" in line or "\r" in line:
            return None
        fields.append((name, value.lstrip(" \t")))
    return fields


def _env_value(text: str) -> str:
    return text.replace("\0", "")


class HooksPlugin:
    Settings = HooksSettings

    def __init__(self, ctx: PluginContext[HooksSettings]) -> None:
        self.ctx = ctx
        self.program = ctx.path(ctx.settings.program)
        self._program_file = ctx.server.file_stamp(self.program)

    def environment(self, session: Session, envelope: Envelope) -> dict[str, str]:
        server = self.ctx.server
        spf_pass = any(r.result == "pass" for r in results(envelope, "spf"))
        helo = session.helo or ""
        env = {name: os.environ.get(name, "") for name in ("USER", "SHELL", "PATH")}
        env.update({
            "PWD": str(server.config_dir),
            "REMOTE_ADDR": remote_addr(session.peer_host, session.peer_port),
            "EHLO_DOMAIN": sanitize_ehlo(helo),
            "EHLO_DOMAIN_RAW": _env_value(helo),
            "MAIL_FROM": _env_value(envelope.mail_from or "<>"),
            "RCPT_TO": _env_value(" ".join(envelope.rcpt_to)),
            "AUTH_AS": _env_value(session.auth_user or ""),
            "ON_TLS": "1" if session.tls is not None else "0",
            "FROM_LOCAL_DOMAIN": "1" if server.is_local_address(envelope.mail_from) else "0",
            "SPF_PASS": "1" if spf_pass else "0",
        })
        return env

    async def run(self, stdin: bytes, env: dict[str, str]) -> tuple[int | None, bytes]:
        """Run the program; (exit code, or None on timeout; stdout)."""
        proc = await asyncio.create_subprocess_exec(
            str(self.program), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=self.ctx.server.config_dir, env=env,
            start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.ctx.settings.timeout)
        except TimeoutError:
            return None, b""
        finally:
            if proc.returncode is None:  # timed out, or the core's plugin_timeout cancelled us
                kill_group(proc)
                await proc.wait()
        if err.strip():
            self.ctx.log.info("post-data hook stderr: %s",
                              err.decode("utf-8", "replace").strip()[-500:])
        return proc.returncode, out

    @hookimpl
    @dry_run_unsafe  # the program may do anything
    async def smtp_data(self, session: Session, envelope: Envelope,
                        message: Message) -> Reply | None:
        if not self._program_file.exists():
            return None
        added = b"".join(f"{n}: {v}\r\n".encode() for n, v in message.added_headers)
        try:
            code, out = await self.run(added + message.data, self.environment(session, envelope))
        except OSError as exc:
            self.ctx.log.error("session=%s post-data hook %s could not run: %s", session.id,
                               self.program, exc.strerror)
            return Reply(451, "4.3.0", "Temporary error in the post-data hook, try again later")
        text = out.decode("utf-8", "replace")
        if code == 0:
            fields = parse_headers(text)
            if fields is None:
                self.ctx.log.warning("session=%s post-data hook output is not a header block; "
                                     "ignored: %r", session.id, text[:200])
                return None
            for name, value in fields:
                message.add_header(name, value)
            return None
        if code is None:
            self.ctx.log.warning("session=%s post-data hook timed out after %gs", session.id,
                                 self.ctx.settings.timeout)
            return Reply(451, "4.3.0", "Timeout in the post-data hook, try again later")
        self.ctx.log.info("session=%s post-data hook exited with %d: %r", session.id, code,
                          text[-200:])
        return refusal(text, permanent=code == PERMANENT_EXIT)


def refusal(output: str, *, permanent: bool) -> Reply:
    """The reply for a failed hook: its last stdout line, with its enhanced code if it has one."""
    lines = [line.strip() for line in output.replace("\r", "").split("\n") if line.strip()]
    last = _UNPRINTABLE.sub("?", lines[-1])[:300] if lines else ""
    code, status = (554, "5.7.1") if permanent else (451, "4.3.0")
    match = _ENHANCED.match(last)
    if match and match.group(1) == str(code)[0]:
        status = f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
        last = match.group(4)
    if not last:
        last = "Rejected by the post-data hook" if permanent else \
            "Temporary error in the post-data hook, try again later"
    return Reply(code, status, last)


def kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the program and whatever it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


__all__ = ["HooksPlugin", "parse_headers", "refusal", "sanitize_ehlo"]
