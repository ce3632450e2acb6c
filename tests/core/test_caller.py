"""The async hook caller (core/caller.py): how implementations are called, timed and ordered."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tampu import PluginError, Reply, blocking, hookimpl
from tampu.caller import HookCaller
from tampu.config import load_config
from tampu.envelope import Envelope, ListenerInfo, Session
from tampu.errors import ConfigError
from tampu.facade import Hooks
from tampu.registry import new_plugin_manager
from tampu.runtime import build_runtime
from tampu.store_files import FilesystemStore
from tampu.testing import make_config_dir, server_toml

SESSION = Session(peer_host="127.0.0.1", peer_port=1,
                  listener=ListenerInfo(name="smtp", kind="smtp", address="127.0.0.1:25"))


def caller(*plugins: tuple[str, object], timeout: float = 1.0,
           ordering: dict[str, tuple[int, int]] | None = None) -> HookCaller:
    pm = new_plugin_manager()
    for name, obj in plugins:
        pm.register(obj, name=name)
    # without an explicit ordering, plugins run in the order given here
    order = ordering or {name: (100, i) for i, (name, _) in enumerate(plugins)}
    return HookCaller(pm, order, timeout)


class Sync:
    def __init__(self, answer: Reply | None) -> None:
        self.answer = answer
        self.calls = 0
        self.thread = 0

    @hookimpl
    def smtp_helo(self, session, hostname):
        self.calls += 1
        self.thread = threading.get_ident()
        return self.answer


class Async:
    def __init__(self, answer: Reply | None) -> None:
        self.answer = answer
        self.calls = 0

    @hookimpl
    async def smtp_helo(self, session, hostname):
        await asyncio.sleep(0)
        self.calls += 1
        return self.answer


class Blocking:
    def __init__(self, sleep: float = 0.0) -> None:
        self.sleep = sleep
        self.thread = 0

    @hookimpl
    @blocking
    def smtp_helo(self, session, hostname):
        self.thread = threading.get_ident()
        time.sleep(self.sleep)
        return Reply(250, "2.0.0", f"blocking saw {hostname}")


NO = Reply(550, "5.7.1", "no")


def test_sync_and_async_implementations_both_work():
    sync, asyn = Sync(None), Async(NO)
    result = asyncio.run(Hooks(caller(("sync", sync), ("async", asyn))).smtp_helo(SESSION, "h"))
    assert result == (NO, "async")  # the verdict and who gave it
    assert (sync.calls, asyn.calls) == (1, 1)
    sync2 = Sync(Reply(250, "2.0.0", "sync"))
    result, plugin = asyncio.run(Hooks(caller(("async", Async(None)), ("sync", sync2)))
                                 .smtp_helo(SESSION, "h"))
    assert result is not None and result.text == "sync" and plugin == "sync"


def test_a_plain_function_runs_inline_and_may_return_an_awaitable():
    class Lazy:
        @hookimpl
        def smtp_helo(self, session, hostname):
            return self.later() if hostname == "slow" else None

        async def later(self):
            await asyncio.sleep(0)
            return NO

    hooks = Hooks(caller(("lazy", Lazy())))
    assert asyncio.run(hooks.smtp_helo(SESSION, "fast")) == (None, None)
    assert asyncio.run(hooks.smtp_helo(SESSION, "slow")) == (NO, "lazy")


def test_blocking_runs_in_a_thread_other_than_the_loops():
    blocker, plain = Blocking(), Sync(None)

    async def run() -> tuple[Reply | None, int]:
        res, _ = await Hooks(caller(("plain", plain), ("blocker", blocker))).smtp_helo(SESSION,
                                                                                      "x")
        return res, threading.get_ident()

    result, loop_thread = asyncio.run(run())
    assert result is not None and result.text == "blocking saw x"
    assert plain.thread == loop_thread
    assert blocker.thread not in (0, loop_thread)


def test_blocking_does_not_stall_the_loop():
    ticks: list[float] = []

    async def run() -> None:
        async def ticker() -> None:
            for _ in range(5):
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)

        await asyncio.gather(Hooks(caller(("b", Blocking(0.2)))).smtp_helo(SESSION, "x"),
                             ticker())

    asyncio.run(run())
    assert len(ticks) == 5 and ticks[-1] - ticks[0] < 0.19  # ticked while the thread slept


@pytest.mark.parametrize("impl", [Blocking(0.6), "async"], ids=["blocking", "async"])
def test_timeout_is_a_plugin_error(impl):
    class Slow:
        @hookimpl
        async def smtp_helo(self, session, hostname):
            await asyncio.sleep(10)

    obj = Slow() if impl == "async" else impl
    start = time.monotonic()
    with pytest.raises(PluginError) as info:
        asyncio.run(Hooks(caller(("slowpoke", obj), timeout=0.3)).smtp_helo(SESSION, "x"))
    assert time.monotonic() - start < 2
    assert (info.value.plugin, info.value.hook) == ("slowpoke", "smtp_helo")
    assert "timed out after 0.3s" in str(info.value)


def test_exception_is_a_plugin_error_naming_the_plugin(caplog):
    class Broken:
        @hookimpl
        def smtp_helo(self, session, hostname):
            raise KeyError("missing thing")

    later = Sync(None)
    with pytest.raises(PluginError) as info:
        asyncio.run(Hooks(caller(("broken", Broken()), ("later", later))).smtp_helo(SESSION, "x"))
    err = info.value
    assert err.plugin == "broken" and err.hook == "smtp_helo"
    assert "plugin 'broken' failed in smtp_helo: KeyError" in str(err)
    assert isinstance(err.__cause__, KeyError)
    assert later.calls == 0  # a verdict hook stops: never a silent accept
    assert "plugin broken failed in smtp_helo" in caplog.text


def test_first_verdict_wins():
    first, second, third = Sync(None), Async(NO), Sync(Reply(250, "2.0.0", "never"))
    result = asyncio.run(Hooks(caller(("a", first), ("b", second), ("c", third))).smtp_helo(
        SESSION, "x"))
    assert result == (NO, "b")
    assert (first.calls, second.calls, third.calls) == (1, 1, 0)
    nobody = asyncio.run(Hooks(caller(("a", Sync(None)), ("b", Async(None)))).smtp_helo(
        SESSION, "x"))
    assert nobody == (None, None)


class Notified:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    @hookimpl
    async def smtp_disconnect(self, session):
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError("notification failed")

    @hookimpl
    def smtp_ehlo_capabilities(self, session):
        if self.fail:
            raise RuntimeError("no keywords")
        return [f"X-{self.name.upper()}"]


def test_notification_hooks_run_every_implementation():
    log: list[str] = []
    c = caller(("one", Notified(log, "one")), ("two", Notified(log, "two", fail=True)),
               ("three", Notified(log, "three")))
    asyncio.run(Hooks(c).smtp_disconnect(SESSION))
    assert log == ["one", "two", "three"]  # the failing one did not stop the others
    assert asyncio.run(Hooks(c).smtp_ehlo_capabilities(SESSION)) == ["X-ONE", "X-THREE"]
    with pytest.raises(PluginError):  # strict (tampu_startup): a failure stops
        asyncio.run(c.all("smtp_disconnect", strict=True, session=SESSION))


def test_observers_see_sampled_calls_and_every_failure():
    from tampu.caller import SAMPLE_EVERY

    seen: list[tuple[str, str, str]] = []
    c = caller(("ok", Sync(None)), ("bad", Notified([], "bad", fail=True)))
    c.trace = False
    c.observers.append(lambda hook, plugin, secs, outcome: seen.append((hook, plugin, outcome)))
    for _ in range(SAMPLE_EVERY * 2):
        asyncio.run(Hooks(c).smtp_helo(SESSION, "x"))
    assert seen == [("smtp_helo", "ok", "ok")] * 2  # timing is sampled, not taken each call
    seen.clear()
    asyncio.run(Hooks(c).smtp_disconnect(SESSION))
    assert seen == [("smtp_disconnect", "bad", "error")]  # a failure is always seen


# ------------------------------------------------------------------------------ ordering


class Extra:
    def __init__(self, name: str, priority: int | None = None) -> None:
        self.name = name
        if priority is not None:
            self.priority = priority

    @hookimpl
    def smtp_rcpt_to(self, session, envelope, address, params):
        return None


def rcpt_order(tmp_path, plugins: tuple[str, ...], extra_conf: str = "",
               extras: tuple[Extra, ...] = ()) -> list[str]:
    base = server_toml(plugins=plugins).replace('kind = "submissions"', 'kind = "submission"')
    root = make_config_dir(tmp_path / f"c{len(list(tmp_path.iterdir()))}", base=base,
                           conf={"50-x.toml": extra_conf} if extra_conf else None)
    config = load_config(root)
    runtime = build_runtime(config, FilesystemStore(root / "q", 10), extra_plugins=list(extras))
    order = runtime.hook_order()["smtp_rcpt_to"]
    # the same order is the one the caller walks, and the one the context shows
    assert [i.plugin for i in runtime.hooks.caller.implementations("smtp_rcpt_to")] == order
    assert runtime.context.plugin_order.get("smtp_rcpt_to", []) == order
    return order


def test_order_follows_confd_order(tmp_path):
    assert rcpt_order(tmp_path, ("relay", "localusers")) == ["relay", "localusers"]
    assert rcpt_order(tmp_path, ("localusers", "relay")) == ["localusers", "relay"]


def test_explicit_priority_beats_confd_order(tmp_path):
    order = rcpt_order(tmp_path, ("relay", "localusers"),
                       "[plugins.relay]\npriority = 200\n")
    assert order == ["localusers", "relay"]
    order = rcpt_order(tmp_path, ("localusers", "relay"),
                       "[plugins.localusers]\npriority = 101\n[plugins.relay]\npriority = 99\n")
    assert order == ["relay", "localusers"]


def test_extra_plugins_ordered_by_priority_then_after_confd(tmp_path):
    order = rcpt_order(tmp_path, ("relay", "localusers"), extras=(
        Extra("late"), Extra("early", priority=10), Extra("tie-a", 100),
        Extra("last", priority=500), Extra("tie-b", 100)))
    # priority first; at equal priority conf.d plugins, then extras in the order given
    assert order == ["early", "relay", "localusers", "late", "tie-a", "tie-b", "last"]


def test_a_misspelt_or_malformed_hook_fails_at_build(tmp_path):
    class Typo:
        name = "typo"

        @hookimpl
        def smtp_rcpt(self, session, envelope, address, params):
            return None

    class WrongArgs:
        name = "wrongargs"

        @hookimpl
        def smtp_rcpt_to(self, session, envelope, recipient):
            return None

    class Wrapper:
        name = "wrapper"

        @hookimpl(hookwrapper=True)
        def smtp_helo(self, session, hostname):
            yield

    class First:
        name = "first"

        @hookimpl(tryfirst=True)
        def smtp_helo(self, session, hostname):
            return None

    root = make_config_dir(tmp_path / "c")
    config = load_config(root)
    for obj, word in ((Typo(), "smtp_rcpt"), (WrongArgs(), "recipient"),
                      (Wrapper(), "hookwrapper"), (First(), "tryfirst")):
        with pytest.raises(ConfigError) as info:
            build_runtime(config, FilesystemStore(root / "q", 10), extra_plugins=[obj])
        assert obj.name in str(info.value) and word in str(info.value)
        if word in ("hookwrapper", "tryfirst"):
            assert "priority" in str(info.value)  # says what to do instead


def test_facade_covers_the_catalogue():
    from tampu.hookspecs import HOOK_NAMES, VERDICT_HOOKS

    assert set(VERDICT_HOOKS) <= set(HOOK_NAMES)
    for name in HOOK_NAMES:
        assert callable(getattr(Hooks, name, None)), name  # the facade has every hook
        if name not in ("tampu_register_cli", "tampu_register_stores"):  # called in sync code
            assert asyncio.iscoroutinefunction(getattr(Hooks, name)), name
    assert "smtp_rcpt_to" in VERDICT_HOOKS and "smtp_disconnect" not in VERDICT_HOOKS


def test_envelope_is_passed_through():
    seen: list[Envelope] = []

    class Look:
        @hookimpl
        def smtp_rcpt_to(self, session, envelope, address, params):
            seen.append(envelope)
            return Reply(250, "2.1.5", address)

    env = Envelope(mail_from="a@example.org")
    result = asyncio.run(Hooks(caller(("look", Look()))).smtp_rcpt_to(
        SESSION, env, "b@example.test", {"X": True}))
    assert result == (Reply(250, "2.1.5", "b@example.test"), "look") and seen == [env]


def test_async_implementation_marked_blocking_is_awaited():
    class Confused:
        @hookimpl
        @blocking
        async def smtp_helo(self, session, hostname):
            await asyncio.sleep(0)
            return NO

    assert asyncio.run(Hooks(caller(("confused", Confused()))).smtp_helo(SESSION, "x"))[0] == NO


class Cached:
    """An async implementation that only sometimes waits (a cache: hits return at once)."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.cancelled = False
        self.timers: list[int] = []

    @hookimpl
    async def smtp_helo(self, session, hostname):
        loop = asyncio.get_running_loop()
        self.timers.append(len(getattr(loop, "_scheduled", ())))
        if not self.wait:
            return Reply(250, "2.0.0", "hit")
        try:
            await asyncio.sleep(self.wait)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return Reply(250, "2.0.0", "miss")


def test_an_awaitable_that_does_not_suspend_gets_no_timer():
    hit = Cached(0.0)

    async def run() -> tuple[object, int]:
        loop = asyncio.get_running_loop()
        answer = await Hooks(caller(("hit", hit))).smtp_helo(SESSION, "x")
        return answer, len(loop._scheduled)  # type: ignore[attr-defined]

    (reply, plugin), scheduled = asyncio.run(run())
    assert plugin == "hit" and reply.text == "hit"
    assert hit.timers == [0] and scheduled == 0  # no asyncio.timeout was armed


def test_an_awaitable_that_suspends_goes_on_under_the_timeout():
    miss, slow = Cached(0.01), Cached(5.0)
    reply, plugin = asyncio.run(Hooks(caller(("miss", miss))).smtp_helo(SESSION, "x"))
    assert (plugin, reply.text) == ("miss", "miss")
    started = time.monotonic()
    with pytest.raises(PluginError, match="timed out after 0.2s"):
        asyncio.run(Hooks(caller(("slow", slow), timeout=0.2)).smtp_helo(SESSION, "x"))
    assert time.monotonic() - started < 2
    assert slow.cancelled  # the timeout's cancellation reached the plugin's coroutine


def test_cancelling_the_caller_cancels_a_suspended_plugin():
    slow = Cached(5.0)

    async def run() -> None:
        task = asyncio.ensure_future(Hooks(caller(("slow", slow))).smtp_helo(SESSION, "x"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert slow.cancelled
