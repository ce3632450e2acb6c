"""``delivery_maildir``: local delivery straight into a Maildir, with no external program.

A recipient is claimed when its domain is local (``[server] local_domains`` or a
``domains/<domain>/`` folder), in ``domains`` when that list is set, and its route has no
``pipe`` (for ``delivery_mda``) nor ``via`` (for ``delivery_smtp``) hint. The user part is
normalised like the rest of tampu (``User.Name+tag`` -> ``username``), so every address
variant of a user lands in one Maildir.

Delivery follows the Maildir specification: the message is written to ``tmp/`` under a unique
name (``time.M<usec>P<pid>Q<n>.<host>,S=<size>``) and hard-linked into ``new/``. It is durable
before the queue forgets the item: with the filesystem store's log, the store makes it so
(:meth:`tampu.store_files.FilesystemStore.defer_sync`: one ``syncfs`` at its next checkpoint
covers every delivery since the last one, and until then the item's log record stays, so a
power loss repeats the delivery rather than losing it); with any other store the file is
fsync'd before the link and the directory after it. ``Return-Path:`` and ``Delivered-To:`` are
added on top; line endings are stored as plain LF, as Maildir readers expect.

All recipients of one item are written in one job (``deliver_batch``), and the jobs of all
items go to one writer thread in batches (one hand-over per event-loop iteration).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field, field_validator

from tampu import (
    DeliveryResult,
    PluginContext,
    PluginSettings,
    QueueItem,
    Recipient,
    hookimpl,
)
from tampu.files import BatchThread, fsync_dir
from tampu.placeholders import check_placeholders, expand_placeholders
from tampu.store_files import INLINE_BYTES

PLACEHOLDERS = frozenset({"user", "domain"})


class MaildirSettings(PluginSettings):
    path: str = Field(
        default="mail/%domain%/%user%",
        description="Maildir of a recipient. %user% is the normalised user part (no +tag, "
        "lower case), %domain% the domain. Relative paths are relative to the data directory.",
    )
    domains: list[str] = Field(
        default_factory=list,
        description="Deliver only for these local domains; empty: every local domain.",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        check_placeholders(value, PLACEHOLDERS)
        if "%user%" not in value:
            raise ValueError("must contain %user%, or every user shares one Maildir")
        return value

    @field_validator("domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [d.lower() for d in value]


def safe_component(value: str) -> bool:
    """Whether ``value`` can be used as one path component without escaping its folder."""
    return bool(value) and value not in (".", "..") and not any(c in value for c in "/\0")


def _unique_host() -> str:
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072")


class MaildirWriter:
    """Writes messages into Maildirs; safe to call from several threads at once."""

    def __init__(self) -> None:
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self._host = _unique_host()
        self._ready: set[Path] = set()
        """Maildirs known to exist (checked again when a write there fails)."""

    def unique_name(self, size: int) -> str:
        with self._lock:
            n = next(self._count)
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{n}.{self._host},S={size}"

    def ensure(self, maildir: Path) -> None:
        """Create the Maildir (and missing parents) with mode 0700."""
        if maildir in self._ready:
            return
        missing = []
        for folder in (maildir, *maildir.parents):
            if folder.is_dir():
                break
            missing.append(folder)
        for folder in reversed(missing):
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                pass
        for sub in ("tmp", "new", "cur"):
            try:
                (maildir / sub).mkdir(mode=0o700)
            except FileExistsError:
                pass
        with self._lock:
            if len(self._ready) > 10_000:
                self._ready.clear()
            self._ready.add(maildir)

    def deliver(self, maildir: Path, data: bytes | list[bytes], sync: bool = True) -> Path:
        """Write ``data`` (bytes, or chunks written one after the other) into
        ``maildir/new``; returns the new file. ``sync``: fsync the file before the link and
        the directory after it (False: the caller makes it durable). Raises OSError."""
        chunks = [data] if isinstance(data, bytes) else data
        try:
            return self._deliver(maildir, chunks, sync)
        except FileNotFoundError:  # the Maildir went away since it was checked: once more
            with self._lock:
                self._ready.discard(maildir)
            return self._deliver(maildir, chunks, sync)

    def _deliver(self, maildir: Path, chunks: list[bytes], sync: bool) -> Path:
        self.ensure(maildir)
        name = self.unique_name(sum(len(c) for c in chunks))
        tmp = maildir / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                pending = [memoryview(c) for c in chunks if c]
                while pending:
                    n = os.writev(fd, pending)
                    while n and pending:
                        if n >= len(pending[0]):
                            n -= len(pending[0])
                            pending.pop(0)
                        else:
                            pending[0], n = pending[0][n:], 0
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            final = maildir / "new" / name
            try:
                os.link(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                    raise
                if final.exists():  # no hard links here: rename, never over another message
                    raise FileExistsError(errno.EEXIST, "Maildir name clash", str(final)) from exc
                os.rename(tmp, final)
            if sync:
                fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return final


_WRITER_THREAD = BatchThread("tampu-maildir", inline=True)
"""One writer thread per process, for every configuration's Maildir plugin. Writes that the
queue makes durable (no fsync here) run on the event loop itself while they are quick: in a
thread each system call would wait for the GIL, which a busy loop gives up only every switch
interval, and delivery would fall behind reception."""


def _header_value(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")


def maildir_top(item: QueueItem, recipient: Recipient) -> bytes:
    """What goes on top of the message in the Maildir: Return-Path and Delivered-To."""
    return (f"Return-Path: <{_header_value(item.mail_from)}>\n"
            f"Delivered-To: {_header_value(recipient.address)}\n").encode(
                "utf-8", "surrogateescape")


Write = tuple[Recipient, Path | None, bytes]
"""One recipient's delivery: its Maildir (None: no usable name) and the top lines."""


class MaildirPlugin:
    Settings = MaildirSettings

    def __init__(self, ctx: PluginContext[MaildirSettings]) -> None:
        self.ctx = ctx
        self.writer = MaildirWriter()
        self._lazy: dict[Path, bool] = {}
        """Maildir -> whether the store made its last delivery durable (no fsync here)."""
        self.data_dir = ctx.server.data_dir  # resolved once (it resolves the path each time)

    def maildir_for(self, address: str) -> Path | None:
        """The Maildir of a local ``address``, or None when its user part is unusable."""
        user, domain = self.ctx.server.mailbox_of(address)
        if not (safe_component(user) and safe_component(domain)):
            return None
        relative = expand_placeholders(self.ctx.settings.path, {"user": user, "domain": domain})
        return self.data_dir / relative

    def claims(self, recipient: Recipient) -> bool:
        return self.ctx.server.is_local_mailbox(recipient, self.ctx.settings.domains)

    @hookimpl
    def delivery_route(self, item: QueueItem, recipient: Recipient) -> str | None:
        if not self.claims(recipient):
            return None
        maildir = self.maildir_for(recipient.address)
        return f"Maildir {maildir}" if maildir else "no usable mailbox name: a failure"

    @hookimpl
    async def deliver_batch(self, item: QueueItem, recipients: list[Recipient],
                            message: bytes) -> list[tuple[Recipient, DeliveryResult]] | None:
        writes: list[Write] = [(r, self.maildir_for(r.address), maildir_top(item, r))
                               for r in recipients if self.claims(r)]
        if not writes:
            return None
        lazy = self._lazy
        inline = len(message) <= INLINE_BYTES and all(
            lazy.get(m, False) for _r, m, _t in writes if m is not None)
        return await _WRITER_THREAD.submit(self._write, item, writes, message,
                                           self.ctx.server.store.defer_sync, inline=inline)

    def _write(self, item: QueueItem, writes: list[Write], message: bytes,
               defer: Callable[[str, Path], bool]) -> list[tuple[Recipient, DeliveryResult]]:
        """In the writer thread: every recipient's file; one result each."""
        body = message.replace(b"\r\n", b"\n")
        out = []
        for rcpt, maildir, top in writes:
            if maildir is None:
                out.append((rcpt, DeliveryResult.permanent(
                    f"no usable mailbox name for <{rcpt.address}>", remote="maildir")))
                continue
            try:
                self.writer.ensure(maildir)
                lazy = defer(item.id, maildir)
                if len(self._lazy) > 10_000:
                    self._lazy.clear()
                self._lazy[maildir] = lazy
                path = self.writer.deliver(maildir, [top, body], sync=not lazy)
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                self.ctx.log.error("qid=%s to=<%s>: cannot write to %s: %s", item.id,
                                   rcpt.address, maildir, reason)
                out.append((rcpt, DeliveryResult.temporary(
                    f"cannot write to the mailbox: {reason}", remote="maildir")))
                continue
            if self.ctx.log.isEnabledFor(10):
                self.ctx.log.debug("qid=%s to=<%s> stored as %s", item.id, rcpt.address, path)
            out.append((rcpt, DeliveryResult.sent("delivered to Maildir", remote="maildir")))
        return out
