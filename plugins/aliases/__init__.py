"""``aliases``: chasquid-compatible email aliases (``domains/<domain>/aliases``).

* At RCPT TO, a local recipient that has an alias (or a catch-all, or that the
  ``hooks/alias-exists`` program accepts) is accepted; this plugin runs before ``localusers``.
* Before queueing, each local recipient is expanded to its final recipients
  (``queue_expand_recipient``) with a route for the delivery backends: a pipe, ``via`` hosts,
  or a forward to a remote address, whose envelope sender is rewritten (:mod:`.srs`) when the
  sender is not local. A bounce to such a rewritten address goes back to the original sender.
* A malformed aliases file is a configuration error (``tampu check``, start-up, reload), with
  file and line; while running, a file that breaks keeps its previous content (logged).
* ``tampu aliases resolve ADDRESS`` shows what an address expands to and how;
  ``tampu aliases add ALIAS TARGET`` adds a line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
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
from tampu.errors import ConfigError
from tampu.item import Route
from tampu.plugins.aliases import srs
from tampu.plugins.aliases.parser import AliasesError, Kind
from tampu.plugins.aliases.resolver import AliasFiles, Final, HookPrograms, Resolver
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
                                 "sender alias+fwd_from=user=domain=TAG@alias-domain "
                                 "(chasquid's sender rewriting, with a tag so that bounces "
                                 "find their way back), so SPF at the destination passes.")
    key_file: str = Field(default="aliases.key", description="The key of the rewriting tags, "
                          "relative to [server] data_dir; made at first use. Nodes that "
                          "share a domain share this file.")


def build_resolver(server: ServerContext, settings: AliasesSettings) -> Resolver:
    config = server.config
    drop, seps = config.server.drop_characters, config.server.suffix_separators
    interval = config.server.file_check_interval
    files = AliasFiles(server.domains.folder, drop, seps, interval)
    hooks = HookPrograms(config.config_dir, settings.program_timeout, interval)
    users = server.users
    return Resolver(files, hooks, server.is_local_domain,
                    lambda user, domain: users.owner(f"{user}@{domain}") is not None,
                    settings.max_depth)


class AliasesPlugin:
    Settings = AliasesSettings

    def __init__(self, ctx: PluginContext[AliasesSettings]) -> None:
        self.ctx = ctx
        self.resolver = build_resolver(ctx.server, ctx.settings)
        problems = self.resolver.files.problems(ctx.server.local_domains())
        if problems:
            raise ConfigError(problems)
        seps = ctx.server.config.server.suffix_separators
        self.separator = "+" if "+" in seps or not seps else seps[0]
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = srs.load_key(self.ctx.server.data_dir / self.ctx.settings.key_file)
        return self._key

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
        if not item.mail_from:  # a bounce: to an address we rewrote? back to the sender
            back = srs.bounce_target(recipient, self.separator, self.key)
            if back is not None:
                self.ctx.log.info("qid=%s bounce to <%s> goes back to <%s>", item.id,
                                  recipient, back)
                return [Recipient(back, recipient, route=Route(forward=True))]
        try:
            finals = await self.resolver.resolve(recipient)
        except AliasesError as exc:
            self.ctx.log.error("qid=%s cannot resolve aliases of <%s>: %s", item.id, recipient,
                               exc)
            raise
        if len(finals) == 1 and not finals[0].aliased:
            return None
        out = [self.to_recipient(final, recipient, item.mail_from) for final in finals]
        log = self.ctx.log
        if log.isEnabledFor(logging.DEBUG):  # nothing to pay at the default level
            log.debug("qid=%s <%s> expanded to %s", item.id, recipient,
                      ", ".join(describe(r) for r in out) or "nothing")
        return out

    def to_recipient(self, final: Final, original: str, mail_from: str) -> Recipient:
        if final.kind is Kind.PIPE:
            return Recipient(final.path[-1], original, route=Route(pipe=final.value))
        local = self.ctx.server.is_local_address(final.value)
        if final.kind is Kind.EMAIL and local:
            return Recipient(final.value, original)
        sender = None
        if (self.ctx.settings.rewrite_sender and mail_from
                and not self.ctx.server.is_local_address(mail_from)):
            alias = next(a for a in reversed(final.path) if self.ctx.server.is_local_address(a))
            sender = srs.rewrite(mail_from, alias, self.separator, self.key)
        return Recipient(final.value, original, route=Route(
            via=final.via if final.kind is Kind.FORWARD else (), forward=True,
            mail_from=sender))

    @hookimpl
    @blocking
    def tampu_reload(self, context: ServerContext) -> None:
        self.resolver.files.reload()


def describe(rcpt: Recipient) -> str:
    if rcpt.route.pipe is not None:
        return f"| {rcpt.route.pipe}"
    text = f"<{rcpt.address}>"
    if rcpt.route.via:
        text += f" via {'/'.join(rcpt.route.via)}"
    if rcpt.route.mail_from:
        text += f" (from <{rcpt.route.mail_from}>)"
    return text


# ------------------------------------------------------------------------------ CLI


@hookimpl
def tampu_register_cli(subparsers: argparse._SubParsersAction[Any]) -> None:
    register_cli(subparsers)


def register_cli(subparsers: argparse._SubParsersAction[Any]) -> None:
    """``tampu aliases resolve|add``."""
    from tampu.cli import config_dir_option

    p = config_dir_option(subparsers.add_parser(
        "aliases", help="inspect and edit aliases (domains/<domain>/aliases)"))
    sub = p.add_subparsers(dest="aliases_command", required=True)
    res = config_dir_option(sub.add_parser(
        "resolve", help="show the final recipients of an address and how each is reached "
        "(runs the alias hooks too)"))
    res.add_argument("address", help="user@domain")
    add = config_dir_option(sub.add_parser("add", help="add (or replace) an alias"))
    add.add_argument("alias", help="user@domain")
    add.add_argument("target", help="what it goes to, as in the file: addresses, | command")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from tampu.cli import check

    try:
        from tampu.config import load_config

        config = load_config(args.config_dir)
        if args.aliases_command == "add":
            return _add(config, args.alias, args.target)
        check(config)  # a broken aliases file is reported here, with file and line
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tampu: {problem}", file=sys.stderr)
        return 2
    return _resolve(config, args.address.strip().strip("<>"))


def _context(config: Any) -> ServerContext:  # noqa: ANN401 - a Config
    from tampu.dns import Resolver as DnsResolver
    from tampu.store_files import FilesystemStore

    return ServerContext(config, FilesystemStore(config.data_dir / "queue", 1),
                         DnsResolver.from_settings(config.server.dns_servers,
                                                   config.server.dns_timeout))


def _settings(config: Any) -> AliasesSettings:  # noqa: ANN401 - a Config
    from tampu.registry import validate_plugin_settings

    if "aliases" not in config.plugins:
        return AliasesSettings()
    validated = validate_plugin_settings(config, "aliases", AliasesPlugin)
    assert isinstance(validated, AliasesSettings)
    return validated


def _resolve(config: Any, address: str) -> int:  # noqa: ANN401 - a Config
    server = _context(config)
    if not server.is_local_address(address):
        print(f"{address}: not a local domain; delivered as it is")
        return 0
    resolver = build_resolver(server, _settings(config))
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


def _add(config: Any, alias: str, target: str) -> int:  # noqa: ANN401 - a Config
    from tampu.files import write_durably
    from tampu.plugins.aliases.parser import parse_aliases

    user, at, domain = alias.strip().strip("<>").rpartition("@")
    server = _context(config)
    if not at or not user or not server.is_local_domain(domain):
        print(f"tampu: {alias!r} is not user@<a local domain>", file=sys.stderr)
        return 2
    path = server.domains.folder(domain) / "aliases"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    line = f"{user}: {target.strip()}\n"
    text = old + ("" if not old or old.endswith("\n") else "\n") + line
    try:
        parse_aliases(text, domain)
    except AliasesError as exc:
        print(f"tampu: the alias would not parse: {exc}", file=sys.stderr)
        return 2
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, [text.encode("utf-8")], mode=0o644, keep_attributes=True)
    print(f"{user}@{domain}: {target.strip()} added to {path}")
    return 0
