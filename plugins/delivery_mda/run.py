"""Running a delivery program: message on stdin, bounded output, timeout, exit-code mapping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tampu import DeliveryResult

EX_TEMPFAIL = 75
"""sysexits.h: a temporary failure; the message stays queued and is retried."""

OUTPUT_KEPT = 4096
"""Bytes of the program's output kept (the rest is read and dropped)."""

OUTPUT_SHOWN = 200
"""Bytes of the program's output quoted in the result text."""

ENV_PASSED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
"""Variables of tampu's own environment the program inherits (not secrets given by $env)."""

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a program run ended: exit status (negative: killed by that signal) or timeout."""

    returncode: int | None
    output: bytes
    timed_out: bool = False
    error: str = ""
    """Set when the program could not be started (not found, not executable)."""


def base_environment() -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    return env


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def run_program(argv: Sequence[str], data: bytes, *, env: Mapping[str, str],
                      limit: float, cwd: Path | None = None) -> Outcome:
    """Run ``argv`` (never through a shell) with ``data`` on stdin.

    After ``limit`` seconds, or if the delivery is cancelled, the program's whole process group
    is killed (it runs in its own session), children of a shell included. ``cwd`` must exist.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=dict(env),
            cwd=cwd, start_new_session=True,
        )
    except OSError as exc:
        return Outcome(None, b"", error=f"cannot run {argv[0]}: {exc.strerror or exc}")
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def feed() -> None:
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            # the program stopped reading (uvloop: RuntimeError, the pipe's handler is
            # closed once the program exited): its exit status tells what happened
            pass
        finally:
            stdin.close()

    async def collect() -> bytes:
        kept = bytearray()
        while chunk := await stdout.read(65536):
            if len(kept) < OUTPUT_KEPT:
                kept += chunk[: OUTPUT_KEPT - len(kept)]
        return bytes(kept)

    try:
        async with asyncio.timeout(limit):
            _, output, returncode = await asyncio.gather(feed(), collect(), proc.wait())
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        return Outcome(None, b"", timed_out=True)
    finally:
        if proc.returncode is None:  # cancelled from outside: never leave the program behind
            _kill_group(proc)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
    return Outcome(returncode, output)


def excerpt(output: bytes, limit: int = OUTPUT_SHOWN) -> str:
    """The first ``limit`` bytes of a program's output, on one line."""
    text = output[:limit].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text + (" ..." if len(output) > limit else "")


def result_of(outcome: Outcome, what: str, remote: str, timeout: float) -> DeliveryResult:
    """Map a run to a delivery result: 0 sent, 75 or a signal temporary, else permanent."""
    if outcome.error:
        return DeliveryResult.temporary(outcome.error, remote=remote)
    if outcome.timed_out:
        return DeliveryResult.temporary(f"{what} timed out after {timeout:g}s and was killed",
                                        remote=remote)
    rc = outcome.returncode
    assert rc is not None
    said = excerpt(outcome.output)
    tail = f": {said}" if said else ""
    if rc == 0:
        return DeliveryResult.sent(f"delivered by {what}", remote=remote)
    if rc == EX_TEMPFAIL:
        return DeliveryResult.temporary(f"{what} exited with status 75 (temporary failure)"
                                        f"{tail}", remote=remote)
    if rc < 0:
        return DeliveryResult.temporary(f"{what} was killed by signal {-rc}{tail}",
                                        remote=remote)
    return DeliveryResult.permanent(f"{what} exited with status {rc}{tail}", remote=remote)
