"""``tampu sendmail`` (also installed as ``sendmail``): submit a message from a local program
(cron, a script, a web application) into the running server, as sendmail and Postfix's
sendmail do.

    sendmail [-f SENDER] [-F NAME] [-t] [-i|-oi] [-N DSN] [-R RET] [-V ENVID] [--] [RCPT ...]

The message is read from standard input and handed over SMTP to the server's local socket
(``[server] local_socket``, in the data directory), where the server knows the submitting
user from the socket's peer credentials (no password): the session is of kind ``local``, may
relay, and its Received header names the local user. When the message has no ``From``,
``Date`` or ``Message-ID`` header, one is added (From: the sender, with ``-F NAME``).

Exit codes are sendmail's (``sysexits.h``): 0 accepted; 64 usage; 65 the message is not
valid; 67 a recipient does not exist (5.1.x); 69 refused for good (other 5xx); 71/74 local
trouble; 75 try again later (4xx, or the server is not running: nothing is queued then —
cron logs the failure); 77 the socket refused this user; 78 the configuration cannot be read.

Not supported: ``-bs`` (SMTP on stdin), ``-bp``/``-q`` (use ``tampu queue``), ``-bi`` (no
aliases database to rebuild); ``-o*``, ``-od*``, ``-v``, ``-U``, ``-X`` and ``-B`` are accepted
and ignored, as Postfix does for most of them.
"""

from __future__ import annotations

import email.utils
import getpass
import os
import smtplib
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from typing import Any

from tampu.files import unix_socket_path

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE = 0, 64, 65, 67, 69
EX_OSERR, EX_IOERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = 71, 74, 75, 77, 78
MAX_INPUT = 256 * 1024 * 1024
"""A bound on what is read from standard input (the server refuses more than
``max_message_size`` anyway)."""


class UsageError(Exception):
    pass


@dataclass
class Options:
    sender: str | None = None
    full_name: str | None = None
    from_headers: bool = False
    ignore_dots: bool = False
    notify: str | None = None
    ret: str | None = None
    envid: str | None = None
    recipients: list[str] = field(default_factory=list)
    config_dir: str | None = None


_IGNORED_WITH_VALUE = {"-B", "-O", "-L", "-X", "-C", "-h", "-p"}


def parse_args(argv: Sequence[str]) -> Options:
    """sendmail's command line (``-fSENDER`` and ``-f SENDER`` both work)."""
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            opts.recipients += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        if arg.startswith("--config-dir"):
            value, i = _value(arg, "--config-dir", args, i)
            opts.config_dir = value.lstrip("=")
            continue
        flag = arg[:2]
        if flag in ("-f", "-r"):
            opts.sender, i = _value(arg, flag, args, i)
        elif flag == "-F":
            opts.full_name, i = _value(arg, flag, args, i)
        elif flag == "-N":
            opts.notify, i = _value(arg, flag, args, i)
        elif flag == "-R":
            opts.ret, i = _value(arg, flag, args, i)
        elif flag == "-V":
            opts.envid, i = _value(arg, flag, args, i)
        elif arg == "-t":
            opts.from_headers = True
        elif arg in ("-i", "-oi"):
            opts.ignore_dots = True
        elif arg in ("-bm", "-v", "-U", "-n") or flag in ("-o", "-e"):
            continue  # delivery and error modes, old options: the server decides
        elif flag in _IGNORED_WITH_VALUE:
            _, i = _value(arg, flag, args, i)
        elif flag in ("-b", "-q"):
            raise UsageError(f"{arg} is not supported: use tampu queue (or the server's "
                             "SMTP port for -bs)")
        else:
            raise UsageError(f"unknown option {arg}")
    if opts.notify is not None:
        words = {w.strip().upper() for w in opts.notify.split(",")}
        if not words <= {"NEVER", "SUCCESS", "DELAY", "FAILURE"} or (
                "NEVER" in words and len(words) > 1):
            raise UsageError(f"-N {opts.notify}: use never, or some of success,delay,failure")
        opts.notify = ",".join(sorted(words))
    if opts.ret is not None:
        opts.ret = opts.ret.upper()
        if opts.ret not in ("HDRS", "FULL"):
            raise UsageError(f"-R {opts.ret}: use hdrs or full")
    return opts


def _value(arg: str, flag: str, args: list[str], i: int) -> tuple[str, int]:
    if len(arg) > len(flag):
        return arg[len(flag):], i
    if i >= len(args):
        raise UsageError(f"{flag} needs a value")
    return args[i], i + 1


def read_message(stream: Any, ignore_dots: bool) -> bytes:  # noqa: ANN401 - a binary stream
    """Standard input with CRLF line ends; without -i a line with only "." ends it."""
    lines: list[bytes] = []
    size = 0
    for raw in stream:
        line = raw.rstrip(b"\r\n")
        if not ignore_dots and line == b".":
            break
        size += len(line) + 2
        if size > MAX_INPUT:
            raise ValueError("the message is too big")
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header section with its CRLFs, the rest from the blank line on)."""
    if data.startswith(b"\r\n"):
        return b"", data
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return (data, b"") if _looks_like_headers(data) else (b"", b"\r\n" + data)
    return head + b"\r\n", b"\r\n" + body


def _looks_like_headers(data: bytes) -> bool:
    first = data.split(b"\r\n", 1)[0]
    name, sep, _ = first.partition(b":")
    return bool(sep) and bool(name) and all(33 <= c <= 126 for c in name)


def header_recipients(head: bytes) -> list[str]:
    parsed = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(head + b"\r\n")
    values = [str(v) for name in ("To", "Cc", "Bcc") for v in parsed.get_all(name, [])]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def without_bcc(head: bytes) -> bytes:
    out, skipping = [], False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.split(b":", 1)[0].strip().lower() == b"bcc"
        if not skipping:
            out.append(line)
    return b"\r\n".join(out)


def complete(data: bytes, opts: Options, sender: str, hostname: str) -> tuple[bytes, list[str]]:
    """The message as submitted (Bcc removed with -t; From, Date, Message-ID added when
    missing) and the recipients from its headers (with -t)."""
    head, body = split_message(data)
    names = {line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")
             if line and line[:1] not in (b" ", b"\t")}
    found = header_recipients(head) if opts.from_headers else []
    if opts.from_headers:
        head = without_bcc(head)
    added = []
    if b"from" not in names:
        added.append("From: " + (email.utils.formataddr((opts.full_name, sender))
                                 if opts.full_name else sender))
    if b"date" not in names:
        added.append("Date: " + email.utils.formatdate(localtime=True))
    if b"message-id" not in names:
        added.append("Message-ID: " + email.utils.make_msgid(domain=hostname))
    extra = "".join(f"{line}\r\n" for line in added).encode()
    return head + extra + (body if body else b"\r\n"), found


def qualify(address: str, domain: str) -> str:
    address = address.strip().strip("<>")
    return address if "@" in address or not address else f"{address}@{domain}"


class UnixSMTP(smtplib.SMTP):
    """smtplib over a UNIX socket (the server's local socket)."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = Path(path)
        super().__init__(timeout=timeout)
        self.connect("localhost")

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            with unix_socket_path(self.path) as name:
                sock.connect(name)
        except OSError:
            sock.close()
            raise
        return sock


def code_for(code: int, enhanced: str = "") -> int:
    if 400 <= code < 500:
        return EX_TEMPFAIL
    if enhanced.startswith("5.1.") or code == 550 and enhanced == "":
        return EX_NOUSER
    return EX_UNAVAILABLE


def _enhanced(text: bytes) -> str:
    word = text.split(b" ", 1)[0].decode("ascii", "replace")
    return word if word.count(".") == 2 and word[:1] in "245" else ""


def submit(path: str, sender: str, recipients: list[str], message: bytes,
           opts: Options) -> tuple[int, str]:
    """(exit code, message for standard error)."""
    mail_opts: list[str] = []
    if any(not a.isascii() for a in [sender, *recipients]):
        mail_opts.append("SMTPUTF8")
    if not message.isascii():
        mail_opts.append("BODY=8BITMIME")
    if opts.ret:
        mail_opts.append(f"RET={opts.ret}")
    if opts.envid:
        mail_opts.append(f"ENVID={opts.envid}")
    rcpt_opts = [f"NOTIFY={opts.notify}"] if opts.notify else []
    try:
        with UnixSMTP(path, timeout=300) as client:
            client.ehlo("localhost")
            code, text = client.mail(sender, mail_opts)
            if code != 250:
                return code_for(code, _enhanced(text)), f"MAIL FROM refused: {code} " \
                    f"{text.decode(errors='replace')}"
            for rcpt in recipients:
                code, text = client.rcpt(rcpt, rcpt_opts)
                if code not in (250, 251):
                    return code_for(code, _enhanced(text)), f"<{rcpt}> refused: {code} " \
                        f"{text.decode(errors='replace')}"
            code, text = client.data(message)
            if code != 250:
                return code_for(code, _enhanced(text)), f"message refused: {code} " \
                    f"{text.decode(errors='replace')}"
            return EX_OK, ""
    except PermissionError as exc:
        return EX_NOPERM, f"cannot use the server's local socket {path}: {exc}"
    except (FileNotFoundError, ConnectionRefusedError):
        return EX_TEMPFAIL, f"the mail server is not running (no socket at {path}); " \
            "the message was not sent"
    except smtplib.SMTPResponseException as exc:
        return code_for(exc.smtp_code), f"refused: {exc.smtp_code} {exc.smtp_error!r}"
    except (OSError, smtplib.SMTPException) as exc:
        return EX_TEMPFAIL, f"cannot talk to the mail server: {exc}"


def socket_path(config_dir: str | None) -> tuple[str, str, str]:
    """(socket path, the domain for unqualified addresses, the server's hostname)."""
    from tampu.cli import default_config_dir
    from tampu.config import load_config

    config = load_config(config_dir or default_config_dir())
    settings = config.server
    if not settings.local_socket:
        raise ValueError("the server has no local socket ([server] local_socket is empty)")
    return str(config.data_dir / settings.local_socket), primary_domain(config), \
        settings.hostname


def primary_domain(config: Any) -> str:  # noqa: ANN401 - a tampu.config.Config
    """The domain of unqualified addresses (``root`` is ``root@DOMAIN``): the first of
    ``local_domains``, else the first domain folder, else the hostname."""
    from tampu.users import Domains

    settings = config.server
    if settings.local_domains:
        return str(settings.local_domains[0])
    folders = sorted(Domains(config.domains_dir, [], 0).all())
    return folders[0] if folders else str(settings.hostname)


def main(argv: Sequence[str] | None = None) -> int:
    from tampu.errors import ConfigError

    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_USAGE
    try:
        path, domain, hostname = socket_path(opts.config_dir)
    except (ConfigError, ValueError) as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_CONFIG
    path = os.environ.get("TAMPU_SENDMAIL_SOCKET") or path
    try:
        data = read_message(sys.stdin.buffer, opts.ignore_dots)
    except ValueError as exc:
        print(f"sendmail: {exc}", file=sys.stderr)
        return EX_DATAERR
    except OSError as exc:
        print(f"sendmail: cannot read the message: {exc}", file=sys.stderr)
        return EX_IOERR
    sender = qualify(opts.sender if opts.sender is not None else getpass.getuser(), domain)
    message, found = complete(data, opts, sender or f"MAILER-DAEMON@{hostname}", hostname)
    recipients = list(dict.fromkeys(qualify(r, domain) for r in [*opts.recipients, *found]
                                    if r.strip()))
    if not recipients:
        print("sendmail: no recipients (give them as arguments, or -t)", file=sys.stderr)
        return EX_USAGE
    code, problem = submit(path, sender, recipients, message, opts)
    if problem:
        print(f"sendmail: {problem}", file=sys.stderr)
    return code


def register(sub: Any) -> None:  # noqa: ANN401 - argparse's private subparsers type
    """Listed in ``tampu --help``; the command line itself is sendmail's (see
    :func:`remainder`), which argparse cannot parse."""
    sub.add_parser("sendmail", help="submit a message from standard input, as sendmail "
                   "(-f, -t, -i, -F, -N, -R, -V)", add_help=False)


def remainder(argv: Sequence[str]) -> list[str] | None:
    """The arguments for :func:`main` when the command line is ``tampu [--config-dir D]
    sendmail ...``; None for every other command."""
    from tampu.cli import command_index

    i = command_index(argv)
    if i is None or argv[i] != "sendmail":
        return None
    before = list(argv[:i])
    extra = [f"--config-dir={before[j + 1]}" for j, a in enumerate(before[:-1])
             if a == "--config-dir"]
    extra += [a for a in before if a.startswith("--config-dir=")]
    return extra + list(argv[i + 1:])
