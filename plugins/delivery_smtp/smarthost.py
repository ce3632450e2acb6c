"""Smarthost: send outgoing mail through a relay (for servers whose port 25 is blocked).

Configured in ``[plugins.delivery_smtp.smarthost]`` (all remote mail) and/or
``[plugins.delivery_smtp.smarthost_domains."example.org"]`` (mail for one recipient domain;
wins over the first)::

    [plugins.delivery_smtp.smarthost]
    host = "smtp.provider.example:587"
    tls = "starttls"                      # or "implicit" (port 465), or "none" (loopback only)
    username = "me@provider.example"
    password = { "$env" = "SMARTHOST_PASSWORD" }   # or { "$file" = "secrets/smarthost" }

The connection to the relay always has TLS with a certificate valid for the relay's name
(system CAs plus ``tls_ca_file``), STARTTLS or implicit, with no fallback; ``tls = "none"`` is
accepted only for a relay on a loopback address (the credentials then never leave the
machine). With a ``username`` tampu authenticates with AUTH PLAIN (or LOGIN when PLAIN is not
offered) before MAIL FROM. A relay that refuses the credentials is a temporary failure (like
Postfix's ``smtp_sasl_auth_soft_bounce``): a wrong password in the configuration keeps the mail
queued instead of bouncing it. The password is never logged: it is held as a pydantic
``SecretStr`` and only read when sent.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import aiosmtplib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from tampu import DeliveryResult
from tampu.dns import DnsTempError, Resolver, to_ascii
from tampu.plugins.delivery_smtp.client import (
    ClientConfig,
    Job,
    LevelCheck,
    Login,
    NextHost,
    deliver_to,
)
from tampu.plugins.delivery_smtp.mx import Target, parse_via
from tampu.plugins.delivery_smtp.pool import ConnectionPool
from tampu.plugins.delivery_smtp.tls_policy import TlsRequirement

log = logging.getLogger("tampu.plugins.delivery_smtp.smarthost")

TlsMode = Literal["starttls", "implicit", "none"]
DEFAULT_PORTS: Final = {"starttls": 587, "implicit": 465, "none": 25}


class SecretRef(BaseModel):
    """``{"$env": "NAME"}`` or ``{"$file": "path"}`` (relative to the configuration folder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    env: str | None = Field(default=None, alias="$env", description="Environment variable.")
    file: str | None = Field(default=None, alias="$file", description="File (stripped).")

    @model_validator(mode="after")
    def _one(self) -> SecretRef:
        if (self.env is None) == (self.file is None):
            raise ValueError('a secret is a string, {"$env": "NAME"} or {"$file": "path"}')
        return self

    def resolve(self, config_dir: Path) -> SecretStr:
        """The secret's value. Raises ValueError naming the variable or file (not the value)."""
        if self.env is not None:
            if self.env not in os.environ:
                raise ValueError(f"environment variable {self.env} is not set")
            return SecretStr(os.environ[self.env])
        assert self.file is not None
        path = config_dir / self.file
        try:
            return SecretStr(path.read_text().strip())
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SmarthostSettings(BaseModel):
    """One relay: ``[plugins.delivery_smtp.smarthost]`` or a ``smarthost_domains`` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="The relay, as host, host:port or [IPv6]:port; the port "
                      "defaults to 587 (starttls), 465 (implicit) or 25 (none).")
    tls: TlsMode = Field(default="starttls", description="starttls: STARTTLS, required; "
                         "implicit: TLS from the start (port 465); none: no TLS required, "
                         "allowed only for a relay on a loopback address.")
    username: str = Field(default="", description="User name for AUTH PLAIN/LOGIN; empty: "
                          "no authentication.")
    password: SecretStr | SecretRef = Field(
        default=SecretStr(""), description='Password for AUTH: a string, {"$env": "NAME"} or '
        '{"$file": "path"}; never logged.')

    @model_validator(mode="after")
    def _check(self) -> SmarthostSettings:
        target = parse_via(self.host, DEFAULT_PORTS[self.tls])
        if not target.host:
            raise ValueError(f"smarthost host {self.host!r} has no host name")
        if self.tls == "none" and not is_loopback(target.host):
            raise ValueError(f'tls = "none" is only allowed for a relay on a loopback address '
                             f"(localhost, 127.0.0.0/8, ::1), not {target.host}")
        has_password = isinstance(self.password, SecretRef) or \
            bool(self.password.get_secret_value())
        if has_password and not self.username:
            raise ValueError("a smarthost password needs a username")
        if self.username and not has_password:
            raise ValueError("a smarthost username needs a password")
        return self


@dataclass(frozen=True, slots=True)
class Relay:
    """A smarthost ready to use (secrets resolved)."""

    host: str
    port: int
    tls: TlsMode
    username: str = ""
    password: SecretStr = field(default=SecretStr(""), repr=False)

    @property
    def label(self) -> str:
        """``smarthost relay.example.net:587``, the start of messages about it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"smarthost {host}:{self.port}"

    @classmethod
    def from_settings(cls, settings: SmarthostSettings, config_dir: Path) -> Relay:
        target = parse_via(settings.host, DEFAULT_PORTS[settings.tls])
        password = settings.password
        if isinstance(password, SecretRef):
            password = password.resolve(config_dir)
        return cls(host=target.host, port=target.port, tls=settings.tls,
                   username=settings.username, password=password)


class Smarthosts:
    """The configured relays: per recipient domain, else the default one (if any)."""

    def __init__(self, default: Relay | None = None,
                 domains: Mapping[str, Relay] | None = None) -> None:
        self.default = default
        self.domains = {_domain_key(d): r for d, r in (domains or {}).items()}

    @classmethod
    def from_settings(cls, default: SmarthostSettings | None,
                      domains: Mapping[str, SmarthostSettings], config_dir: Path) -> Smarthosts:
        """Raises ValueError naming the table whose secret cannot be resolved."""
        try:
            relay = Relay.from_settings(default, config_dir) if default is not None else None
        except ValueError as exc:
            raise ValueError(f"smarthost.password: {exc}") from None
        per_domain: dict[str, Relay] = {}
        for domain, settings in domains.items():
            try:
                per_domain[domain] = Relay.from_settings(settings, config_dir)
            except ValueError as exc:
                raise ValueError(f"smarthost_domains.{domain}.password: {exc}") from None
        return cls(relay, per_domain)

    def __bool__(self) -> bool:
        return self.default is not None or bool(self.domains)

    def pick(self, domain: str) -> Relay | None:
        """The relay for mail to ``domain``, or None: deliver by MX."""
        return self.domains.get(_domain_key(domain), self.default)


def _domain_key(domain: str) -> str:
    """Domains compare in lower-case A-label form (``café.example`` = ``xn--caf-dma.example``)."""
    try:
        return to_ascii(domain)
    except (ValueError, UnicodeError):
        return domain.lower().rstrip(".")


def requirement(relay: Relay, verified: ssl.SSLContext) -> TlsRequirement | None:
    """The TLS a connection to ``relay`` must have (None for ``tls = "none"``: opportunistic)."""
    if relay.tls == "none":
        return None
    return TlsRequirement(reason=f"{relay.label} ({relay.tls}) requires TLS with a "
                          f"certificate valid for {relay.host}", context=verified,
                          implicit=relay.tls == "implicit")


def login_step(relay: Relay) -> Login | None:
    """AUTH PLAIN (else LOGIN) with the relay's credentials, or None without a username."""
    if not relay.username:
        return None

    async def login(smtp: aiosmtplib.SMTP, remote: str) -> None:
        def fail(text: str) -> NextHost:
            return NextHost(DeliveryResult.temporary(text, enhanced="4.7.0", remote=remote))

        if not smtp.supports_extension("auth"):
            raise fail(f"{relay.label} does not offer AUTH, but credentials are configured "
                       "for it")
        methods = smtp.server_auth_methods
        try:
            if "plain" in methods:
                await smtp.auth_plain(relay.username, relay.password.get_secret_value())
            elif "login" in methods:
                await smtp.auth_login(relay.username, relay.password.get_secret_value())
            else:
                raise fail(f"{relay.label} offers no AUTH mechanism tampu uses (PLAIN, "
                           f"LOGIN): {' '.join(methods).upper() or 'none'}")
        except aiosmtplib.SMTPAuthenticationError as exc:
            reply = " ".join(exc.message.split())
            raise fail(f"{relay.label} refused the credentials of {relay.username}: "
                       f"{exc.code} {reply}") from None
        log.debug("%s: authenticated as %s", relay.label, relay.username)

    return login


async def relay_addresses(resolver: Resolver, host: str) -> list[str]:
    """The relay's addresses (IPv4, then IPv6; an address literal is its own; ``localhost``
    is the loopback addresses, RFC 6761). Raises LookupError with a readable reason."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    if host.lower() == "localhost":
        return ["127.0.0.1", "::1"]
    addresses: list[str] = []
    problems: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.query(host, rdtype)
        except DnsTempError as exc:
            problems.append(str(exc))
            continue
        except ValueError as exc:
            raise LookupError(f"{host} is not a host name: {exc}") from None
        if answer.nxdomain:
            raise LookupError(f"{host} does not exist")
        addresses.extend(r.address for r in answer.records if hasattr(r, "address"))
    if addresses:
        return addresses
    raise LookupError("; ".join(problems) or f"{host} has no A or AAAA record")


async def deliver(relay: Relay, client: ClientConfig, job: Job, check: LevelCheck | None,
                  resolver: Resolver, verified: ssl.SSLContext,
                  skipped: Callable[[Job, DeliveryResult], None] | None = None, *,
                  pool: ConnectionPool | None = None) -> list[DeliveryResult]:
    """Send ``job`` through ``relay``: each of its addresses in turn until each recipient is
    taken or refused for good; one result per recipient. ``skipped`` is told of each address
    that did not take some of them."""
    target = Target(relay.host, relay.port)
    try:
        addresses = await relay_addresses(resolver, relay.host)
    except LookupError as exc:
        return [DeliveryResult.temporary(f"{relay.label}: {exc.args[0]}", enhanced="4.4.3",
                                         remote=relay.host)] * len(job.rcpts)
    require = requirement(relay, verified)
    login = login_step(relay)
    login_id = f"{relay.username}@{relay.host}:{relay.port}" if relay.username else ""
    final: list[DeliveryResult | None] = [None] * len(job.rcpts)
    last: list[DeliveryResult | None] = [None] * len(job.rcpts)
    for address in addresses:
        todo = [i for i, done in enumerate(final) if done is None]
        if not todo:
            break
        part = job.only(todo)
        try:
            results = await deliver_to(client, target, address, part, check, require, login,
                                       pool=pool, login_id=login_id)
        except NextHost as exc:
            for i in todo:
                last[i] = exc.result
            if skipped is not None:
                skipped(part, exc.result)
            continue
        for i, result in zip(todo, results, strict=True):
            if result.status == "temporary":
                last[i] = result
                if skipped is not None:
                    skipped(job.only([i]), result)
            else:
                final[i] = result
    out = []
    for done, tried in zip(final, last, strict=True):
        chosen = done if done is not None else tried
        assert chosen is not None
        out.append(chosen)
    return out
