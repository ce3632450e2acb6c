"""A real tampu on loopback for a test: the configuration directory, the server thread, and an
SMTP client that reports what each stage answered.

``make_config_dir`` writes conf.d (``server_toml``: three listeners on ephemeral ports, the
built-in reception plugins), users and a certificate for ``localhost``; ``start_server`` runs
``tampu serve``'s Server in a thread; ``RunningServer`` is what the ``tampu_server`` fixture
returns. ``runtime_for`` and ``context_for`` build what ``tampu check`` builds, for unit tests.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import smtplib
import ssl
import textwrap
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from tampu.server import Server
    from tampu.testing.capture import CaptureBackend
    from tampu.testing.dns import DNSServer
    from tampu.testing.recorder import VerdictRecorder

LOCAL_DOMAIN = "example.test"


def server_toml(*, hostname: str = "localhost", domains: tuple[str, ...] = (LOCAL_DOMAIN,),
                extra: str = "", plugins: tuple[str, ...] = ("auth", "localusers", "relay",
                                                             "loopdetect")) -> str:
    """A conf.d file for tests: three listeners on 127.0.0.1 ephemeral ports."""
    listeners = "".join(
        f'\n[server.listeners.{kind}]\nkind = "{kind}"\naddresses = ["127.0.0.1:0"]\n'
        for kind in ("smtp", "submission", "submissions")
    )
    enabled = "".join(f"\n[plugins.{p}]\nenabled = true\n" for p in plugins)
    return textwrap.dedent(f"""\
        [server]
        hostname = "{hostname}"
        local_domains = {json.dumps(list(domains))}
        command_timeout = 30
        max_errors = 50
        plugin_timeout = 5
        shutdown_timeout = 2
        retry_schedule = [1.0]
        file_check_interval = 0
        {extra}
        """) + listeners + enabled


_DEFAULT_CA: list[Any] = []


def default_ca() -> Any:  # noqa: ANN401 - a trustme.CA
    """The CA of the test kit's certificates when a test does not bring its own."""
    if not _DEFAULT_CA:
        import trustme

        _DEFAULT_CA.append(trustme.CA())
    return _DEFAULT_CA[0]


def context_for(config: Any) -> Any:  # noqa: ANN401 - a Config and a ServerContext
    """A ServerContext of ``config`` (store and DNS client included), to build a plugin in a
    unit test: ``MyPlugin(PluginContext("name", settings, context_for(config)))``."""
    from tampu.context import ServerContext
    from tampu.dns import Resolver
    from tampu.store_files import FilesystemStore

    return ServerContext(config, FilesystemStore(config.data_dir / "queue",
                                                 config.server.max_queue_items),
                         Resolver.from_settings(config.server.dns_servers,
                                                config.server.dns_timeout))


def runtime_for(config: Any) -> Any:  # noqa: ANN401 - a Config and a Runtime
    """The validated runtime of ``config`` (what ``tampu check`` builds), for tests."""
    from tampu.runtime import build_runtime
    from tampu.store_files import FilesystemStore

    return build_runtime(config, FilesystemStore(config.data_dir / "queue",
                                                 config.server.max_queue_items))


def make_config_dir(root: Path, *, conf: dict[str, str] | None = None,
                    users: dict[str, str] | None = None, ca: Any = None,
                    base: str | None = None) -> Path:
    """Write a configuration directory: conf.d, domains/<d>/users, certs/localhost (issued
    by ``ca``, or by the kit's own CA)."""
    ca = ca if ca is not None else default_ca()
    from tampu.users import UserRecord, hash_password, write_users_file

    root.mkdir(parents=True, exist_ok=True)
    confd = root / "conf.d"
    confd.mkdir(exist_ok=True)
    (confd / "00-test.toml").write_text(base if base is not None else server_toml())
    for name, text in (conf or {}).items():
        (confd / name).write_text(textwrap.dedent(text))
    (root / "domains" / LOCAL_DOMAIN).mkdir(parents=True, exist_ok=True)
    by_domain: dict[str, dict[str, UserRecord]] = {}
    for address, password in (users or {}).items():
        user, _, domain = address.rpartition("@")
        by_domain.setdefault(domain, {})[user] = UserRecord(user, hash_password(password,
                                                                                 log_n=10))
    for domain, entries in by_domain.items():
        write_users_file(root / "domains" / domain / "users", entries, "tampu")
    if not (root / "certs" / "localhost").exists():
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
        certdir = root / "certs" / "localhost"
        certdir.mkdir(parents=True, exist_ok=True)
        cert.private_key_pem.write_to_path(str(certdir / "privkey.pem"))
        cert.cert_chain_pems[0].write_to_path(str(certdir / "fullchain.pem"))
        for extra in cert.cert_chain_pems[1:]:
            with open(certdir / "fullchain.pem", "ab") as fh:
                fh.write(extra.bytes())
    return root


@dataclass
class RunningServer:
    """A tampu server running in a background thread with its own event loop."""

    config_dir: Path
    server: Server
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    ca: Any = None
    _stopped: bool = field(default=False)
    _verdicts: VerdictRecorder | None = None
    _capture: CaptureBackend | None = None
    dns: DNSServer | None = None
    """The DNS server the server asks (``tampu_server(dns=...)``), if one was given."""

    @property
    def verdicts(self) -> VerdictRecorder:
        """The verdict recorder (``tampu_server(record=True)``)."""
        if self._verdicts is None:
            raise AttributeError("no verdict recorder: start the server with record=True")
        return self._verdicts

    @property
    def capture(self) -> CaptureBackend:
        """The capture backend (``tampu_server(capture=True)``)."""
        if self._capture is None:
            raise AttributeError("no capture backend: start the server with capture=True")
        return self._capture

    def port(self, listener: str = "smtp") -> int:
        return int(self.server.bound[listener][0][1])

    def client_tls(self) -> ssl.SSLContext:
        """A client context that trusts the test CA (hostname ``localhost``)."""
        ctx = ssl.create_default_context()
        if self.ca is not None:
            self.ca.configure_trust(ctx)
        return ctx

    def smtp(self, listener: str = "smtp", *, timeout: float = 10) -> smtplib.SMTP:
        if self.server.config.server.listeners[listener].kind == "submissions":
            return smtplib.SMTP_SSL("localhost", self.port(listener), timeout=timeout,
                                    context=self.client_tls())
        return smtplib.SMTP("127.0.0.1", self.port(listener), timeout=timeout,
                            local_hostname="client.test")

    def send(self, mail_from: str, rcpts: list[str] | str, message: bytes | str | None = None,
             *, listener: str | None = None, login: tuple[str, str] | None = None,
             helo: str = "client.test", timeout: float = 10) -> SmtpResult:
        """One SMTP transaction; returns every stage's reply (nothing raises on a refusal).

        ``message``: the message (str or bytes; line ends made CRLF), or a small one made up.
        ``login``: (user, password), sent after STARTTLS on ``submission`` (the default
        listener then; ``smtp`` otherwise). DATA is sent only if a recipient was accepted."""
        rcpt_list = [rcpts] if isinstance(rcpts, str) else list(rcpts)
        listener = listener or ("submission" if login else "smtp")
        data = _message_bytes(message, mail_from, rcpt_list)
        result = SmtpResult()
        client = self.smtp(listener, timeout=timeout)
        try:
            client.ehlo(helo)
            if login is not None:
                if not isinstance(client, smtplib.SMTP_SSL):
                    client.starttls(context=self.client_tls())
                    client.ehlo(helo)
                client.login(*login)
            result.mail = _text(client.mail(mail_from))
            if result.mail[0] != 250:
                return result
            for rcpt in rcpt_list:
                result.rcpt[rcpt] = _text(client.rcpt(rcpt))
            if not any(code == 250 for code, _ in result.rcpt.values()):
                return result
            try:
                result.data = _text(client.data(data))
            except smtplib.SMTPDataError as exc:
                result.data = _text((exc.smtp_code, exc.smtp_error))
        except smtplib.SMTPServerDisconnected as exc:
            result.closed = str(exc) or "the server closed the connection"
        finally:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()
        return result

    def journal(self) -> list[dict[str, Any]]:
        """The decision records of the server's journal so far (what ``tampu why`` reads;
        written by a thread, so the last ones may still be on their way)."""
        from tampu.decisions import JOURNAL_DIR, read_journal

        return list(read_journal(self.server.config.data_dir / JOURNAL_DIR))

    @property
    def store(self) -> Any:  # noqa: ANN401 - the server's QueueStore (FilesystemStore here)
        return self.server.runtime.store

    @property
    def queue_dir(self) -> Path:
        return self.config_dir_data / "queue"

    @property
    def config_dir_data(self) -> Path:
        return self.server.config.data_dir

    def _queue_store(self) -> Any:  # noqa: ANN401 - a FilesystemStore
        """The running server's filesystem store (new items are only in its log and
        memory until they outlive their log record), or after a stop a reader of the queue
        directory."""
        from tampu.store_files import FilesystemStore

        store = self.server.runtime.store
        if self._stopped or not isinstance(store, FilesystemStore):
            return FilesystemStore(self.queue_dir, 1)
        return store

    def queue_items(self) -> list[str]:
        """IDs of the items in the queue."""
        return list(self._queue_store().ids_now())

    def queue_item_bytes(self, qid: str) -> bytes:
        """An item's file contents as queued (header line, ``\\n``, message), whether the
        running server has written its file yet or not."""
        return bytes(self._queue_store().item_bytes_now(qid))

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.loop.call_soon_threadsafe(self.server.request_stop)
        self.thread.join(30)


def _text(reply: tuple[int, bytes | str]) -> tuple[int, str]:
    code, msg = reply
    return code, msg.decode("utf-8", "replace") if isinstance(msg, bytes) else msg


def _message_bytes(message: bytes | str | None, mail_from: str, rcpts: list[str]) -> bytes:
    if message is None:
        message = (f"From: <{mail_from or 'mailer-daemon@client.test'}>\r\n"
                   f"To: {', '.join(f'<{r}>' for r in rcpts)}\r\nSubject: test\r\n"
                   "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
                   f"Message-ID: <{uuid.uuid4().hex}@client.test>\r\n\r\nHello.\r\n")
    if isinstance(message, str):
        message = message.encode("utf-8")
    return message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@dataclass
class SmtpResult:
    """What each stage of one transaction answered (``RunningServer.send``)."""

    mail: tuple[int, str] = (0, "")
    rcpt: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Per recipient, in the order given."""
    data: tuple[int, str] | None = None
    """None when DATA was not sent (MAIL or every RCPT refused)."""
    closed: str = ""
    """Why the server closed the connection mid-way (e.g. ``421``), if it did."""

    @property
    def accepted(self) -> bool:
        """The message was queued (DATA answered 250)."""
        return self.data is not None and self.data[0] == 250

    @property
    def qid(self) -> str | None:
        """The queue ID from the 250 reply to DATA (``... queued as QID``)."""
        return self.data[1].rpartition(" ")[2] if self.accepted and self.data else None

    def refusals(self) -> list[tuple[str, str, int, str]]:
        """(stage, address, code, text) of each refusal, in order."""
        out = []
        if self.mail[0] != 250:
            out.append(("mail", "", *self.mail))
        out += [("rcpt", a, code, text) for a, (code, text) in self.rcpt.items() if code != 250]
        if self.data is not None and self.data[0] != 250:
            out.append(("data", "", *self.data))
        return out

    def __str__(self) -> str:
        lines = [f"MAIL: {self.mail[0]} {self.mail[1]}"]
        lines += [f"RCPT <{a}>: {code} {text}" for a, (code, text) in self.rcpt.items()]
        if self.data is not None:
            lines.append(f"DATA: {self.data[0]} {self.data[1]}")
        if self.closed:
            lines.append(f"closed: {self.closed}")
        return "\n".join(lines)

    def assert_accepted(self) -> SmtpResult:
        """Every recipient and the message were accepted."""
        if self.refusals() or not self.accepted:
            raise AssertionError(f"the transaction was not fully accepted:\n{self}")
        return self

    def assert_refused(self, code: int | None = None, *, stage: str | None = None,
                       address: str | None = None) -> SmtpResult:
        """Something was refused (at ``stage``, about ``address``, with ``code``)."""
        for got_stage, got_address, got_code, _ in self.refusals():
            if stage is not None and got_stage != stage:
                continue
            if address is not None and got_address.lower() != address.lower():
                continue
            if code is not None and got_code != code:
                continue
            return self
        wanted = " ".join(x for x in (str(code or ""), stage or "", address or "") if x)
        raise AssertionError(f"no refusal {wanted}:\n{self}")


def send(srv: RunningServer, mail_from: str, rcpts: list[str], subject: str = "test",
         body: str = "hello\r\n", headers: str = "") -> str:
    """Send one message over the smtp listener, asserting every stage accepted it; returns
    the queue ID."""
    data = (f"From: <{mail_from or 'nobody@example.org'}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@client.test>\r\n{headers}\r\n{body}")
    with srv.smtp() as c:
        c.ehlo()
        code, msg = c.mail(mail_from or "<>")
        assert code == 250, msg
        for r in rcpts:
            code, msg = c.rcpt(r)
            assert code == 250, msg
        code, msg = c.data(data.encode())
        assert code == 250, msg
    return msg.decode().rpartition(" ")[2]


class ServerFactory(Protocol):
    """The ``tampu_server`` fixture (see ``launch``)."""

    def __call__(self, *, conf: dict[str, str] | None = ...,
                 plugins: list[Any] | Mapping[str, Any] | None = ...,
                 users: dict[str, str] | None = ..., deliver: bool | None = ...,
                 base: str | None = ..., config_dir: Path | None = ...,
                 dns: DNSServer | str | None = ..., record: bool | VerdictRecorder = ...,
                 capture: bool | CaptureBackend = ...) -> RunningServer: ...


def _named(plugins: list[Any] | Mapping[str, Any] | None) -> list[Any]:
    """Plugin objects and classes; a mapping names them (its key is the conf.d table)."""
    if not isinstance(plugins, Mapping):
        return list(plugins or [])
    out = []
    for name, obj in plugins.items():
        if inspect.isclass(obj):  # a subclass, so that the author's class stays as it is
            obj = type(obj.__name__, (obj,), {"name": name, "__module__": obj.__module__})
        else:
            obj.name = name
        out.append(obj)
    return out


def launch(root: Path, *, ca: Any = None, conf: dict[str, str] | None = None,  # noqa: ANN401 - a trustme.CA
           plugins: list[Any] | Mapping[str, Any] | None = None,
           users: dict[str, str] | None = None,
           deliver: bool | None = None, base: str | None = None,
           config_dir: Path | None = None, dns: DNSServer | str | None = None,
           record: bool | VerdictRecorder = False,
           capture: bool | CaptureBackend = False) -> RunningServer:
    """Write a configuration directory in ``root`` (unless ``config_dir`` is given) and start
    a server on it; what the ``tampu_server`` fixture does. ``plugins``: objects and classes
    (named by their ``name`` attribute or, for a class, its name in lower case), or a mapping
    ``{"webhook": WebhookBackend}`` that names them (``[plugins.webhook]`` of ``conf`` is then
    the plugin's settings table, as for an installed entry point). ``dns``: the DNS server to ask
    (a DNSServer or ``host:port``); ``record``: add a VerdictRecorder (``srv.verdicts``);
    ``capture``: add a CaptureBackend (``srv.capture``), and deliver unless ``deliver=False``.
    """
    ca = ca if ca is not None else default_ca()
    extra = _named(plugins)
    recorder = capture_backend = None
    if record is not False:
        from tampu.testing.recorder import VerdictRecorder

        recorder = VerdictRecorder() if record is True else record
        extra.append(recorder)
    if capture is not False:
        from tampu.testing.capture import CaptureBackend

        capture_backend = CaptureBackend() if capture is True else capture
        extra.append(capture_backend)
    files = dict(conf or {})
    if dns is not None:
        address = dns if isinstance(dns, str) else dns.address
        files = {"01-tampu-testing-dns.toml": f'[server]\ndns_servers = ["{address}"]\n',
                 **files}
    if config_dir is None:
        config_dir = make_config_dir(root, conf=files, users=users, ca=ca, base=base)
    else:
        for name, text in files.items():
            if name.startswith("01-tampu-testing"):
                (config_dir / "conf.d" / name).write_text(text)
    srv = start_server(config_dir, plugins=extra,
                       deliver=capture_backend is not None if deliver is None else deliver, ca=ca)
    srv._verdicts, srv._capture = recorder, capture_backend
    if dns is not None and not isinstance(dns, str):
        srv.dns = dns
    return srv


def start_server(config_dir: Path, *, plugins: list[Any] | None = None, deliver: bool = False,
                 ca: Any = None) -> RunningServer:
    from tampu.config import load_config
    from tampu.server import Server

    config = load_config(config_dir)
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        box["loop"] = loop

        async def main() -> None:
            try:
                server = Server(config, plugins or [], deliver=deliver)
                box["server"] = server
                started = asyncio.Event()
                task = asyncio.ensure_future(server.serve(install_signals=False, ready=started))
                waiter = asyncio.ensure_future(started.wait())
                await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()  # not left pending when start-up failed
                if task.done():
                    task.result()
                ready.set()
                await task
            except BaseException as exc:
                box["error"] = exc
                ready.set()

        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, name="tampu-test-server", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in box:
        raise box["error"]
    return RunningServer(config_dir=config_dir, server=box["server"], loop=box["loop"],
                         thread=thread, ca=ca)
