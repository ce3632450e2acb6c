"""Whether an address is one an authenticated user may send as.

The rule: **a user may send as an address whose mail they receive.** That is

* their own address in any spelling the user directory reads as the same mailbox: case,
  ``+tag`` suffixes and drop characters (``[server] suffix_separators``,
  ``drop_characters``) do not matter, nor IDNA spellings of the domain
  (:func:`tampu.addresses.lookup_key`, :func:`~tampu.addresses.normalize_domain`);
* an address in a local domain that the aliases plugin resolves to a list containing the
  user's mailbox (``sales: ana, luis`` lets ana and luis send as sales@; a catch-all
  ``*: ana`` lets ana send as any address of the domain that is not a user or an alias).

Alias resolution is the aliases plugin's own (:func:`tampu.plugins.aliases.build_resolver`,
with its ``[plugins.aliases]`` settings, hook programs included): when that plugin is not
enabled, only the user's own addresses count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from tampu.address_header import parse_address_header
from tampu.addresses import AddressError, lookup_key, normalize_domain, split_address

if TYPE_CHECKING:
    from tampu import ServerContext
    from tampu.plugins.aliases.resolver import Resolver

MAX_FROM_ADDRESSES: Final = 20

Key = tuple[str, str]
"""(user part's lookup form, canonical domain): the mailbox an address names."""


def alias_resolver(server: ServerContext) -> Resolver | None:
    """The aliases plugin's resolver, with its settings, when that plugin is enabled."""
    table = server.config.plugins.get("aliases")
    if table is None or not table.enabled:
        return None
    from tampu.plugins.aliases import AliasesPlugin, AliasesSettings, build_resolver
    from tampu.registry import validate_plugin_settings

    settings = validate_plugin_settings(server.config, "aliases", AliasesPlugin)
    assert isinstance(settings, AliasesSettings)
    return build_resolver(server, settings)


@dataclass(frozen=True, slots=True)
class Answer:
    allowed: bool
    temporary: bool = False
    """The question could not be answered now (an alias hook failed, a loop): 4xx."""
    reason: str = ""


OWN: Final = Answer(True, reason="own address")
NOT_OWN: Final = Answer(False)


class SenderCheck:
    """Answers "may ``user`` send as ``address``" for one configuration."""

    def __init__(self, server: ServerContext, aliases: Resolver | None,
                 separators: str, drop: str) -> None:
        self.server = server
        self.aliases = aliases
        self.separators = separators
        self.drop = drop

    def key(self, address: str) -> Key | None:
        """The mailbox ``address`` names, or None for one without a valid domain."""
        user, domain = split_address(address)
        if not user or not domain:
            return None
        try:
            return lookup_key(user, self.separators, self.drop), normalize_domain(domain)
        except AddressError:
            return None

    async def owns(self, user: str, address: str) -> Answer:
        """Whether the session user ``user`` may send as ``address``."""
        mine = self.key(user)
        theirs = self.key(address)
        if mine is None or theirs is None:
            return NOT_OWN  # a bare login (no domain) has no address of its own
        if mine == theirs:
            return OWN
        return await self._alias_of(address, mine)

    async def _alias_of(self, address: str, mine: Key) -> Answer:
        if self.aliases is None or not self.server.is_local_address(address):
            return NOT_OWN
        from tampu.plugins.aliases.parser import AliasesError, Kind

        try:
            finals = await self.aliases.resolve(address)
        except AliasesError as exc:
            return Answer(False, temporary=True, reason=f"alias resolution failed: {exc}")
        for final in finals:
            if final.kind is Kind.EMAIL and self.key(final.value) == mine:
                return Answer(True, reason=f"alias: {' -> '.join(final.path)}")
        return NOT_OWN


def from_addresses(values: list[str]) -> tuple[list[str], str]:
    """The addresses of the ``From:`` header values and, if they cannot be read safely, why.

    A header Python's parser had to repair, an address without a domain or an overlong value
    is a problem (a mail program may show another address than the one found). No From:
    header at all gives no address and no problem: the message claims no author.
    """
    found: list[str] = []
    for value in values:
        header = parse_address_header("from", value)
        if header.too_long:
            return [], "the From: header is too long"
        if not header.clean:
            return [], "malformed From: header"
        if not header.addresses:
            return [], "no address in From:"
        for mailbox in header.addresses:
            if not mailbox.local or not mailbox.domain:
                return [], f"{mailbox.addr_spec[:60]!r} is not user@domain"
            found.append(mailbox.addr_spec)
    if len(found) > MAX_FROM_ADDRESSES:
        return [], f"more than {MAX_FROM_ADDRESSES} addresses in From:"
    return list(dict.fromkeys(found)), ""
