"""The ``Received:`` trace header the core adds to every accepted message."""

from __future__ import annotations

import email.utils
import re

from tampu.envelope import Envelope, Session

_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


def received_header(session: Session, envelope: Envelope, hostname: str,
                    queue_id: str = "") -> bytes:
    """A Received header like chasquid's: HELO, address, AUTH and TLS in comments."""
    helo = _UNSAFE.sub("_", session.helo or "unknown")[:255]
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls is not None:
        proto += "S"
    if session.auth_user:
        proto += "A"
    if envelope.smtputf8:
        proto = "UTF8" + proto if session.esmtp else proto
    lines = [f"Received: from {helo} ([{session.peer_host}])"]
    if session.auth_user:
        lines.append(f"\t(authenticated as {_UNSAFE.sub('_', session.auth_user)})")
    by = f"\tby {hostname} (tampu) with {proto}"
    if queue_id:
        by += f" id {queue_id}"
    lines.append(by)
    sender = envelope.mail_from.replace('"', "").replace("\\", "")
    tls = f"{session.tls.version} {session.tls.cipher}, " if session.tls else "plain, "
    lines.append(f"\t(over {session.listener.kind}, {tls}envelope from \"{sender}\")")
    if len(envelope.rcpt_to) == 1:
        lines.append(f"\tfor <{envelope.rcpt_to[0]}>")
    lines[-1] += ";"
    lines.append(f"\t{email.utils.formatdate(localtime=False)}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
