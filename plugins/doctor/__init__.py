"""``doctor``: ``tampu doctor DOMAIN`` checks what a domain needs to deliver well.

With the configured resolver (``[server] dns_servers``) it checks the MX (pointing at
``[server] hostname``), the host's A/AAAA and PTR records, SPF (evaluated for each of the
host's addresses), the DKIM records of the local keys, DMARC, MTA-STS (record and policy),
TLS-RPT and the certificate's names and expiry; it prints one line per check and, for each
that is not ok, the exact record to publish. Exit status: 0 when nothing failed (warnings
allowed), 1 when something failed, 2 for a configuration error (anything ``tampu check``
refuses, a bad ``[plugins.doctor]`` value, a name that is not a domain).

The plugin has no hooks: it only adds the command (``tampu_register_cli``). Its settings
(``[plugins.doctor]``, :mod:`.settings`) are read whether it is enabled or not.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from tampu import PluginContext, hookimpl
from tampu.plugins.doctor.settings import DoctorSettings

if TYPE_CHECKING:
    from tampu.config import Config
    from tampu.plugins.doctor.report import Finding

__all__ = ["DoctorPlugin", "DoctorSettings"]


class DoctorPlugin:
    """Nothing to do in the server; ``tampu doctor`` is the whole plugin."""

    Settings = DoctorSettings

    def __init__(self, ctx: PluginContext[DoctorSettings]) -> None:
        self.ctx = ctx


@hookimpl
def tampu_register_cli(subparsers: argparse._SubParsersAction[Any]) -> None:
    """``tampu doctor DOMAIN [--json]``."""
    from tampu.cli import config_dir_option

    p = config_dir_option(subparsers.add_parser(
        "doctor", help="check the DNS records, PTR, SPF, DKIM, DMARC, MTA-STS, TLS-RPT and "
        "certificate a domain needs, and print the records to publish"))
    p.add_argument("domain", help="the mail domain (example.com)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(func=_cli)


def _settings(config: Config) -> DoctorSettings:
    from tampu.registry import validate_plugin_settings

    if "doctor" not in config.plugins:
        return DoctorSettings()
    validated = validate_plugin_settings(config, "doctor", DoctorPlugin)
    assert isinstance(validated, DoctorSettings)
    return validated


def _cli(args: argparse.Namespace) -> int:
    from tampu.addresses import AddressError, domain_to_ascii, normalize_domain
    from tampu.cli import check, load, print_problems
    from tampu.errors import ConfigError

    try:
        config = load(args)
        check(config)  # what tampu check validates: a server that would not start is no base
        settings = _settings(config)
        if settings.tls_ca_file and not (config.config_dir / settings.tls_ca_file).is_file():
            raise ConfigError([f"plugins.doctor.tls_ca_file: no file "
                               f"{config.config_dir / settings.tls_ca_file}"])
    except ConfigError as exc:
        print_problems(exc)
        return 2
    try:
        domain = normalize_domain(args.domain)
        domain_to_ascii(domain)
    except AddressError as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 2
    from tampu.plugins.doctor.report import exit_code, render_json, render_text

    findings = asyncio.run(_run(config, settings, domain))
    server = config.server
    if args.json:
        sys.stdout.write(render_json(findings, domain, server.hostname))
    else:
        where = ", ".join(server.dns_servers) or "the system's resolver"
        sys.stdout.write(render_text(findings, f"tampu doctor {domain}: this host is "
                                     f"{server.hostname}; DNS from {where}"))
    return exit_code(findings)


async def _run(config: Config, settings: DoctorSettings, domain: str) -> list[Finding]:
    from tampu.dns import Resolver
    from tampu.plugins.doctor.checks import Doctor

    resolver = Resolver.from_settings(config.server.dns_servers, config.server.dns_timeout)
    try:
        return await Doctor(config, settings, resolver).run(domain)
    finally:
        resolver.close()
