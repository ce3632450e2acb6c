"""The async hook caller: the only user of ``pm.hook`` (the core calls it through the typed
facade, :class:`tampu.facade.Hooks`).

pluggy is the registry (specs, markers, validation, entry points, blocking); this module calls
the implementations itself so that ``async def`` implementations, ``@blocking`` ones, per-call
timeouts and the first-verdict rule all work in one place. A plain function runs inline, with
no timer and no coroutine of the caller's (the fast path). An awaitable is stepped at once:
one that finishes without suspending (a cache hit) needs no timer either; one that suspends
goes on under the hook's timeout. ``@blocking`` functions run in a thread under one. Timing is
sampled (the first call of a hook, every :data:`SAMPLE_EVERY` th after it, and every
failure), unless ``TAMPU_TRACE_HOOKS=1`` asks for all of them.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
import types
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NoReturn

import pluggy

from tampu._markers import is_blocking, is_dry_run_unsafe
from tampu.errors import PluginError

if TYPE_CHECKING:
    from tampu.context import HookObserver

log = logging.getLogger("tampu.hooks")

DEFAULT_PRIORITY: Final = 100
SAMPLE_EVERY: Final = 16

@dataclass(frozen=True, slots=True)
class _Impl:
    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]
    blocking: bool
    unsafe: bool = False
    """Marked @dry_run_unsafe: a dry run (``tampu try``) skips it."""


@dataclass
class _Hook:
    impls: list[_Impl]
    ranks: list[tuple[int, int, int]] = field(default_factory=list)
    """Each implementation's (priority, conf.d order, position): the order they run in."""
    calls: int = 0


@dataclass(frozen=True, slots=True)
class DeliveryStage:
    """One step of the chain of delivery backends: one plugin's ``deliver_batch``
    (``batch``), or consecutive ``deliver`` implementations asked per recipient."""

    batch: bool
    impls: tuple[_Impl, ...]

    @property
    def plugins(self) -> tuple[str, ...]:
        return tuple(impl.plugin for impl in self.impls)


def _is_async(func: Callable[..., Any]) -> bool:
    """``async def``: awaited on the loop even if marked @blocking (a thread would only make
    a coroutine object that nobody awaits, taken for a verdict)."""
    return inspect.iscoroutinefunction(inspect.unwrap(func))


@dataclass
class HookCaller:
    """Calls one hook's implementations in tampu's order, awaiting and timing them."""

    pm: pluggy.PluginManager
    ordering: Mapping[str, tuple[int, int]]
    timeout: float
    hook_timeouts: Mapping[str, float] = field(default_factory=dict)
    """Per-hook overrides of ``timeout`` (``deliver`` gets ``[server] delivery_timeout``)."""
    plugin_timeouts: Mapping[str, float] = field(default_factory=dict)
    """Per-plugin overrides (``[plugins.NAME] hook_timeout``); they win over per-hook ones."""
    observers: list[HookObserver] = field(default_factory=list)
    trace: bool = field(default_factory=lambda: os.environ.get("TAMPU_TRACE_HOOKS", "")
                        not in ("", "0"))
    dry_run: bool = False
    """``tampu try``: implementations marked @dry_run_unsafe are skipped (and listed)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    _hooks: dict[str, _Hook] = field(default_factory=dict)
    _every_checked: int = 0
    _every: bool = False

    def start_dry_run(self) -> None:
        """From now on skip implementations marked @dry_run_unsafe (and list them)."""
        self.dry_run = True
        self._hooks.clear()

    def implementations(self, name: str) -> list[_Impl]:
        """The implementations of hook ``name`` in call order (priority, then conf.d order)."""
        return self._hook(name).impls

    def _hook(self, name: str) -> _Hook:
        found = self._hooks.get(name)
        if found is not None:
            return found
        ranked = []
        for position, impl in enumerate(reversed(getattr(self.pm.hook, name).get_hookimpls())):
            prio, order = self.ordering.get(impl.plugin_name, (DEFAULT_PRIORITY, 10_000))
            ranked.append(((prio, order, position), _Impl(
                impl.plugin_name, impl.function, tuple(impl.argnames),
                is_blocking(impl.function) and not _is_async(impl.function),
                is_dry_run_unsafe(impl.function))))
        ranked.sort(key=lambda pair: pair[0])
        kept = [pair for pair in ranked if not (self.dry_run and pair[1].unsafe)]
        if self.dry_run:
            self.skipped.extend((name, i.plugin) for _, i in ranked if i.unsafe)
        found = self._hooks[name] = _Hook([impl for _, impl in kept],
                                          [rank for rank, _ in kept])
        return found

    def delivery_stages(self) -> list[DeliveryStage]:
        """``deliver_batch`` and ``deliver`` implementations merged in one order (priority,
        then conf.d order; a plugin's ``deliver_batch`` before its ``deliver``), consecutive
        ``deliver`` implementations grouped in one stage."""
        batch, single = self._hook("deliver_batch"), self._hook("deliver")
        merged = sorted([((r[0], r[1], 0, r[2]), True, i) for r, i in
                         zip(batch.ranks, batch.impls, strict=True)]
                        + [((r[0], r[1], 1, r[2]), False, i) for r, i in
                           zip(single.ranks, single.impls, strict=True)],
                        key=lambda entry: entry[0])
        stages: list[DeliveryStage] = []
        for _, is_batch, impl in merged:
            if not is_batch and stages and not stages[-1].batch:
                stages[-1] = DeliveryStage(False, (*stages[-1].impls, impl))
            else:
                stages.append(DeliveryStage(is_batch, (impl,)))
        return stages

    def _timeout(self, name: str, impl: _Impl) -> float:
        return self.plugin_timeouts.get(impl.plugin) or self.hook_timeouts.get(name,
                                                                               self.timeout)

    async def _run(self, name: str, impl: _Impl, kwargs: Mapping[str, Any], timed: bool) -> Any:
        """One implementation, timed (sampled calls and @blocking ones)."""
        args = [kwargs[a] for a in impl.argnames]
        start = time.perf_counter() if timed else 0.0
        outcome = "ok"
        try:
            if impl.blocking:
                async with asyncio.timeout(self._timeout(name, impl)):
                    return await asyncio.to_thread(impl.function, *args)
            res = impl.function(*args)
            if res is not None and inspect.isawaitable(res):
                res = await self._settle(name, impl, res)
            return res
        except TimeoutError:
            outcome, timed = "timeout", True
            raise self._timed_out(name, impl) from None
        except PluginError:
            outcome, timed = "error", True
            raise
        except Exception as exc:
            outcome, timed = "error", True
            raise self._failed(name, impl, exc) from exc
        finally:
            if timed:
                self._observe(name, impl, time.perf_counter() - start if start else 0.0,
                              outcome)

    def _observe(self, name: str, impl: _Impl, elapsed: float, outcome: str) -> None:
        if self.trace:
            log.info("trace hook=%s plugin=%s outcome=%s %.1fms", name, impl.plugin, outcome,
                     elapsed * 1000)
        for observer in self.observers:
            observer(name, impl.plugin, elapsed, outcome)

    def _timed_out(self, name: str, impl: _Impl) -> PluginError:
        limit = self._timeout(name, impl)
        log.error("plugin %s timed out in %s after %gs", impl.plugin, name, limit)
        return PluginError(impl.plugin, name, f"timed out after {limit:g}s")

    def _failed(self, name: str, impl: _Impl, exc: Exception) -> PluginError:
        log.exception("plugin %s failed in %s: %s", impl.plugin, name, exc)
        return PluginError(impl.plugin, name, f"{type(exc).__name__}: {exc}")

    async def _settle(self, name: str, impl: _Impl, res: Any) -> Any:  # noqa: ANN401
        """Await ``res`` (a plugin's awaitable): its first step now, with no timer (a cache
        hit finishes there), the rest, if it suspends, under the hook's timeout."""
        step = res.__await__()
        try:
            yielded = step.send(None)
        except StopIteration as done:
            return done.value
        async with asyncio.timeout(self._timeout(name, impl)):
            return await _resume(step, yielded)

    def _plain(self, name: str, impl: _Impl, kwargs: dict[str, Any]) -> Any:  # noqa: ANN401
        """An untimed call: the result, or the plugin's awaitable for :meth:`_settle_untimed`.
        A failure raises its PluginError."""
        try:
            return impl.function(*[kwargs[a] for a in impl.argnames])
        except Exception as exc:
            self._raise_untimed(name, impl, exc)

    async def _settle_untimed(self, name: str, impl: _Impl, res: Any) -> Any:  # noqa: ANN401
        try:
            return await self._settle(name, impl, res)
        except Exception as exc:
            self._raise_untimed(name, impl, exc)

    def _raise_untimed(self, name: str, impl: _Impl, exc: Exception) -> NoReturn:
        failure = self._untimed_failure(name, impl, exc)
        if failure is exc:
            raise exc
        raise failure from (None if isinstance(exc, TimeoutError) else exc)

    def _untimed_failure(self, name: str, impl: _Impl, exc: Exception) -> PluginError:
        """What an untimed call that raised becomes (observers hear of every failure)."""
        if isinstance(exc, TimeoutError):
            self._observe(name, impl, 0.0, "timeout")
            return self._timed_out(name, impl)
        self._observe(name, impl, 0.0, "error")
        if isinstance(exc, PluginError):
            return exc
        return self._failed(name, impl, exc)

    def _sampled(self, hook: _Hook) -> bool:
        hook.calls += 1
        return self.trace or (bool(self.observers) and (
            hook.calls % SAMPLE_EVERY == 1 or self._observe_every_call()))

    def _observe_every_call(self) -> bool:
        """An observer with ``every_call = True`` (the test kit's recorder) sees every call."""
        if len(self.observers) != self._every_checked:  # observers are only ever added
            self._every_checked = len(self.observers)
            self._every = any(getattr(o, "every_call", False) for o in self.observers)
        return self._every

    async def first(self, name: str, **kwargs: Any) -> tuple[Any, str | None]:
        """Verdict hook: (the first non-None result, the plugin that gave it), or (None, None).
        Plugin failures raise PluginError."""
        return await self.first_of(name, None, **kwargs)

    async def first_of(self, name: str, impls: Sequence[_Impl] | None,
                       **kwargs: Any) -> tuple[Any, str | None]:
        """:meth:`first` over some of the hook's implementations (a delivery stage); None:
        all of them."""
        hook = self._hook(name)
        timed = self._sampled(hook)
        for impl in hook.impls if impls is None else impls:
            # the fast path (untimed, not blocking): no coroutine of ours, no timer
            res = await self._run(name, impl, kwargs, timed) if timed or impl.blocking \
                else self._plain(name, impl, kwargs)
            if res is not None and inspect.isawaitable(res):  # only from the fast path
                res = await self._settle_untimed(name, impl, res)
            if res is not None:
                if self.trace:
                    log.info("trace hook=%s verdict by %s: %r", name, impl.plugin, res)
                return res, impl.plugin
        return None, None

    async def all(self, name: str, *, strict: bool = False, **kwargs: Any) -> list[Any]:
        """Notification/collecting hook: run every implementation; non-None results listed.

        A failing implementation is logged and skipped, unless ``strict`` (then it raises).
        """
        hook = self._hook(name)
        if not hook.impls:
            return []
        timed = self._sampled(hook)
        out = []
        for impl in hook.impls:
            try:
                # the fast path (untimed, not blocking): no coroutine of ours, no timer
                res = await self._run(name, impl, kwargs, timed) if timed or impl.blocking \
                    else self._plain(name, impl, kwargs)
                if res is not None and inspect.isawaitable(res):  # only from the fast path
                    res = await self._settle_untimed(name, impl, res)
            except PluginError:
                if strict:
                    raise
                continue
            if res is not None:
                out.append(res)
        return out

    def call_sync(self, name: str, **kwargs: Any) -> list[Any]:
        """Run a hook's plain implementations synchronously (CLI registration only)."""
        return [impl.function(*[kwargs[a] for a in impl.argnames])
                for impl in self._hook(name).impls]


@types.coroutine
def _resume(step: Generator[Any, Any, Any], yielded: Any) -> Generator[Any, Any, Any]:  # noqa: ANN401
    """Go on with an awaitable whose first step yielded ``yielded`` (``yield from`` after the
    first step): what it waits for goes up to the task, cancellation goes down to it."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            step.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - the task's cancellation, handed down
            try:
                yielded = step.throw(exc)
            except StopIteration as done:
                return done.value
            continue
        try:
            yielded = step.send(sent)
        except StopIteration as done:
            return done.value

