"""``relay``: recipients in remote domains only for authenticated sessions (no open relay), and,
when configured, for clients of ``trusted_networks`` (Postfix's mynetworks).

A client of a trusted network is marked so on its session (``session.trusted_network``);
its messages may then leave for remote domains (the core's relay guard at delivery honours
the mark). Off by default: an empty list trusts nobody, and clients behind a proxy are judged
by the address the PROXY header gives.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, field_validator

from tampu import Envelope, PluginContext, PluginSettings, Reply, Session, hookimpl
from tampu.reply import RECIPIENT_OK, RELAY_DENIED

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class RelaySettings(PluginSettings):
    trusted_networks: list[str] = Field(
        default_factory=list, description="Networks (CIDR) whose clients may relay without "
        "AUTH, like Postfix's mynetworks (an office LAN, a web server). Empty: nobody.")

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return value


class RelayPlugin:
    Settings = RelaySettings

    def __init__(self, ctx: PluginContext[RelaySettings]) -> None:
        self.ctx = ctx
        self.trusted: list[Network] = [ipaddress.ip_network(n, strict=False)
                                       for n in ctx.settings.trusted_networks]

    def is_trusted(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        return any(addr in net for net in self.trusted)

    @hookimpl
    def smtp_connect(self, session: Session) -> None:
        if self.trusted and self.is_trusted(session.peer_host):
            session.trusted_network = True

    @hookimpl
    def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                     params: dict[str, str | bool]) -> Reply | None:
        if self.ctx.server.is_local_address(address):
            return None  # local recipients are for localusers / aliases to accept
        if session.may_relay:
            return RECIPIENT_OK
        return RELAY_DENIED
