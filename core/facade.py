"""The typed ``Hooks`` facade: one method per hook of ``hookspecs``, so that mypy checks every
call the core makes. The core calls hooks only through it; the calling itself (order,
awaiting, timeouts, sampling) is :class:`tampu.caller.HookCaller`'s.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from tampu.caller import DeliveryStage, HookCaller
from tampu.envelope import AuthResult
from tampu.errors import PluginError
from tampu.item import DeliveryResult
from tampu.reply import Reply

if TYPE_CHECKING:
    import argparse

    from tampu.backends import RegisterBackend
    from tampu.context import ServerContext
    from tampu.envelope import Envelope, Message, Session, Verdict
    from tampu.item import QueueItem, Recipient

log = logging.getLogger("tampu.hooks")  # the caller's logger: plugin failures in one place


def _typed(name: str, found: tuple[Any, str | None], kind: type) -> tuple[Any, str | None]:
    """A verdict of the wrong type is the plugin's bug: a PluginError (fail closed)."""
    value, plugin = found
    if value is not None and not isinstance(value, kind):
        log.error("plugin %s returned %r from %s, not a %s", plugin, value, name, kind.__name__)
        raise PluginError(plugin or "?", name, f"returned a {type(value).__name__}, "
                          f"not a {kind.__name__}")
    return found


class Hooks:
    """The typed facade over every hook of ``hookspecs``: the core calls hooks only here.

    Verdict methods return ``(verdict, plugin)``: who decided is part of the answer. A verdict
    of the wrong type raises PluginError, as a failing plugin does.
    """

    def __init__(self, caller: HookCaller) -> None:
        self.caller = caller
        self._stages: list[DeliveryStage] | None = None

    def has(self, name: str) -> bool:
        return bool(self.caller.implementations(name))

    async def _reply(self, name: str, **kwargs: Any) -> tuple[Reply | None, str | None]:
        return cast("tuple[Reply | None, str | None]",
                    _typed(name, await self.caller.first(name, **kwargs), Reply))

    def order(self, names: Sequence[str]) -> dict[str, list[str]]:
        """The plugins on each hook, in call order (``tampu plugins``, the status page)."""
        return {name: [i.plugin for i in self.caller.implementations(name)] for name in names}

    # lifecycle
    async def tampu_startup(self, context: ServerContext) -> None:
        await self.caller.all("tampu_startup", strict=True, context=context)

    async def tampu_reload(self, context: ServerContext) -> None:
        await self.caller.all("tampu_reload", context=context)

    async def tampu_shutdown(self, context: ServerContext) -> None:
        await self.caller.all("tampu_shutdown", context=context)

    def tampu_register_cli(self, subparsers: argparse._SubParsersAction[Any]) -> None:
        self.caller.call_sync("tampu_register_cli", subparsers=subparsers)

    def tampu_register_stores(self, register: RegisterBackend) -> None:
        self.caller.call_sync("tampu_register_stores", register=register)

    # reception
    async def smtp_connect(self, session: Session) -> tuple[Reply | None, str | None]:
        return await self._reply("smtp_connect", session=session)

    async def smtp_helo(self, session: Session,
                        hostname: str) -> tuple[Reply | None, str | None]:
        return await self._reply("smtp_helo", session=session, hostname=hostname)

    async def smtp_ehlo_capabilities(self, session: Session) -> list[str]:
        lists = await self.caller.all("smtp_ehlo_capabilities", session=session)
        return [kw for sub in lists for kw in sub]

    async def smtp_starttls(self, session: Session) -> None:
        await self.caller.all("smtp_starttls", session=session)

    async def smtp_auth(self, session: Session, mechanism: str, login: str,
                        password: str) -> tuple[AuthResult | None, str | None]:
        return cast("tuple[AuthResult | None, str | None]", _typed("smtp_auth", await (
            self.caller.first("smtp_auth", session=session, mechanism=mechanism, login=login,
                              password=password)), AuthResult))

    async def smtp_auth_result(self, session: Session, login: str, success: bool,
                               reason: str) -> None:
        await self.caller.all("smtp_auth_result", session=session, login=login,
                              success=success, reason=reason)

    async def smtp_mail_from(self, session: Session, envelope: Envelope, address: str,
                             params: dict[str, str | bool]) -> tuple[Reply | None, str | None]:
        return await self._reply("smtp_mail_from", session=session, envelope=envelope,
                                 address=address, params=params)

    async def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                           params: dict[str, str | bool]) -> tuple[Reply | None, str | None]:
        return await self._reply("smtp_rcpt_to", session=session, envelope=envelope,
                                 address=address, params=params)

    async def smtp_data(self, session: Session, envelope: Envelope,
                        message: Message) -> tuple[Reply | None, str | None]:
        return await self._reply("smtp_data", session=session, envelope=envelope,
                                 message=message)

    async def smtp_verdict(self, session: Session, envelope: Envelope | None,
                           verdict: Verdict) -> None:
        await self.caller.all("smtp_verdict", session=session, envelope=envelope,
                              verdict=verdict)

    async def smtp_transaction_done(self, session: Session, envelope: Envelope, reply: Reply,
                                    queue_id: str | None) -> None:
        await self.caller.all("smtp_transaction_done", session=session, envelope=envelope,
                              reply=reply, queue_id=queue_id)

    async def smtp_disconnect(self, session: Session) -> None:
        await self.caller.all("smtp_disconnect", session=session)

    # queue
    async def queue_expand_recipient(
            self, envelope: Envelope | None, item: QueueItem,
            recipient: str) -> tuple[list[Recipient] | None, str | None]:
        return cast("tuple[list[Recipient] | None, str | None]", await self.caller.first(
            "queue_expand_recipient", envelope=envelope, item=item, recipient=recipient))

    async def queue_add_headers(self, item: QueueItem,
                                message: bytes) -> list[tuple[str, str]]:
        lists = await self.caller.all("queue_add_headers", strict=True, item=item,
                                      message=message)
        return [pair for sub in lists for pair in sub]

    async def queue_enqueued(self, item: QueueItem) -> None:
        await self.caller.all("queue_enqueued", item=item)

    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> tuple[DeliveryResult | None, str | None]:
        return cast("tuple[DeliveryResult | None, str | None]", _typed("deliver", await (
            self.caller.first("deliver", item=item, recipient=recipient, message=message)),
            DeliveryResult))

    def delivery_stages(self) -> list[DeliveryStage]:
        """The delivery backends in the order they are asked (computed once per runtime)."""
        if self._stages is None:
            self._stages = self.caller.delivery_stages()
        return self._stages

    async def deliver_in(self, stage: DeliveryStage, item: QueueItem, recipient: Recipient,
                         message: bytes) -> tuple[DeliveryResult | None, str | None]:
        """``deliver`` asked of the implementations of one (per-recipient) stage."""
        return cast("tuple[DeliveryResult | None, str | None]", _typed("deliver", await (
            self.caller.first_of("deliver", stage.impls, item=item, recipient=recipient,
                                 message=message)), DeliveryResult))

    async def deliver_batch(self, stage: DeliveryStage, item: QueueItem,
                            recipients: list[Recipient],
                            message: bytes) -> list[tuple[Recipient, DeliveryResult]]:
        """``deliver_batch`` of one (batch) stage: the pairs it answered, checked (each one
        of ``recipients``, once, with a DeliveryResult); anything else raises PluginError."""
        found, plugin = await self.caller.first_of("deliver_batch", stage.impls, item=item,
                                                   recipients=list(recipients),
                                                   message=message)
        plugin = plugin or stage.plugins[0]
        if found is None:
            return []
        offered = {id(r) for r in recipients}
        seen: set[int] = set()
        problem = "" if isinstance(found, list) else f"returned a {type(found).__name__}"
        pairs: list[tuple[Recipient, DeliveryResult]] = []
        for entry in found if not problem else []:
            if not (isinstance(entry, tuple) and len(entry) == 2
                    and isinstance(entry[1], DeliveryResult)):
                problem = f"returned {entry!r}, not a (Recipient, DeliveryResult) pair"
                break
            rcpt, result = entry
            if id(rcpt) not in offered or id(rcpt) in seen:
                problem = f"answered for {rcpt!r}, not one of the recipients given (or twice)"
                break
            seen.add(id(rcpt))
            pairs.append((rcpt, result))
        if problem:
            log.error("plugin %s %s from deliver_batch", plugin, problem)
            raise PluginError(plugin, "deliver_batch", problem)
        return pairs

    async def delivery_attempted(self, item: QueueItem, recipient: Recipient,
                                 result: DeliveryResult, backend: str) -> None:
        await self.caller.all("delivery_attempted", item=item, recipient=recipient,
                              result=result, backend=backend)

    async def delivery_route(self, item: QueueItem,
                             recipient: Recipient) -> tuple[str | None, str | None]:
        route, plugin = await self.caller.first("delivery_route", item=item,
                                                recipient=recipient)
        return cast("str | None", route), plugin

    async def retry_delay(self, item: QueueItem, attempt: int) -> float | None:
        delay, _ = await self.caller.first("retry_delay", item=item, attempt=attempt)
        return cast("float | None", delay)

    async def queue_give_up(self, item: QueueItem, failed: list[Recipient]) -> None:
        await self.caller.all("queue_give_up", item=item, failed=failed)

    async def make_dsn(self, item: QueueItem, recipients: list[Recipient], message: bytes,
                       action: str) -> bytes | None:
        dsn, _ = await self.caller.first("make_dsn", item=item, failed=recipients,
                                         message=message, action=action)
        return cast("bytes | None", dsn)

    async def queue_done(self, item: QueueItem) -> None:
        await self.caller.all("queue_done", item=item)
