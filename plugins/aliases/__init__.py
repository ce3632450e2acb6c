"""``aliases``: chasquid-compatible email aliases (``domains/<domain>/aliases``).

* At RCPT TO, a local recipient that has an alias (or a catch-all, or that the
  ``hooks/alias-exists`` program accepts) is accepted; this plugin runs before ``localusers``.
* Before queueing, each local recipient is expanded to its final recipients
  (``queue_expand_recipient``) with route hints for the delivery backends: ``{"pipe": cmd}``,
  ``{"via": [hosts]}``, and ``{"forward": true, "mail_from": ...}`` for remote destinations,
  whose envelope sender is rewritten like chasquid does when the sender is not local.
* ``tampu aliases resolve ADDRESS`` shows what an address expands to and how.
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
    QueueItem,
    Recipient,
    Reply,
    ServerContext,
    Session,
    blocking,
    hookimpl,
)
from tampu.plugins.aliases.parser import AliasesError, Kind
from tampu.plugins.aliases.resolver import (
    AliasFiles,
    Final,
    HookPrograms,
    Resolver,
    user_exists_in,
)
from tampu.reply import RECIPIENT_OK


class AliasesSettings(PluginSettings):
    priority: int = Field(default=50, description="Order on each hook: lower runs first. Below "
                          "localusers (100) so aliases are consulted first at RCPT TO.")
    max_depth: int = Field(default=10, ge=1, le=100, description="Levels of aliases to follow; "
                           "past it the whole resolution fails (chasquid: 10).")
    program_timeout: float = Field(default=5.0, gt=0, description="Seconds the alias-resolve and "
                                "alias-exists programs may run (chasquid: 5).")
    rewrite_sender: bool = Field(default=True, description="When forwarding to a remote "
                                 "domain mail whose sender is not local, use the envelope "
                                 "sender user+fwd_from=sender=domain@alias-domain (chasquid's "
                                 "sender rewriting), so SPF at the destination passes.")


def build_resolver(server: ServerContext, settings: AliasesSettings) -> Resolver:
    config = server.config
    drop, seps = config.server.drop_characters, config.server.suffix_separators
    interval = config.server.file_check_interval
    files = AliasFiles(config.domains_dir, drop, seps, interval)
    hooks = HookPrograms(config.config_dir, settings.program_timeout, interval)
    return Resolver(files, hooks, server.is_local_domain,
                    user_exists_in(config.domains_dir, drop, seps, interval), settings.max_depth)


def rewrite_sender(sender: str, original: str, separators: str) -> str:
    """chasquid's send-only SRS: ``user+fwd_from=sender=dom@alias-domain``."""
    user, _, domain = original.rpartition("@")
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    sep = "+" if "+" in separators or not separators else separators[0]
    return f"{user}{sep}fwd_from={sender.replace('@', '=')}@{domain}"


class AliasesPlugin:
    Settings = AliasesSettings

    def __init__(self, ctx: PluginContext[AliasesSettings]) -> None:
        self.ctx = ctx
        self.resolver = build_resolver(ctx.server, ctx.settings)

    @hookimpl
    async def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                           params: dict[str, str | bool]) -> Reply | None:
        if await self.resolver.exists(address):
            return RECIPIENT_OK
        return None  # not an alias: localusers (or nobody) decides

    @hookimpl
    async def queue_expand_recipient(self, envelope: Envelope | None, item: QueueItem,
                                     recipient: str) -> list[Recipient] | None:
        if not self.ctx.server.is_local_address(recipient):
            return None
        try:
            finals = await self.resolver.resolve(recipient)
        except AliasesError as exc:
            self.ctx.log.error("qid=%s cannot resolve aliases of <%s>: %s", item.id, recipient,
                               exc)
            raise
        if len(finals) == 1 and not finals[0].aliased:
            return None
        out = [self.to_recipient(final, recipient, item.mail_from) for final in finals]
        self.ctx.log.info("qid=%s <%s> expanded to %s", item.id, recipient,
                          ", ".join(describe(r) for r in out) or "nothing")
        return out

    def to_recipient(self, final: Final, original: str, mail_from: str) -> Recipient:
        if final.kind is Kind.PIPE:
            return Recipient(final.path[-1], original, route={"pipe": final.value})
        local = self.ctx.server.is_local_address(final.value)
        if final.kind is Kind.EMAIL and local:
            return Recipient(final.value, original)
        route: dict[str, Any] = {"forward": True}
        if final.kind is Kind.FORWARD:
            route["via"] = list(final.via)
        if (self.ctx.settings.rewrite_sender and mail_from
                and not self.ctx.server.is_local_address(mail_from)):
            separators = self.ctx.server.config.server.suffix_separators
            route["mail_from"] = rewrite_sender(mail_from, original, separators)
        return Recipient(final.value, original, route=route)

    @hookimpl
    @blocking
    def tampu_reload(self, context: ServerContext) -> None:
        self.resolver.files.reload()


def describe(rcpt: Recipient) -> str:
    if "pipe" in rcpt.route:
        return f"| {rcpt.route['pipe']}"
    text = f"<{rcpt.address}>"
    if "via" in rcpt.route:
        text += f" via {'/'.join(rcpt.route['via'])}"
    if "mail_from" in rcpt.route:
        text += f" (from <{rcpt.route['mail_from']}>)"
    return text


# ------------------------------------------------------------------------------ CLI


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tampu aliases resolve ADDRESS``: found by the CLI through this plugin's entry point."""
    p = subparsers.add_parser("aliases", help="inspect aliases (domains/<domain>/aliases)")
    p.add_argument("--config-dir", default=".", help="configuration directory")
    sub = p.add_subparsers(dest="aliases_command", required=True)
    here = argparse.ArgumentParser(add_help=False)  # --config-dir after the subcommand too
    here.add_argument("--config-dir", default=argparse.SUPPRESS, help="configuration directory")
    res = sub.add_parser("resolve", help="show the final recipients of an address and how "
                         "each is reached (runs the alias hooks too)", parents=[here])
    res.add_argument("address", help="user@domain")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tampu.config import load_config
    from tampu.errors import ConfigError
    from tampu.registry import validate_plugin_settings

    try:
        config = load_config(args.config_dir)
        settings = AliasesSettings()
        if "aliases" in config.plugins:
            validated = validate_plugin_settings(config, "aliases", AliasesPlugin)
            assert isinstance(validated, AliasesSettings)
            settings = validated
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tampu: {problem}", file=sys.stderr)
        return 2
    server = ServerContext(config)
    address = args.address.strip().strip("<>")
    if not server.is_local_address(address):
        print(f"{address}: not a local domain; delivered as it is")
        return 0
    resolver = build_resolver(server, settings)
    try:
        finals = asyncio.run(resolver.resolve(address))
    except AliasesError as exc:
        print(f"tampu: cannot resolve {address}: {exc}", file=sys.stderr)
        return 1
    for final in finals:
        chain = " -> ".join(final.path)
        if final.kind is Kind.PIPE:
            print(f"| {final.value}\tpipe, reached by {chain}")
        elif final.kind is Kind.FORWARD:
            print(f"{final.value}\tforward via {'/'.join(final.via)}, reached by {chain}")
        elif not server.is_local_address(final.value):
            print(f"{final.value}\tremote (forwarded), reached by {chain}")
        elif not final.aliased:
            print(f"{final.value}\tlocal, no alias")
        else:
            print(f"{final.value}\tlocal, reached by {chain}")
    return 0
