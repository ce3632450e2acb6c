"""The ``Received:`` trace header the core adds to every accepted message (chasquid's style).

Mail from the outside shows the client's address (canonical) and its HELO name; for an
authenticated submission only the HELO name is shown: the user's address and login stay
private, as chasquid does. Mail from a local program (``tampu sendmail``) names the local user,
as Postfix's ``(from userid N)`` does.
"""

from __future__ import annotations

import email.utils
import re
import time

from tampu.authres import header_value, results
from tampu.envelope import Envelope, Message, Session

_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_date: tuple[int, str] = (0, "")
"""The last second formatted (RFC 5322 date, UTC) and its text."""


def _date_now() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, email.utils.formatdate(now, localtime=False))
    return _date[1]


def received_header(session: Session, envelope: Envelope, hostname: str,
                    queue_id: str = "") -> bytes:
    helo = _UNSAFE.sub("_", session.helo or "unknown")[:255]
    proto = "ESMTP" if session.esmtp else "SMTP"
    if session.tls is not None:
        proto += "S"
    if session.auth_user:
        proto += "A"
    if envelope.smtputf8 and session.esmtp:
        proto = "UTF8" + proto
    if session.local_user is not None:
        lines = [f"Received: from local user {_UNSAFE.sub('_', session.local_user)[:64]}"]
    elif session.auth_user:
        lines = [f"Received: from {helo}"]
    else:
        lines = [f"Received: from [{session.peer_host}] ({helo})"]
    by = f"\tby {hostname} (tampu) with {proto}"
    if queue_id:
        by += f" id {queue_id}"
    lines.append(by)
    tls = f"{session.tls.version} {session.tls.cipher}" if session.tls else "plain"
    sender = envelope.mail_from.replace('"', "").replace("\\", "")
    lines.append(f'\t(over {session.listener.kind}, {tls}, envelope from "{sender}")')
    if len(envelope.rcpt_to) == 1 and not session.auth_user:
        lines.append(f"\tfor <{envelope.rcpt_to[0]}>")
    lines[-1] += ";"
    lines.append(f"\t{_date_now()}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def trace_headers(session: Session, envelope: Envelope, message: Message, hostname: str,
                  queue_id: str) -> bytes:
    """What goes on top of an accepted message: Received, the one Authentication-Results of
    this server, then the headers plugins added in ``smtp_data``."""
    top = received_header(session, envelope, hostname, queue_id)
    found = results(envelope)
    if found:
        top += f"Authentication-Results: {header_value(hostname, found)}\r\n".encode(
            "utf-8", "replace")
    return top + b"".join(f"{n}: {v}\r\n".encode("utf-8", "surrogateescape")
                          for n, v in message.added_headers)
