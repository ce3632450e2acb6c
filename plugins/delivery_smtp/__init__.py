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

The hook is per recipient, so each attempt uses one connection per recipient; grouping the
recipients of one destination in one transaction would need a batch delivery hook.

MTA-STS, DANE (``tls_policy.py``, ``mta_sts.py``, ``dane.py``) and smarthosts
(``smarthost.py``) are configured through ``outbound.py``'s settings.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from pydantic import Field

from tampu import (
    DeliveryResult,
    PluginContext,
    QueueItem,
    Recipient,
    domain_of,
    hookimpl,
)
from tampu.addresses import ascii_address
from tampu.plugins.delivery_smtp import smarthost
from tampu.plugins.delivery_smtp.client import ClientConfig, Job, LevelCheck, NextHost, deliver_to
from tampu.plugins.delivery_smtp.mx import Target, host_addresses, mx_hosts, parse_via
from tampu.plugins.delivery_smtp.outbound import OutboundSettings, build
from tampu.plugins.delivery_smtp.tls_policy import DomainPlan, HostRefused
from tampu.plugins.domaininfo.store import DOMAININFO_STORE, SecLevel


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


class DeliverySmtpPlugin:
    Settings = DeliverySmtpSettings

    def __init__(self, ctx: PluginContext[DeliverySmtpSettings]) -> None:
        self.ctx = ctx
        settings = ctx.settings
        verified = ssl.create_default_context()
        if settings.tls_ca_file:
            verified.load_verify_locations(cafile=str(ctx.path(settings.tls_ca_file)))
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        self.client = ClientConfig(
            helo=settings.helo or ctx.server.hostname,
            connect_timeout=settings.connect_timeout,
            command_timeout=settings.command_timeout,
            data_timeout=settings.data_timeout,
            verified_tls=verified,
            unverified_tls=unverified,
        )
        self.outbound = build(settings, ctx.server, name=ctx.name, ca_file=ctx.path(
            settings.tls_ca_file) if settings.tls_ca_file else None)

    @property
    def attempt_timeout(self) -> float:
        if self.ctx.settings.attempt_timeout:
            return self.ctx.settings.attempt_timeout
        return max(1.0, float(self.ctx.server.settings.delivery_timeout) - 1.0)

    @hookimpl
    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> DeliveryResult | None:
        route = recipient.route
        if route.pipe is not None:
            return None
        domain = domain_of(recipient.address)
        via = list(route.via)
        if not via and (not domain or self.ctx.server.is_local_domain(domain)):
            return None  # local: for a local delivery backend
        job = Job(mail_from=ascii_address(route.mail_from or item.mail_from),
                  rcpt=ascii_address(recipient.address), message=message,
                  smtputf8=item.smtputf8)
        try:
            async with asyncio.timeout(self.attempt_timeout):
                return await self._deliver(item, job, domain, via)
        except TimeoutError:
            return DeliveryResult.temporary(
                f"delivery attempt took longer than {self.attempt_timeout:g}s", enhanced="4.4.1")

    async def _deliver(self, item: QueueItem, job: Job, domain: str,
                       via: Any) -> DeliveryResult:
        port = self.ctx.settings.port
        plan: DomainPlan | None = None
        if via:
            specs = [via] if isinstance(via, str) else list(via)
            try:
                targets = [parse_via(str(spec), port) for spec in specs]
            except ValueError as exc:
                return DeliveryResult.permanent(f"bad via route: {exc}", enhanced="5.3.5")
        else:
            relay = self.outbound.smarthosts.pick(domain)
            if relay is not None:
                return await smarthost.deliver(
                    relay, self.client, job, self._level_check(relay.host),
                    self.outbound.resolver, self.outbound.security.verified,
                    lambda result: self._log(item, job, result))
            hosts = await mx_hosts(self.ctx.server.dns, domain)
            if isinstance(hosts, DeliveryResult):
                return hosts
            targets = [Target(host, port) for host in hosts]
            plan = await self.outbound.security.plan(domain)
        last: DeliveryResult | None = None
        for target in targets[: self.ctx.settings.max_hosts]:
            # via hosts are checked under their own name; MX hosts under the domain's
            check = self._level_check(target.host if via else domain)
            require = None
            if plan is not None:  # MTA-STS and DANE (tls_policy.py)
                try:
                    require = await plan.requirement(target.host, target.port)
                except HostRefused as exc:
                    last = exc.result
                    self._log(item, job, last)
                    continue
                check = plan.level_check(target.host, check)
            try:
                addresses = await host_addresses(self.ctx.server.dns, target.host)
            except LookupError as exc:
                last = DeliveryResult.temporary(str(exc.args[0]), enhanced="4.4.3",
                                                remote=target.host)
                self._log(item, job, last)
                continue
            for address in addresses:
                try:
                    result = await deliver_to(self.client, target, address, job, check,
                                              require)
                except NextHost as exc:
                    last = exc.result
                    self._log(item, job, last)
                    continue
                return plan.annotate(target.host, result) if plan is not None else result
        if last is None:
            return DeliveryResult.temporary(f"no mail host for {domain}", enhanced="4.4.4")
        return last

    def _level_check(self, key: str) -> LevelCheck | None:
        store = self.ctx.server.stash.get(DOMAININFO_STORE, None)
        if store is None:
            return None

        async def check(level: SecLevel) -> bool:
            return await store.check_outgoing(key, level)

        return check

    def _log(self, item: QueueItem, job: Job, result: DeliveryResult) -> None:
        self.ctx.log.info("qid=%s to=<%s> remote=%s: not delivered here: %s%s", item.id,
                          job.rcpt, result.remote or "-",
                          f"{result.code} " if result.code else "", result.text)
