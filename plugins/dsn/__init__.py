"""``dsn``: delivery status notifications (bounces) as RFC 3464 ``multipart/report`` messages.

The core calls ``make_dsn`` when a notification is due, never for the null sender ``<>``:
``failed`` once per item with recipients that failed (permanently, or still pending when
``[server] give_up_after`` ran out) unless they asked for NOTIFY=NEVER; ``delayed`` once for
recipients that asked for NOTIFY=DELAY and are still pending after ``[server]
delay_warning_after``; ``delivered`` for recipients that asked for NOTIFY=SUCCESS (RFC 3461).
The message returned here is queued by the core from ``<>`` to the original sender, with
origin ``dsn``. It has three parts:

1. ``text/plain``: for people, which recipients failed (or are late, or arrived) and why;
2. ``message/delivery-status``: for programs (RFC 3464): ``Original-Envelope-Id`` (ENVID),
   then one block per recipient with ``Original-Recipient`` (ORCPT, or the address given at
   RCPT TO), ``Action`` (failed, delayed, delivered), ``Status`` (the backend's enhanced
   code; else ``5.0.0`` for a permanent failure, ``4.4.7`` for a give-up), ``Remote-MTA`` and
   ``Diagnostic-Code`` when a remote server answered;
3. the original message: its headers (``text/rfc822-headers``), or all of it
   (``message/rfc822``) when the sender asked for RET=FULL and it is small enough.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from email import policy
from email.charset import QP, Charset
from email.headerregistry import Address
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from email.utils import format_datetime, formatdate, make_msgid

from pydantic import Field

from tampu import PluginContext, PluginSettings, QueueItem, Recipient, hookimpl

_STATUS_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
PERMANENT_STATUS = "5.0.0"
TIMED_OUT_STATUS = "4.4.7"
_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP


class DsnSettings(PluginSettings):
    from_name: str = Field(default="Mail Delivery System", description="Display name of the "
                           "DSN's From: (the address is MAILER-DAEMON@<server hostname>).")
    max_headers_size: int = Field(default=64 * 1024, gt=0, description="Bytes of the original "
                                  "message's headers to include at most.")
    max_returned_size: int = Field(default=1024 * 1024, ge=0, description="Largest original "
                                   "message returned whole when the sender asked for RET=FULL; "
                                   "bigger ones are returned as headers only.")


def timed_out(item: QueueItem, rcpt: Recipient) -> bool:
    """Whether the recipient failed because the core gave up (not by a permanent error)."""
    if rcpt.address in item.extra.get("timed_out", ()):
        return True
    return rcpt.last_code is not None and 400 <= rcpt.last_code < 500


def status_of(item: QueueItem, rcpt: Recipient) -> str:
    """The RFC 3463 status for a failed recipient: the backend's, else 4.4.7 or 5.0.0."""
    if _STATUS_RE.match(rcpt.last_enhanced or ""):
        return rcpt.last_enhanced
    return TIMED_OUT_STATUS if timed_out(item, rcpt) else PERMANENT_STATUS


def remote_mta(rcpt: Recipient) -> str:
    """The remote server's name, when an SMTP server answered (``mx.example [ip]`` -> name)."""
    if rcpt.last_code is None or not rcpt.last_remote:
        return ""
    return rcpt.last_remote.split()[0]


def diagnostic(rcpt: Recipient) -> str:
    """``550 5.1.1 text`` when a remote server answered, else ""."""
    if rcpt.last_code is None:
        return ""
    text = " ".join(rcpt.last_error.split())
    enhanced = rcpt.last_enhanced
    if enhanced and not text.startswith(enhanced):
        text = f"{enhanced} {text}"
    return f"{rcpt.last_code} {text}".strip()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def address_field(address: str) -> str:
    """``rfc822; addr``, or RFC 6533's ``utf-8; addr`` with ``\\x{HEX}`` for non-ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    return "utf-8; " + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)


class DsnPlugin:
    Settings = DsnSettings

    def __init__(self, ctx: PluginContext[DsnSettings]) -> None:
        self.ctx = ctx

    @hookimpl
    def make_dsn(self, item: QueueItem, failed: list[Recipient], message: bytes,
                 action: str) -> bytes | None:
        if not item.mail_from or not failed:
            return None  # the core never asks for <>; be safe anyway
        return build_dsn(item, failed, message, hostname=self.ctx.server.hostname,
                         from_name=self.ctx.settings.from_name,
                         give_up_after=self.ctx.server.config.server.give_up_after,
                         max_headers=self.ctx.settings.max_headers_size, action=action,
                         max_full=self.ctx.settings.max_returned_size)


def original_headers(message: bytes, limit: int) -> bytes:
    """The header section of ``message`` (without the blank line), cut at ``limit`` bytes."""
    end = len(message)
    for sep in (b"\r\n\r\n", b"\n\n"):
        pos = message.find(sep)
        if pos != -1:
            end = min(end, pos + len(sep) // 2)
    head = message[:end]
    if len(head) > limit:
        head = head[:limit]
        head = head[: head.rfind(b"\n") + 1] if b"\n" in head else b""
    return head


_INTRO = {
    "failed": "Your message could not be delivered to the following recipient(s):",
    "delayed": "Your message has not been delivered yet to the following recipient(s); "
               "delivery is still being attempted, and you need not send it again:",
    "delivered": "Your message was delivered to the following recipient(s), as you asked:",
}


def human_text(item: QueueItem, failed: list[Recipient], hostname: str,
               give_up_after: float, action: str = "failed") -> str:
    lines = [f"This is the mail system at {hostname}.", "", _INTRO[action], ""]
    if action != "failed":
        for rcpt in failed:
            lines.append(f"  <{rcpt.address}>")
            if action == "delayed" and rcpt.last_error:
                lines.append(f"    the last attempt said: {_one_line(rcpt.last_error)}")
        lines += ["", "The headers of your message are attached.", ""]
        return "\n".join(lines)
    hours = give_up_after / 3600
    span = f"{hours:g} hours" if hours >= 1 else f"{give_up_after:g} seconds"
    for rcpt in failed:
        sent_to = "" if rcpt.original == rcpt.address else f" (sent to <{rcpt.original}>)"
        lines.append(f"  <{rcpt.address}>{sent_to}")
        error = _one_line(rcpt.last_error) or "unknown error"
        if timed_out(item, rcpt):
            lines.append(f"    Delivery kept failing for {span}; the last error was:")
        else:
            lines.append("    The delivery failed permanently:")
        remote = f" (answer from {rcpt.last_remote})" if rcpt.last_remote else ""
        code = diagnostic(rcpt) or error
        lines.append(f"    {code}{remote}")
        lines.append("")
    lines += [
        "The headers of your message are attached. Please check the address(es), or",
        "contact the recipient by other means.",
        "",
    ]
    return "\n".join(lines)


def delivery_status(item: QueueItem, failed: list[Recipient], hostname: str,
                    action: str = "failed", give_up_after: float = 0.0) -> Message:
    """The ``message/delivery-status`` part: per-message fields, then one block per recipient."""
    part = Message()
    part["Content-Type"] = "message/delivery-status"
    blocks: list[Message | str] = []
    per_message = Message()
    if item.dsn_envid:
        per_message["Original-Envelope-Id"] = item.dsn_envid
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Tampu-Queue-ID"] = item.id
    per_message["Arrival-Date"] = format_datetime(datetime.fromtimestamp(item.created).astimezone())
    blocks.append(per_message)
    for rcpt in failed:
        block = Message()
        block["Original-Recipient"] = rcpt.orcpt or address_field(rcpt.original)
        block["Final-Recipient"] = address_field(rcpt.address)
        block["Action"] = action
        block["Status"] = ("2.0.0" if action == "delivered" else
                           rcpt.last_enhanced if action == "delayed" and
                           _STATUS_RE.match(rcpt.last_enhanced or "") and
                           rcpt.last_enhanced[0] == "4" else
                           "4.0.0" if action == "delayed" else status_of(item, rcpt))
        if action == "delayed" and give_up_after:
            block["Will-Retry-Until"] = format_datetime(datetime.fromtimestamp(
                item.created + give_up_after).astimezone())
        mta = remote_mta(rcpt)
        if mta:
            block["Remote-MTA"] = f"dns; {mta}"
        diag = diagnostic(rcpt).encode("ascii", "replace").decode()
        if diag:
            block["Diagnostic-Code"] = f"smtp; {diag}"
        blocks.append(block)
    part.set_payload(blocks)
    return part


def build_dsn(item: QueueItem, failed: list[Recipient], message: bytes, *, hostname: str,
              from_name: str = "Mail Delivery System", give_up_after: float = 72000.0,
              max_headers: int = 64 * 1024, action: str = "failed",
              max_full: int = 1024 * 1024) -> bytes:
    """The DSN for ``failed`` recipients of ``item`` as bytes with CRLF line ends."""
    head = original_headers(message, max_headers)
    parsed = BytesHeaderParser(policy=policy.default).parsebytes(head + b"\r\n")
    try:
        subject = _one_line(str(parsed.get("Subject", "") or ""))
    except (ValueError, IndexError):  # a broken encoded word: quote nothing rather than fail
        subject = ""
    report = MIMEMultipart("report", policy=policy.SMTP, report_type="delivery-status")
    report["From"] = str(Address(display_name=from_name, username="MAILER-DAEMON",
                                 domain=hostname))
    report["To"] = f"<{item.mail_from}>"
    title = {"failed": "Undelivered mail", "delayed": "Delayed mail",
             "delivered": "Delivered"}[action]
    report["Subject"] = f"{title}: {subject}" if subject else title
    report["Date"] = formatdate(time.time(), localtime=True)
    report["Message-ID"] = make_msgid("dsn", domain=hostname)
    original_id = parsed.get("Message-ID")
    if original_id:
        report["In-Reply-To"] = _one_line(str(original_id))
    report["Auto-Submitted"] = "auto-replied"
    report.preamble = "This is a delivery status notification (RFC 3464)."

    text = human_text(item, failed, hostname, give_up_after, action)
    readable = MIMEText(text, "plain", policy=policy.SMTP)
    if not text.isascii():
        del readable["Content-Transfer-Encoding"]
        readable.set_payload(text, _UTF8_QP)  # readable quoted-printable rather than base64
    returned: MIMEBase
    if item.dsn_ret == "FULL" and len(message) <= max_full:
        returned = MIMEBase("message", "rfc822", policy=policy.SMTP)
        returned.set_payload(message.decode("ascii", "surrogateescape").replace("\r\n", "\n"))
        returned["Content-Transfer-Encoding"] = "7bit" if message.isascii() else "8bit"
    else:
        returned = MIMEBase("text", "rfc822-headers", policy=policy.SMTP)
        returned.set_payload(head.decode("ascii", "surrogateescape").replace("\r\n", "\n"))
        returned["Content-Transfer-Encoding"] = "7bit" if head.isascii() else "8bit"
    for part in (readable, delivery_status(item, failed, hostname, action, give_up_after),
                 returned):
        del part["MIME-Version"]
        report.attach(part)
    return report.as_bytes(policy=policy.SMTP)
