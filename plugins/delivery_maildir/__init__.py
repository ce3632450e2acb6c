"""``delivery_maildir``: local delivery straight into a Maildir, with no external program.

A recipient is claimed when its domain is local (``[server] local_domains`` or a
``domains/<domain>/`` folder), in ``domains`` when that list is set, and its route has no
``pipe`` (for ``delivery_mda``) nor ``via`` (for ``delivery_smtp``) hint. The user part is
normalised like the rest of tampu (``User.Name+tag`` -> ``username``), so every address
variant of a user lands in one Maildir.

Delivery follows the Maildir specification: the message is written to ``tmp/`` under a unique
name (``time.M<usec>P<pid>Q<n>.<host>,S=<size>``), fsync'd, hard-linked into ``new/`` and the
directory fsync'd before the delivery counts as done. ``Return-Path:`` and ``Delivered-To:`` are
added on top; line endings are stored as plain LF, as Maildir readers expect.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import threading
import time
from pathlib import Path

from pydantic import Field, field_validator

from tampu import (
    DeliveryResult,
    PluginContext,
    PluginSettings,
    QueueItem,
    Recipient,
    blocking,
    hookimpl,
)
from tampu.files import fsync_dir
from tampu.placeholders import check_placeholders, expand_placeholders

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

    def unique_name(self, size: int) -> str:
        with self._lock:
            n = next(self._count)
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        return f"{sec}.M{usec}P{os.getpid()}Q{n}.{self._host},S={size}"

    @staticmethod
    def ensure(maildir: Path) -> None:
        """Create the Maildir (and missing parents) with mode 0700."""
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

    def deliver(self, maildir: Path, data: bytes) -> Path:
        """Write ``data`` into ``maildir/new``; returns the new file. Raises OSError."""
        self.ensure(maildir)
        name = self.unique_name(len(data))
        tmp = maildir / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
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
            fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return final


def _header_value(value: str) -> str:
    return value.replace("\r", "").replace("\n", "")


def maildir_bytes(item: QueueItem, recipient: Recipient, message: bytes) -> bytes:
    """The message as stored: Return-Path and Delivered-To on top, LF line endings."""
    top = (f"Return-Path: <{_header_value(item.mail_from)}>\n"
           f"Delivered-To: {_header_value(recipient.address)}\n")
    return top.encode("utf-8", "surrogateescape") + message.replace(b"\r\n", b"\n")


class MaildirPlugin:
    Settings = MaildirSettings

    def __init__(self, ctx: PluginContext[MaildirSettings]) -> None:
        self.ctx = ctx
        self.writer = MaildirWriter()

    def maildir_for(self, address: str) -> Path | None:
        """The Maildir of a local ``address``, or None when its user part is unusable."""
        user, domain = self.ctx.server.mailbox_of(address)
        if not (safe_component(user) and safe_component(domain)):
            return None
        relative = expand_placeholders(self.ctx.settings.path, {"user": user, "domain": domain})
        return self.ctx.server.data_dir / relative

    def claims(self, recipient: Recipient) -> bool:
        return self.ctx.server.is_local_mailbox(recipient, self.ctx.settings.domains)

    @hookimpl
    def delivery_route(self, item: QueueItem, recipient: Recipient) -> str | None:
        if not self.claims(recipient):
            return None
        maildir = self.maildir_for(recipient.address)
        return f"Maildir {maildir}" if maildir else "no usable mailbox name: a failure"

    @hookimpl
    @blocking
    def deliver(self, item: QueueItem, recipient: Recipient,
                message: bytes) -> DeliveryResult | None:
        if not self.claims(recipient):
            return None
        maildir = self.maildir_for(recipient.address)
        if maildir is None:
            return DeliveryResult.permanent(
                f"no usable mailbox name for <{recipient.address}>", remote="maildir")
        try:
            path = self.writer.deliver(maildir, maildir_bytes(item, recipient, message))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            self.ctx.log.error("qid=%s to=<%s>: cannot write to %s: %s", item.id,
                               recipient.address, maildir, reason)
            return DeliveryResult.temporary(f"cannot write to the mailbox: {reason}",
                                            remote="maildir")
        self.ctx.log.debug("qid=%s to=<%s> stored as %s", item.id, recipient.address, path)
        return DeliveryResult.sent("delivered to Maildir", remote="maildir")
