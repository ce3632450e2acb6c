"""Settings of MTA-STS, DANE and the smarthost, and what the plugin builds from them.

``DeliverySmtpSettings`` derives from :class:`OutboundSettings`, so these keys live in
``[plugins.delivery_smtp]``; :func:`build` makes the :class:`Outbound` bundle the plugin keeps
(one DNS client for these lookups, the MTA-STS cache, the relays).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from tampu import ConfigError, PluginSettings, ServerContext, StashKey
from tampu.dns import Resolver
from tampu.plugins.delivery_smtp.mta_sts import MtaSts, PolicyCache, PolicyFetcher
from tampu.plugins.delivery_smtp.smarthost import Smarthosts, SmarthostSettings
from tampu.plugins.delivery_smtp.tls_policy import OutboundSecurity

MTA_STS_DIRECTORY = "mta-sts"
"""Where policies are cached, under ``[server] data_dir``."""

_RESOLVER: StashKey[tuple[tuple[tuple[str, ...], float], Resolver]] = StashKey()
"""The DNS client of these lookups, kept in the server stash so that a reload (which makes a
new plugin instance) reuses it instead of leaking its sockets."""


class OutboundSettings(PluginSettings):
    mta_sts: bool = Field(default=True, description="Apply the MTA-STS policies (RFC 8461) of "
                          "recipient domains: in enforce mode, mail goes only to the MX hosts "
                          "a policy lists, over TLS with a valid certificate.")
    mta_sts_port: int = Field(default=443, ge=1, le=65535, description="Port of the MTA-STS "
                              "policy hosts (443; only tests change it).")
    mta_sts_timeout: float = Field(default=60.0, gt=0, description="Seconds one policy fetch "
                                   "may take (RFC 8461 suggests one minute).")
    dane: bool = Field(default=True, description="Authenticate MX hosts with DNSSEC-signed "
                       "TLSA records (DANE, RFC 7672). Needs a validating resolver in [server] "
                       "dns_servers (e.g. unbound on 127.0.0.1).")
    smarthost: SmarthostSettings | None = Field(default=None, description="A relay for all "
                                                "remote mail (a sub-table: host, tls, "
                                                "username, password); none: deliver by MX.")
    smarthost_domains: dict[str, SmarthostSettings] = Field(
        default_factory=dict, description="Relays per recipient domain (sub-tables like "
        "smarthost), used instead of the smarthost or MX for that domain.")

    secret_fields: ClassVar[tuple[str, ...]] = ("smarthost", "smarthost_domains")


@dataclass
class Outbound:
    """What the plugin holds for MTA-STS, DANE and the smarthost."""

    resolver: Resolver
    security: OutboundSecurity
    smarthosts: Smarthosts


def build(settings: OutboundSettings, server: ServerContext, *, name: str,
          ca_file: Path | None) -> Outbound:
    """Make the bundle from plugin ``name``'s settings. Raises ConfigError for a secret that
    cannot be read."""
    table = server.config.plugins.get(name)
    where = str(table.files[0]) if table is not None and table.files else "conf.d"
    try:
        relays = Smarthosts.from_settings(settings.smarthost, settings.smarthost_domains,
                                          server.config_dir)
    except ValueError as exc:
        raise ConfigError([f"{where}: key plugins.{name}.{exc}"]) from None
    resolver = server.dns  # the server's one DNS client
    security = OutboundSecurity(resolver, dane=settings.dane, ca_file=ca_file)
    if settings.mta_sts:
        fetch = PolicyFetcher(resolver, tls=security.verified, port=settings.mta_sts_port,
                              timeout=settings.mta_sts_timeout)
        security.mta_sts = MtaSts(resolver, PolicyCache(server.data_dir / MTA_STS_DIRECTORY),
                                  fetch)
    return Outbound(resolver=resolver, security=security, smarthosts=relays)
