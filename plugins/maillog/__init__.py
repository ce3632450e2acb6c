"""``maillog``: one line per mail event, for humans and log tools (after chasquid's maillog).

Events: ``auth`` (each AUTH answer), ``queued`` / ``rejected`` (each transaction that reached
DATA), ``sent`` / ``failed`` (each delivery attempt) and ``done`` (an item left the queue).
Each line has the queue ID where there is one, the sender, the recipients, the client address,
its TLS and AUTH state and the reply. Passwords and message bodies are never logged.

Lines go to a file (``path``, relative to the data directory; reopened when logrotate moves it)
or to syslog (facility mail), as ``text`` or ``json``. Writing happens in a thread: the lines of
one event-loop iteration are handed over at once, and a file gets them in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tampu import (
    DeliveryResult,
    Envelope,
    PluginContext,
    PluginSettings,
    QueueItem,
    Recipient,
    Reply,
    ServerContext,
    Session,
    StashKey,
    hookimpl,
)
from tampu.envelope import Verdict
from tampu.files import drain_into

log = logging.getLogger("tampu.plugins.maillog")


HAND_OVER_EVERY = 0.05
"""Seconds the lines of the event loop gather before they go to the writer thread in one
hand-over (one thread wake-up, one write): a few per message under load would cost a GIL
switch each. Stopping hands the rest over; a crash may lose this much of the log."""

class MailLogSettings(PluginSettings):
    path: str = Field(default="mail.log", description="The mail log file, relative to the data "
                      "directory (absolute paths are kept). Ignored with syslog = true.")
    syslog: bool = Field(default=False, description="Send the lines to syslog (facility mail, "
                         "tag tampu) instead of the file.")
    syslog_socket: str = Field(default="/dev/log", description="The syslog socket; it must "
                               "exist when syslog = true.")
    format: Literal["text", "json"] = Field(default="text", description="text: one readable "
                                            "line per event; json: one JSON object per line.")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _clean(value: str) -> str:
    """No line breaks or control characters from the network into the log."""
    return _CONTROL.sub(" ", value)


def _client(session: Session) -> str:
    host = session.peer_host
    return f"[{host}]:{session.peer_port}" if ":" in host else f"{host}:{session.peer_port}"


class MailLog:
    """The output: lines handed to a writer thread, which writes them (file or syslog) in
    batches. The event loop only formats a line and queues it; the lines of one loop
    iteration go to the thread at once (one wake-up)."""

    def __init__(self, settings: MailLogSettings, data_dir: Path) -> None:
        self.settings = settings
        self.path = data_dir / settings.path
        self.queue: queue.SimpleQueue[list[tuple[float, str]] | None] = queue.SimpleQueue()
        self._pending: list[tuple[float, str]] = []
        self._scheduled = False
        self.handler: logging.Handler | None = None
        self.thread: threading.Thread | None = None
        self.failing = False
        self._second = -1
        self._date = ""

    def open(self) -> None:
        """Open the file or the syslog socket (blocking: run in a thread). Raises OSError."""
        target: logging.Handler
        if self.settings.syslog:
            if not os.path.exists(self.settings.syslog_socket):
                raise OSError(f"maillog: syslog socket {self.settings.syslog_socket} does not "
                              "exist (is a syslog daemon running?)")
            target = logging.handlers.SysLogHandler(
                self.settings.syslog_socket, facility=logging.handlers.SysLogHandler.LOG_MAIL)
            target.setFormatter(logging.Formatter("tampu: %(message)s"))
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # reopened when logrotate moves the file away
            target = logging.handlers.WatchedFileHandler(self.path, encoding="utf-8")
            # (its lines are formatted by _write: the time as logging.Formatter's default)
        target.handleError = self._failed  # type: ignore[method-assign]
        self.handler = target
        self.thread = threading.Thread(target=self._write_lines, name="tampu-maillog",
                                       daemon=True)
        self.thread.start()

    def _failed(self, record: logging.LogRecord) -> None:
        """A line could not be written (disk full, syslog gone): one error line, not a
        traceback per line; writing resumes by itself when it works again."""
        if not self.failing:
            self.failing = True
            error = sys.exc_info()[1]
            log.error("maillog: cannot write to %s: %s; mail-log lines are lost until it "
                      "works again", "syslog" if self.settings.syslog else self.path,
                      getattr(error, "strerror", None) or error)

    def _write_lines(self) -> None:
        assert self.handler is not None
        while True:
            batch = self.queue.get()
            if batch is None:
                return
            stop = drain_into(self.queue, batch)  # whatever else waits goes in the same write
            was_failing = self.failing
            try:
                self._write(batch)
            except Exception:  # a bug: this batch is lost, not the writer
                log.exception("maillog: lines lost")
            if was_failing and self.failing and self._wrote():
                self.failing = False
                log.warning("maillog: writing to %s again", self.path)
            if stop:
                return

    @staticmethod
    def _record(created: float, line: str) -> logging.LogRecord:
        record = logging.LogRecord("tampu.maillog", logging.INFO, "", 0, line, None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        return record

    def _stamp(self, created: float) -> str:
        """``logging.Formatter``'s default time (``2026-12-01 09:30:01,042``), the
        ``strftime`` made once per second."""
        second = int(created)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._date},{int((created - second) * 1000):03d} "

    def _write(self, batch: list[tuple[float, str]]) -> None:
        """A file gets the batch in one write; syslog one datagram per line."""
        handler = self.handler
        assert handler is not None
        if not isinstance(handler, logging.handlers.WatchedFileHandler):
            for created, line in batch:
                handler.handle(self._record(created, line))
            return
        if self.settings.format == "json":
            text = "".join(line + "\n" for _, line in batch)
        else:
            text = "".join(self._stamp(created) + line + "\n" for created, line in batch)
        with handler.lock or contextlib.nullcontext():
            try:
                handler.reopenIfNeeded()  # one stat per batch, not per line
                if handler.stream is None:
                    handler.stream = handler._open()
                    handler._statstream()
                handler.stream.write(text)
                handler.stream.flush()
            except Exception:  # noqa: BLE001 - reported once by _failed
                handler.handleError(self._record(*batch[0]))
                # Drop the file and the lines it could not take: kept, they would fail
                # every later flush, and logging's reopen after a rotation with them.
                stream, handler.stream = handler.stream, None
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def _wrote(self) -> bool:
        """After a failure: whether the stream takes lines again (flushes it)."""
        stream = getattr(self.handler, "stream", None)
        try:
            if stream is not None:
                stream.flush()
            return True
        except OSError:
            return False

    def close(self) -> None:
        """Write what is pending and close (blocking: run in a thread)."""
        self.hand_over()
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(10)
            self.thread = None
        if self.handler is not None:
            self.handler.close()
            self.handler = None

    def event(self, event: str, text: str, fields: dict[str, Any]) -> None:
        now = time.time()
        if self.settings.format == "json":
            stamp = datetime.datetime.fromtimestamp(now, datetime.UTC)
            line = json.dumps({"time": stamp.isoformat(timespec="milliseconds"),
                               "event": event, **fields}, ensure_ascii=False)
        else:
            line = _clean(text)
        # whatever came from the network, the line can be encoded
        self._pending.append((now, line.encode("utf-8", "backslashreplace").decode("utf-8")))
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the event loop: at once
                self.hand_over()
                return
            self._scheduled = True
            loop.call_later(HAND_OVER_EVERY, self.hand_over)

    def hand_over(self) -> None:
        """Give the lines formatted so far to the writer thread."""
        self._scheduled = False
        batch, self._pending = self._pending, []
        if batch:
            self.queue.put(batch)


MAILLOG: StashKey[MailLog] = StashKey()


def _reply(reply: Reply) -> dict[str, Any]:
    return {"code": reply.code, "status": reply.status, "text": reply.text}


def _session_fields(session: Session) -> dict[str, Any]:
    return {"ip": session.peer_host, "port": session.peer_port,
            "listener": session.listener.name, "helo": session.helo,
            "tls": session.tls.version if session.tls else None, "auth": session.auth_user}


class MailLogPlugin:
    Settings = MailLogSettings

    def __init__(self, ctx: PluginContext[MailLogSettings]) -> None:
        self.ctx = ctx
        self.log: MailLog | None = None

    # ---------------------------------------------------------------- lifecycle

    @hookimpl
    async def tampu_startup(self, context: ServerContext) -> None:
        mlog = MailLog(self.ctx.settings, context.data_dir)
        await asyncio.to_thread(mlog.open)
        context.stash[MAILLOG] = mlog
        self.log = mlog

    @hookimpl
    async def tampu_reload(self, context: ServerContext) -> None:
        old = context.stash.get(MAILLOG, None)
        if old is not None and old.settings == self.ctx.settings and \
                old.path == context.data_dir / self.ctx.settings.path:
            self.log = old  # same output: keep it (a rotated file is reopened anyway)
            return
        await self.tampu_startup(context)
        if old is not None:
            await asyncio.to_thread(old.close)

    @hookimpl
    async def tampu_shutdown(self, context: ServerContext) -> None:
        if self.log is not None:
            await asyncio.to_thread(self.log.close)
            if context.stash.get(MAILLOG, None) is self.log:
                del context.stash[MAILLOG]

    # ---------------------------------------------------------------- events

    @hookimpl
    def smtp_auth_result(self, session: Session, login: str, success: bool,
                         reason: str) -> None:
        if self.log is None:
            return
        outcome = "succeeded" if success else "failed"
        why = f" ({reason})" if reason and not success else ""
        self.log.event("auth", f"{_client(session)} auth {outcome} for {login}{why}",
                       {**_session_fields(session), "login": login, "success": success,
                        "reason": reason})

    @hookimpl
    def smtp_transaction_done(self, session: Session, envelope: Envelope, reply: Reply,
                              queue_id: str | None) -> None:
        if self.log is None:
            return
        to = ", ".join(f"<{r}>" for r in envelope.rcpt_to)
        who = session.auth_user or (f"local:{session.local_user}" if session.local_user else "-")
        state = f"tls={session.tls.version if session.tls else 'no'} auth={who}"
        fields = {**_session_fields(session), "qid": queue_id, "from": envelope.mail_from,
                  "to": list(envelope.rcpt_to), "reply": _reply(reply)}
        if queue_id is not None:
            self.log.event("queued", f"{queue_id} from=<{envelope.mail_from}> queued "
                           f"ip={_client(session)} to=[{to}] {state} reply={str(reply)!r}",
                           fields)
        else:
            self.log.event("rejected", f"{_client(session)} rejected "
                           f"from=<{envelope.mail_from}> to=[{to}] {state} - {reply}", fields)

    @hookimpl
    def smtp_verdict(self, session: Session, envelope: Envelope | None,
                     verdict: Verdict) -> None:
        """A refusal before DATA (connect, HELO, MAIL, RCPT): who refused whom, and how.
        Refusals at DATA are the transaction's own line; failed AUTH is an auth line."""
        if self.log is None or not verdict.refused or verdict.stage in ("data", "auth"):
            return
        address = verdict.address
        if verdict.stage in ("mail", "rcpt") and address and not address.startswith("<"):
            address = f"<{address}>"  # a refused path comes as it was written
        about = f" {address}" if address else ""
        sender = f" from=<{envelope.mail_from}>" if envelope is not None and \
            verdict.stage == "rcpt" else ""
        self.log.event("refused", f"{_client(session)} refused {verdict.stage.upper()}"
                       f"{about}{sender} by {verdict.plugin} - {verdict.reply}", {
                           **_session_fields(session), "stage": verdict.stage,
                           "address": verdict.address, "plugin": verdict.plugin,
                           "from": envelope.mail_from if envelope is not None else None,
                           "reply": _reply(verdict.reply)})

    @hookimpl
    def delivery_attempted(self, item: QueueItem, recipient: Recipient,
                           result: DeliveryResult, backend: str) -> None:
        if self.log is None:
            return
        head = f"{item.id} from=<{item.mail_from}> to=<{recipient.address}>"
        if recipient.original != recipient.address:
            head += f" orig_to=<{recipient.original}>"
        remote = f" backend={backend}" + (f" remote={result.remote!r}" if result.remote else "")
        if result.status == "sent":
            text = f"{head} sent{remote} reply={result.text!r}"
        else:
            code = " ".join(x for x in (str(result.code or ""), result.enhanced) if x)
            text = f"{head} failed ({result.status}){remote}: {code + ' ' if code else ''}" \
                f"{result.text}"
        self.log.event("sent" if result.status == "sent" else "failed", text, {
            "qid": item.id, "from": item.mail_from, "to": recipient.address,
            "orig_to": recipient.original, "attempt": recipient.attempts,
            "status": result.status, "code": result.code, "enhanced": result.enhanced,
            "text": result.text, "remote": result.remote, "backend": backend,
            "origin": item.origin})

    @hookimpl
    def queue_done(self, item: QueueItem) -> None:
        if self.log is None:
            return
        sent = sum(r.status == "sent" for r in item.recipients)
        failed = len(item.failed)
        self.log.event("done", f"{item.id} from=<{item.mail_from}> all done: {sent} sent, "
                       f"{failed} failed", {"qid": item.id, "from": item.mail_from,
                                            "sent": sent, "failed": failed})
