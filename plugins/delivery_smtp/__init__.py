"""``delivery_smtp``: deliver to remote domains over SMTP (MX lookup, opportunistic TLS).

The ``deliver`` hook claims a recipient when its domain is not local, or when its route has
``via`` hosts. Whether a remote recipient may leave at all is the core's decision (its relay
guard runs before any backend), so this backend never decides relaying.

For each attempt: the domain's MX hosts in preference order (random among equals; the domain's
own A/AAAA when it has no MX; a null MX fails for good), each host's addresses in turn, until
one takes the mail or refuses it for good. Connection problems and 4xx replies move on to the
next address/host; a 5xx reply to MAIL, RCPT or DATA is a permanent failure that quotes the
remote's reply. TLS is opportunistic, and the security level reached is checked against what
the ``domaininfo`` plugin remembers of the domain (when it is enabled).

Recipients of one item that go the same way (same domain, same ``via`` hosts, or the same
smarthost; same sender) travel in one transaction with several RCPT TO (``deliver_batch``, at
most ``max_recipients_per_transaction`` each); the per-recipient ``deliver`` does the same for
one. Connections are limited per destination address (``max_connections_per_destination``)
and in all (``max_connections``), and reused for the next messages to the same address while
idle (``pool.py``).

MTA-STS, DANE (``tls_policy.py``, ``mta_sts.py``, ``dane.py``) and smarthosts
(``smarthost.py``) are configured through ``outbound.py``'s settings.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Any

from pydantic import Field

from tampu import (
    DeliveryResult,
    PluginContext,
    QueueItem,
    Recipient,
    ServerContext,
    domain_of,
    hookimpl,
)
from tampu.addresses import ascii_address
from tampu.plugins.delivery_smtp import smarthost
from tampu.plugins.delivery_smtp.client import ClientConfig, Job, LevelCheck, NextHost, deliver_to
from tampu.plugins.delivery_smtp.mx import Target, host_addresses, mx_hosts, parse_via
from tampu.plugins.delivery_smtp.outbound import OutboundSettings, build
from tampu.plugins.delivery_smtp.pool import POOL, ConnectionPool
from tampu.plugins.delivery_smtp.smarthost import Relay
from tampu.plugins.delivery_smtp.tls_policy import DomainPlan, HostRefused
from tampu.plugins.domaininfo.store import DOMAININFO_STORE, SecLevel

Pairs = list[tuple[Recipient, DeliveryResult]]


class DeliverySmtpSettings(OutboundSettings):
    port: int = Field(default=25, ge=1, le=65535, description="Port of the remote MX servers "
                      "(25; only tests and special set-ups change it). Hosts of a via route "
                      "may name their own port.")
    helo: str = Field(default="", description="Name sent in EHLO/HELO; empty: [server] "
                      "hostname.")
    tls_ca_file: str = Field(default="", description="Extra CA certificates (PEM) trusted when "
                             "verifying remote servers, besides the system's; relative to the "
                             "configuration directory.")
    connect_timeout: float = Field(default=60.0, gt=0, description="Seconds to connect and get "
                                   "the greeting.")
    command_timeout: float = Field(default=300.0, gt=0, description="Seconds to wait for the "
                                   "reply to each command (RFC 5321 4.5.3.2: 5 minutes).")
    data_timeout: float = Field(default=600.0, gt=0, description="Seconds to wait for the "
                                "reply after the message data (RFC 5321: 10 minutes).")
    attempt_timeout: float = Field(default=0.0, ge=0, description="Seconds one delivery "
                                   "attempt (all hosts) may take; 0: [server] delivery_timeout "
                                   "less one second, since the core stops a hook that runs "
                                   "longer.")
    max_hosts: int = Field(default=10, ge=1, description="MX hosts tried per attempt.")
    max_connections_per_destination: int = Field(
        default=20, ge=1, description="Connections open at once to one remote address and "
        "port, idle ones included (Postfix: default_destination_concurrency_limit 20); more "
        "deliveries there wait for one of them.")
    max_connections: int = Field(
        default=100, ge=1, description="Outgoing connections open at once in all, idle ones "
        "included (idle ones are closed to make room).")
    max_recipients_per_transaction: int = Field(
        default=50, ge=1, description="Recipients of one message sent in one transaction "
        "(several RCPT TO) to the same destination (Postfix: "
        "smtp_destination_recipient_limit 50); more make more transactions.")
    connection_idle_timeout: float = Field(
        default=5.0, ge=0, description="Seconds a connection stays open, idle, after a "
        "delivery, for the next message to the same address (RSET first); 0: a connection "
        "per transaction, closed after it.")
    connection_max_messages: int = Field(
        default=100, ge=1, description="Transactions one connection carries before it is "
        "closed.")


class DeliverySmtpPlugin:
    Settings = DeliverySmtpSettings

    def __init__(self, ctx: PluginContext[DeliverySmtpSettings]) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.outbound = build(settings, ctx.server, name=ctx.name, ca_file=ctx.path(
            settings.tls_ca_file) if settings.tls_ca_file else None)
        self.client = ClientConfig(
            helo=settings.helo or ctx.server.hostname,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            data_timeout=settings.data_timeout,
            verified_tls=self.outbound.security.verified,
            unverified_tls=self.outbound.security.unverified,
        )
        self.pool = self._pool()

    @property
    def attempt_timeout(self) -> float:
        if self.ctx.settings.attempt_timeout:
            return self.ctx.settings.attempt_timeout
        return max(1.0, float(self.ctx.server.settings.delivery_timeout) - 1.0)

    def _pool(self) -> ConnectionPool:
        settings = self.ctx.settings
        return self.ctx.server.stash.setdefault(POOL, ConnectionPool(
            settings.max_connections_per_destination, settings.max_connections,
            settings.connection_idle_timeout, settings.connection_max_messages))

    @hookimpl
    def tampu_reload(self, context: ServerContext) -> None:
        settings = self.ctx.settings
        self.pool.configure(per_destination=settings.max_connections_per_destination,
                            total=settings.max_connections,
                            idle_timeout=settings.connection_idle_timeout,
                            max_messages=settings.connection_max_messages)

    @hookimpl
    async def tampu_shutdown(self, context: ServerContext) -> None:
        await self.pool.close()

    def _claim(self, item: QueueItem, rcpt: Recipient) -> tuple[Hashable, str, list[str]] | None:
        """How ``rcpt`` leaves (its group key, domain, via hosts), or None: not ours."""
        route = rcpt.route
        if route.pipe is not None:
            return None
        domain = domain_of(rcpt.address)
        via = list(route.via)
        if not via and (not domain or self.ctx.server.is_local_domain(domain)):
            return None  # local: for a local delivery backend
        sender = route.mail_from or item.mail_from
        if via:
            return ("via", sender, tuple(via)), domain, via
        relay = self.outbound.smarthosts.pick(domain)
        if relay is not None:
            return ("relay", sender, relay), domain, via
        return ("mx", sender, domain.lower()), domain, via

    @hookimpl
    async def deliver_batch(self, item: QueueItem, recipients: list[Recipient],
                            message: bytes) -> Pairs | None:
        groups: dict[Hashable, list[Recipient]] = {}
        how: dict[Hashable, tuple[str, list[str]]] = {}
        for rcpt in recipients:
            claim = self._claim(item, rcpt)
            if claim is not None:
                key, domain, via = claim
                groups.setdefault(key, []).append(rcpt)
                how[key] = (domain, via)
        if not groups:
            return None
        out: Pairs = []
        size = self.ctx.settings.max_recipients_per_transaction
        try:
            async with asyncio.timeout(self.attempt_timeout):
                for key, rcpts in groups.items():
                    domain, via = how[key]
                    for first in range(0, len(rcpts), size):
                        chunk = rcpts[first:first + size]
                        out.extend(await self._deliver_chunk(item, chunk, message, domain,
                                                             via))
        except TimeoutError:
            late = DeliveryResult.temporary(
                f"delivery attempt took longer than {self.attempt_timeout:g}s", enhanced="4.4.1")
            done = {id(r) for r, _ in out}
            out.extend((r, late) for rcpts in groups.values() for r in rcpts
                       if id(r) not in done)
        return out

    @hookimpl
    async def delivery_route(self, item: QueueItem, recipient: Recipient) -> str | None:
        claim = self._claim(item, recipient)
        if claim is None:
            return None
        _, domain, via = claim
        rewritten = recipient.route.mail_from
        sender = f" (envelope sender <{rewritten}>)" if rewritten else ""
        if via:
            return f"SMTP via {', '.join(via)}{sender}"
        relay = self.outbound.smarthosts.pick(domain)
        if relay is not None:
            return f"SMTP through {relay.label}{sender}"
        hosts = await mx_hosts(self.ctx.server.dns, domain)
        if isinstance(hosts, DeliveryResult):
            return f"SMTP to the MX of {domain}: none usable now ({hosts.text}){sender}"
        return f"SMTP to the MX of {domain}: {', '.join(hosts)}{sender}"

    @hookimpl
    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> DeliveryResult | None:
        pairs = await self.deliver_batch(item, [recipient], message)
        return pairs[0][1] if pairs else None

    async def _deliver_chunk(self, item: QueueItem, rcpts: list[Recipient], message: bytes,
                             domain: str, via: list[str]) -> Pairs:
        route = rcpts[0].route
        job = Job(mail_from=ascii_address(route.mail_from or item.mail_from),
                  rcpts=tuple(ascii_address(r.address) for r in rcpts), message=message,
                  smtputf8=item.smtputf8)
        results = await self._deliver(item, job, domain, via)
        return list(zip(rcpts, results, strict=True))

    async def _deliver(self, item: QueueItem, job: Job, domain: str,
                       via: Any) -> list[DeliveryResult]:
        """One result per recipient of ``job``."""
        count = len(job.rcpts)
        port = self.ctx.settings.port
        plan: DomainPlan | None = None
        if via:
            specs = [via] if isinstance(via, str) else list(via)
            try:
                targets = [parse_via(str(spec), port) for spec in specs]
            except ValueError as exc:
                return [DeliveryResult.permanent(f"bad via route: {exc}",
                                                 enhanced="5.3.5")] * count
        else:
            relay: Relay | None = self.outbound.smarthosts.pick(domain)
            if relay is not None:
                return await smarthost.deliver(
                    relay, self.client, job, self._level_check(relay.host),
                    self.outbound.resolver, self.outbound.security.verified,
                    lambda part, result: self._log(item, part, result), pool=self.pool)
            hosts = await mx_hosts(self.ctx.server.dns, domain)
            if isinstance(hosts, DeliveryResult):
                return [hosts] * count
            targets = [Target(host, port) for host in hosts]
            plan = await self.outbound.security.plan(domain)
        final: list[DeliveryResult | None] = [None] * count
        last: list[DeliveryResult | None] = [None] * count

        def todo() -> list[int]:
            return [i for i, done in enumerate(final) if done is None]

        def skipped(indexes: list[int], result: DeliveryResult) -> None:
            for i in indexes:
                last[i] = result
            self._log(item, job.only(indexes), result)

        for target in targets[: self.ctx.settings.max_hosts]:
            if not todo():
                break
            # via hosts are checked under their own name; MX hosts under the domain's
            check = self._level_check(target.host if via else domain)
            require = None
            if plan is not None:  # MTA-STS and DANE (tls_policy.py)
                try:
                    require = await plan.requirement(target.host, target.port)
                except HostRefused as exc:
                    skipped(todo(), exc.result)
                    continue
                check = plan.level_check(target.host, check)
            try:
                addresses = await host_addresses(self.ctx.server.dns, target.host)
            except LookupError as exc:
                skipped(todo(), DeliveryResult.temporary(str(exc.args[0]), enhanced="4.4.3",
                                                         remote=target.host))
                continue
            for address in addresses:
                indexes = todo()
                if not indexes:
                    break
                try:
                    results = await deliver_to(self.client, target, address,
                                               job.only(indexes), check, require,
                                               pool=self.pool)
                except NextHost as exc:
                    skipped(indexes, exc.result)
                    continue
                for i, result in zip(indexes, results, strict=True):
                    if plan is not None:
                        result = plan.annotate(target.host, result)
                    if result.status == "temporary":
                        skipped([i], result)
                    else:
                        final[i] = result
        out = []
        for done, tried in zip(final, last, strict=True):
            chosen = done if done is not None else tried
            out.append(chosen if chosen is not None else DeliveryResult.temporary(
                f"no mail host for {domain}", enhanced="4.4.4"))
        return out

    def _level_check(self, key: str) -> LevelCheck | None:
        store = self.ctx.server.stash.get(DOMAININFO_STORE, None)
        if store is None:
            return None

        async def check(level: SecLevel) -> bool:
            return await store.check_outgoing(key, level)

        return check

    def _log(self, item: QueueItem, job: Job, result: DeliveryResult) -> None:
        self.ctx.log.info("qid=%s to=%s remote=%s: not delivered here: %s%s", item.id,
                          ",".join(f"<{r}>" for r in job.rcpts), result.remote or "-",
                          f"{result.code} " if result.code else "", result.text)
