"""What the SMTP dialogue offers and accepts besides commands: the ESMTP extensions of the EHLO
reply and of HELP, the MAIL and RCPT parameters (RFC 1870 SIZE, RFC 6152 BODY, RFC 6531
SMTPUTF8, RFC 3461 RET/ENVID/NOTIFY/ORCPT, RFC 4954 AUTH=), and the TLS facts of a session."""

from __future__ import annotations

import re
from typing import Any

from tampu import reply as R
from tampu.addresses import PathError
from tampu.envelope import Session, TlsInfo
from tampu.reply import Reply

_XTEXT = r"[\x21-\x2a\x2c-\x3c\x3e-\x7e+]"
_ENVID = re.compile(rf"^{_XTEXT}{{1,100}}$")  # xtext (RFC 3461 4.4)
_ORCPT = re.compile(rf"^[A-Za-z0-9-]+;{_XTEXT}{{1,500}}$")
_NOTIFY = re.compile(r"^(NEVER|(SUCCESS|FAILURE|DELAY)(,(SUCCESS|FAILURE|DELAY))*)$", re.I)


def extensions(session: Session, max_size: int, starttls: bool) -> list[str]:
    """The EHLO keywords for this session now. No AUTH before TLS (it would send passwords in
    the clear), none after it succeeded, and none where the session already knows its user
    (the local socket)."""
    caps = ["PIPELINING", f"SIZE {max_size}", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8",
            "DSN"]
    if starttls and session.tls is None:
        caps.append("STARTTLS")
    if session.tls is not None and not session.authenticated and session.local_user is None:
        caps.append("AUTH PLAIN LOGIN")
    return caps


def help_commands(session: Session, starttls: bool) -> list[str]:
    """The commands HELP lists: only those available to this session now."""
    commands = ["HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP", "QUIT"]
    commands += [kw.split()[0] for kw in extensions(session, 0, starttls)
                 if kw.startswith(("STARTTLS", "AUTH"))]
    return commands


def check_mail_params(params: dict[str, str | bool], max_size: int) -> None:
    """Raise PathError with the reply for a MAIL parameter that is malformed or unknown."""
    for name, value in params.items():
        if name == "SIZE":
            if not isinstance(value, str) or not value.isdigit():
                raise PathError(Reply(501, "5.5.4", "Syntax: SIZE=<bytes>"))
            if int(value) > max_size:
                raise PathError(R.MESSAGE_TOO_BIG)
        elif name == "BODY":
            if not isinstance(value, str) or value.upper() not in ("7BIT", "8BITMIME"):
                raise PathError(Reply(555, "5.5.4", "BODY must be 7BIT or 8BITMIME"))
        elif name == "SMTPUTF8":
            if value is not True:
                raise PathError(Reply(555, "5.5.4", "SMTPUTF8 takes no value"))
        elif name == "RET":
            if not isinstance(value, str) or value.upper() not in ("FULL", "HDRS"):
                raise PathError(Reply(501, "5.5.4", "RET must be FULL or HDRS"))
        elif name == "ENVID":
            if not isinstance(value, str) or not _ENVID.match(value):
                raise PathError(Reply(501, "5.5.4", "Syntax: ENVID=<xtext>"))
        elif name != "AUTH":  # RFC 4954 5: AUTH=<mailbox> is accepted and not trusted
            raise PathError(Reply(555, "5.5.4", f"Unsupported parameter {name}"))


def check_rcpt_params(params: dict[str, str | bool]) -> None:
    """Raise PathError with the reply for a RCPT parameter that is malformed or unknown."""
    for name, value in params.items():
        if name == "NOTIFY":
            if not isinstance(value, str) or not _NOTIFY.match(value):
                raise PathError(Reply(501, "5.5.4", "NOTIFY must be NEVER or "
                                                    "SUCCESS,FAILURE,DELAY"))
        elif name == "ORCPT":
            if not isinstance(value, str) or not _ORCPT.match(value):
                raise PathError(Reply(501, "5.5.4", "Syntax: ORCPT=addr-type;xtext"))
        else:
            raise PathError(Reply(555, "5.5.4", f"Unsupported parameter {name}"))


def tls_info(transport: Any) -> TlsInfo:  # noqa: ANN401 - an asyncio or uvloop transport
    sslobj = transport.get_extra_info("ssl_object")
    cipher = transport.get_extra_info("cipher") or ("", "", 0)
    version = sslobj.version() if sslobj is not None else ""
    name = getattr(sslobj, "_tampu_sni", None) if sslobj is not None else None
    return TlsInfo(version=version or "", cipher=cipher[0] or "", server_name=name)
