"""The async hook caller and the typed ``Hooks`` facade: the only user of ``pm.hook``.

pluggy is the registry (specs, markers, validation, entry points, blocking); this module calls
the implementations itself so that ``async def`` implementations, ``@blocking`` ones, per-call
timeouts and the first-verdict rule all work in one place.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pluggy

from tampu._markers import is_blocking
from tampu.errors import PluginError
from tampu.hookspecs import HOOK_NAMES, VERDICT_HOOKS

if TYPE_CHECKING:
    from tampu.context import ServerContext
    from tampu.envelope import AuthResult, Envelope, Message, Session
    from tampu.item import DeliveryResult, QueueItem, Recipient
    from tampu.reply import Reply

log = logging.getLogger("tampu.hooks")

DEFAULT_PRIORITY = 100


@dataclass(frozen=True, slots=True)
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    blocking: bool


HookObserver = Callable[[str, str, float, str], None]
"""Called after each implementation ran: (hook, plugin, seconds, outcome ok|error|timeout)."""


def _is_async(func: Callable[..., Any]) -> bool:
    """``async def``: awaited on the loop even if marked @blocking (a thread would only make
    a coroutine object that nobody awaits, taken for a verdict)."""
    return inspect.iscoroutinefunction(inspect.unwrap(func))


class HookCaller:
    """Calls one hook's implementations in tampu's order, awaiting and timing each."""

    def __init__(
        self,
        pm: pluggy.PluginManager,
        ordering: Mapping[str, tuple[int, int]],
        timeout: float,
        hook_timeouts: Mapping[str, float] | None = None,
        plugin_timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self._pm = pm
        self._ordering = ordering
        self.timeout = timeout
        self.hook_timeouts = dict(hook_timeouts or {})
        """Per-hook overrides of ``timeout`` (``deliver`` gets ``[server] delivery_timeout``)."""
        self.plugin_timeouts = dict(plugin_timeouts or {})
        """Per-plugin overrides (``[plugins.NAME] hook_timeout``); they win over per-hook ones."""
        self._cache: dict[str, list[_Impl]] = {}
        self.trace = os.environ.get("TAMPU_TRACE_HOOKS", "") not in ("", "0")
        self.observers: list[HookObserver] = []

    def implementations(self, name: str) -> list[_Impl]:
        """The implementations of hook ``name`` in call order (priority, then conf.d order)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        hook = getattr(self._pm.hook, name)
        impls = []
        for position, impl in enumerate(reversed(hook.get_hookimpls())):
            prio, order = self._ordering.get(impl.plugin_name, (DEFAULT_PRIORITY, 10_000))
            impls.append(((prio, order, position), _Impl(
                plugin=impl.plugin_name,
                function=impl.function,
                argnames=tuple(impl.argnames),
                blocking=is_blocking(impl.function) and not _is_async(impl.function),
            )))
        impls.sort(key=lambda pair: pair[0])
        result = [impl for _, impl in impls]
        self._cache[name] = result
        return result

    async def _run(self, name: str, impl: _Impl, kwargs: Mapping[str, Any]) -> Any:
        args = [kwargs[a] for a in impl.argnames]
        timeout = self.plugin_timeouts.get(impl.plugin) or self.hook_timeouts.get(
            name, self.timeout)
        start = time.perf_counter()
        outcome = "ok"
        try:
            if impl.blocking:
                async with asyncio.timeout(timeout):
                    return await asyncio.to_thread(impl.function, *args)
            res = impl.function(*args)
            if inspect.isawaitable(res):
                async with asyncio.timeout(timeout):
                    res = await res
            return res
        except TimeoutError:
            outcome = "timeout"
            log.error("plugin %s timed out in %s after %.0fs", impl.plugin, name, timeout)
            raise PluginError(impl.plugin, name, f"timed out after {timeout:g}s") from None
        except PluginError:
            outcome = "error"
            raise
        except Exception as exc:
            outcome = "error"
            log.exception("plugin %s failed in %s: %s", impl.plugin, name, exc)
            raise PluginError(impl.plugin, name, f"{type(exc).__name__}: {exc}") from exc
        finally:
            elapsed = time.perf_counter() - start
            if self.trace:
                log.info("trace hook=%s plugin=%s outcome=%s %.1fms", name, impl.plugin,
                         outcome, elapsed * 1000)
            for observer in self.observers:
                observer(name, impl.plugin, elapsed, outcome)

    async def first(self, name: str, **kwargs: Any) -> Any:
        """Verdict hook: the first non-None result, or None. Plugin failures raise PluginError."""
        for impl in self.implementations(name):
            res = await self._run(name, impl, kwargs)
            if res is not None:
                if self.trace:
                    log.info("trace hook=%s verdict by %s: %r", name, impl.plugin, res)
                return res
        return None

    async def all(self, name: str, *, strict: bool = False, **kwargs: Any) -> list[Any]:
        """Notification/collecting hook: run every implementation; non-None results listed.

        A failing implementation is logged and skipped, unless ``strict`` (then it raises).
        """
        out = []
        for impl in self.implementations(name):
            try:
                res = await self._run(name, impl, kwargs)
            except PluginError:
                if strict:
                    raise
                continue
            if res is not None:
                out.append(res)
        return out


class Hooks:
    """The typed facade over every hook of ``hookspecs``: the core calls hooks only here."""

    def __init__(self, caller: HookCaller) -> None:
        self.caller = caller

    def has(self, name: str) -> bool:
        return bool(self.caller.implementations(name))

    # lifecycle
    async def tampu_startup(self, context: ServerContext) -> None:
        await self.caller.all("tampu_startup", strict=True, context=context)

    async def tampu_reload(self, context: ServerContext) -> None:
        await self.caller.all("tampu_reload", context=context)

    async def tampu_shutdown(self, context: ServerContext) -> None:
        await self.caller.all("tampu_shutdown", context=context)

    # reception
    async def smtp_connect(self, session: Session) -> Reply | None:
        return cast("Reply | None", await self.caller.first("smtp_connect", session=session))

    async def smtp_helo(self, session: Session, hostname: str) -> Reply | None:
        return cast("Reply | None",
                    await self.caller.first("smtp_helo", session=session, hostname=hostname))

    async def smtp_ehlo_capabilities(self, session: Session) -> list[str]:
        lists = await self.caller.all("smtp_ehlo_capabilities", session=session)
        return [kw for sub in lists for kw in sub]

    async def smtp_starttls(self, session: Session) -> None:
        await self.caller.all("smtp_starttls", session=session)

    async def smtp_auth(self, session: Session, mechanism: str, login: str,
                        password: str) -> AuthResult | None:
        return cast("AuthResult | None", await self.caller.first(
            "smtp_auth", session=session, mechanism=mechanism, login=login, password=password))

    async def smtp_auth_result(self, session: Session, login: str, success: bool,
                               reason: str) -> None:
        await self.caller.all("smtp_auth_result", session=session, login=login,
                              success=success, reason=reason)

    async def smtp_mail_from(self, session: Session, envelope: Envelope, address: str,
                             params: dict[str, str | bool]) -> Reply | None:
        return cast("Reply | None", await self.caller.first(
            "smtp_mail_from", session=session, envelope=envelope, address=address,
            params=params))

    async def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                           params: dict[str, str | bool]) -> Reply | None:
        return cast("Reply | None", await self.caller.first(
            "smtp_rcpt_to", session=session, envelope=envelope, address=address, params=params))

    async def smtp_data(self, session: Session, envelope: Envelope,
                        message: Message) -> Reply | None:
        return cast("Reply | None", await self.caller.first(
            "smtp_data", session=session, envelope=envelope, message=message))

    async def smtp_transaction_done(self, session: Session, envelope: Envelope, reply: Reply,
                                    queue_id: str | None) -> None:
        await self.caller.all("smtp_transaction_done", session=session, envelope=envelope,
                              reply=reply, queue_id=queue_id)

    async def smtp_disconnect(self, session: Session) -> None:
        await self.caller.all("smtp_disconnect", session=session)

    # queue
    async def queue_expand_recipient(self, envelope: Envelope | None, item: QueueItem,
                                     recipient: str) -> list[Recipient] | None:
        return cast("list[Recipient] | None", await self.caller.first(
            "queue_expand_recipient", envelope=envelope, item=item, recipient=recipient))

    async def queue_add_headers(self, item: QueueItem,
                                message: bytes) -> list[tuple[str, str]]:
        lists = await self.caller.all("queue_add_headers", strict=True, item=item,
                                      message=message)
        return [pair for sub in lists for pair in sub]

    async def queue_enqueued(self, item: QueueItem) -> None:
        await self.caller.all("queue_enqueued", item=item)

    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> DeliveryResult | None:
        return cast("DeliveryResult | None", await self.caller.first(
            "deliver", item=item, recipient=recipient, message=message))

    async def delivery_attempted(self, item: QueueItem, recipient: Recipient,
                                 result: DeliveryResult) -> None:
        await self.caller.all("delivery_attempted", item=item, recipient=recipient,
                              result=result)

    async def retry_delay(self, item: QueueItem, attempt: int) -> float | None:
        return cast("float | None",
                    await self.caller.first("retry_delay", item=item, attempt=attempt))

    async def queue_give_up(self, item: QueueItem, failed: list[Recipient]) -> None:
        await self.caller.all("queue_give_up", item=item, failed=failed)

    async def make_dsn(self, item: QueueItem, failed: list[Recipient],
                       message: bytes) -> bytes | None:
        return cast("bytes | None", await self.caller.first(
            "make_dsn", item=item, failed=failed, message=message))

    async def queue_done(self, item: QueueItem) -> None:
        await self.caller.all("queue_done", item=item)


def _check_facade() -> None:
    missing = [n for n in HOOK_NAMES if not hasattr(Hooks, n)]
    assert not missing, f"Hooks facade lacks {missing}"
    assert VERDICT_HOOKS  # the catalogue has verdict hooks


_check_facade()
