"""``domaininfo``: per-domain security levels, to refuse connection downgrades (chasquid's).

Once a domain has shown it can do better, tampu refuses to do worse with it:

* **outgoing** (checked by ``delivery_smtp`` through the store in the server stash): plain <
  tls_unverified < tls_verified; a delivery that would go at a lower level than recorded is not
  sent (temporary failure, retried later);
* **incoming** (checked here at MAIL FROM, only for unauthenticated sessions whose sender passed
  SPF, so that nobody can raise another domain's level): plain < tls; a lower level than
  recorded is refused with ``451 4.7.3`` (chasquid refuses for good with 550 5.7.3; a temporary
  refusal lets a legitimate sender that lost TLS keep its mail until an operator forgets the
  domain).

Levels live in the server's state store (see ``store.py``): by default
``<data_dir>/domaininfo/<domain>.json`` (delete a file to forget a domain), with ``[server]
state_store = "postgres"`` a table every node shares. ``tampu domaininfo show|remove`` work on
either.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from pydantic import Field

from tampu import (
    Envelope,
    PluginContext,
    PluginSettings,
    Reply,
    ServerContext,
    Session,
    domain_of,
    dry_run_unsafe,
    hookimpl,
)
from tampu.authres import results
from tampu.errors import StateError
from tampu.plugins.domaininfo.store import (
    DOMAININFO_STORE,
    NAMESPACE,
    DomainInfoStore,
    SecLevel,
    domain_key,
)
from tampu.state_store import LocalStateStore

SECURITY_DOWNGRADE = Reply(451, "4.7.3", "Security level check failed: this domain used TLS "
                                         "before; try again over TLS")


class DomainInfoSettings(PluginSettings):
    directory: str = Field(default="domaininfo", description="Where the levels are kept; "
                           "relative paths are relative to [server] data_dir.")
    incoming: bool = Field(default=True, description="Refuse mail from a domain (SPF pass) "
                           "over a connection less secure than it used before.")
    outgoing: bool = Field(default=True, description="Refuse to deliver to a domain over a "
                           "connection less secure than it offered before (used by "
                           "delivery_smtp).")


class DomainInfoPlugin:
    Settings = DomainInfoSettings

    def __init__(self, ctx: PluginContext[DomainInfoSettings]) -> None:
        self.ctx = ctx
        state = ctx.server.state
        if isinstance(state, LocalStateStore):  # files: where the directory setting says
            state.set_directory(NAMESPACE, ctx.server.data_dir / ctx.settings.directory)
        self.store = DomainInfoStore(state, incoming=ctx.settings.incoming,
                                     outgoing=ctx.settings.outgoing,
                                     check_interval=ctx.server.settings.file_check_interval)

    @hookimpl
    def tampu_startup(self, context: ServerContext) -> None:
        context.stash[DOMAININFO_STORE] = self.store

    @hookimpl
    def tampu_reload(self, context: ServerContext) -> None:
        context.stash[DOMAININFO_STORE] = self.store

    @hookimpl
    @dry_run_unsafe  # it records levels it has not seen before
    async def smtp_mail_from(self, session: Session, envelope: Envelope, address: str,
                             params: dict[str, str | bool]) -> Reply | None:
        if session.authenticated or not self.ctx.settings.incoming:
            return None
        domain = domain_of(address)
        if not domain or not spf_passed(envelope, domain):
            return None  # no proof that the client speaks for the domain: do not judge
        level = SecLevel.PLAIN if session.tls is None else SecLevel.TLS_UNVERIFIED
        if level == self.store.cached_level(domain, "incoming"):
            return None  # the usual case: as secure as before, nothing to record
        try:
            ok = await self.store.check_incoming(domain, level)
        except StateError as exc:  # fail open: the level is a hardening, SPF passed
            self.ctx.log.error("session %s: security level of %s not checked: %s", session.id,
                               domain, exc)
            return None
        if ok:
            return None
        self.ctx.log.warning("session %s: refused <%s> from %s: incoming security level %s is "
                             "below the level recorded for %s", session.id, address,
                             session.peer_host, level.label, domain)
        return SECURITY_DOWNGRADE


def spf_passed(envelope: Envelope, domain: str) -> bool:
    """Whether SPF passed for a MAIL FROM in ``domain`` in this transaction."""
    return any(r.result == "pass" and domain_of(r.prop("smtp.mailfrom") or "") == domain
               for r in results(envelope, "spf"))


# ------------------------------------------------------------------------------ CLI


@hookimpl
def tampu_register_cli(subparsers: argparse._SubParsersAction[Any]) -> None:
    """``tampu domaininfo show [DOMAIN]`` and ``tampu domaininfo remove DOMAIN``."""
    from tampu.cli import config_dir_option

    p = config_dir_option(subparsers.add_parser(
        "domaininfo", help="the security levels learned per domain (chasquid-util's "
        "domaininfo-remove)"))
    sub = p.add_subparsers(dest="domaininfo_command", required=True)
    show = config_dir_option(sub.add_parser("show", help="the levels of one or every domain"))
    show.add_argument("domain", nargs="?")
    rm = config_dir_option(sub.add_parser("remove", help="forget a domain (after it really "
                                          "lowered its security)"))
    rm.add_argument("domain")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tampu.cli import load, print_problems
    from tampu.errors import ConfigError, TampuError
    from tampu.registry import validate_plugin_settings
    from tampu.stores import make_stores

    try:
        config = load(args)
        settings = validate_plugin_settings(config, "domaininfo", DomainInfoPlugin) \
            if "domaininfo" in config.plugins else DomainInfoSettings()
        stores = make_stores(config)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    assert isinstance(settings, DomainInfoSettings)
    if isinstance(stores.state, LocalStateStore):
        stores.state.set_directory(NAMESPACE, config.data_dir / settings.directory)

    async def run() -> int:
        await stores.open()
        try:
            return await _cli_run(args, DomainInfoStore(stores.state))
        finally:
            await stores.close()

    try:
        return asyncio.run(run())
    except TampuError as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 1


async def _cli_run(args: argparse.Namespace, store: DomainInfoStore) -> int:
    if args.domaininfo_command == "remove":
        if await store.forget(args.domain):
            print(f"forgot {args.domain}: the next connections set its levels again")
            return 0
        print(f"tampu: nothing is known of {args.domain}", file=sys.stderr)
        return 1
    domains = [args.domain] if args.domain else await store.domains()
    if not domains:
        print("no domain known yet")
    for domain in domains:
        if domain_key(domain) is None:
            print(f"tampu: {domain!r} is not a domain name", file=sys.stderr)
            return 2
        record = await store.record(domain)
        print(f"{domain}  incoming={SecLevel.from_label(record.get('incoming', 'plain')).label}"
              f"  outgoing={SecLevel.from_label(record.get('outgoing', 'plain')).label}")
    return 0
