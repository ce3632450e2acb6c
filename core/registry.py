"""Plugin discovery (entry points), enabling, validation of settings and hook order.

Built-in plugins are entry points of the ``tampu`` distribution in group ``tampu.plugins``,
exactly like third-party ones. ``[plugins.NAME] enabled = true`` in conf.d loads NAME; nothing
else is loaded. The core never imports ``tampu.plugins.*``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy
from pydantic import ValidationError

from tampu import hookspecs
from tampu._markers import PROJECT
from tampu.caller import DEFAULT_PRIORITY, HookCaller, Hooks
from tampu.config import Config, PluginSettings, format_validation_error, resolve_secrets
from tampu.context import PluginContext, ServerContext
from tampu.errors import ConfigError

GROUP = "tampu.plugins"


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    builtin: bool
    enabled: bool
    priority: int = DEFAULT_PRIORITY
    order: int = 10_000
    settings: PluginSettings | None = None
    obj: Any = None
    hooks: list[str] = field(default_factory=list)


@dataclass
class Registry:
    pm: pluggy.PluginManager
    hooks: Hooks
    plugins: dict[str, PluginInfo]

    def order_by_hook(self) -> dict[str, list[str]]:
        return {
            name: [impl.plugin for impl in self.hooks.caller.implementations(name)]
            for name in hookspecs.HOOK_NAMES
        }


def available_entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def _dist_of(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"], dist.version


def settings_class(obj: Any) -> type[PluginSettings]:
    cls = getattr(obj, "Settings", None)
    if inspect.isclass(cls) and issubclass(cls, PluginSettings):
        return cls
    return PluginSettings


def validate_plugin_settings(config: Config, name: str, obj: Any) -> PluginSettings:
    """Validate ``[plugins.NAME]`` against the plugin's Settings; raises ConfigError."""
    table = config.plugins[name]
    cls = settings_class(obj)
    try:
        values = resolve_secrets(table.values, config.config_dir)
        return cls.model_validate(values)
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            raise ConfigError(format_validation_error(
                exc, ("plugins", name), config.origin_of)) from None
        where = table.files[0] if table.files else "conf.d"
        raise ConfigError([f"{where}: plugins.{name}: {exc}"]) from None


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def build_registry(
    config: Config,
    context: ServerContext,
    extra: Iterable[Any] = (),
) -> Registry:
    """Load the enabled plugins of ``config`` (and ``extra`` objects, for tests).

    Collects every problem before raising one ConfigError, so ``tampu check`` shows them all.
    """
    pm = new_plugin_manager()
    eps = available_entry_points()
    problems: list[str] = []
    infos: dict[str, PluginInfo] = {}
    ordering: dict[str, tuple[int, int]] = {}

    for name, info in list_available(eps).items():
        infos[name] = info

    extra = list(extra)
    given = {getattr(obj, "name", None) or obj.__name__.lower()
             for obj in extra if inspect.isclass(obj)}  # configured by their conf.d table
    for name, table in config.plugins.items():
        if name in given:
            continue
        if name not in eps:
            where = table.files[0] if table.files else "conf.d"
            problems.append(
                f"{where}: key plugins.{name}: unknown plugin {name!r} "
                f"(available: {', '.join(sorted(eps)) or 'none'})"
            )
            continue
        try:
            obj = eps[name].load()
        except Exception as exc:  # a broken third-party package must not crash start-up
            problems.append(f"plugin {name}: cannot be loaded: {type(exc).__name__}: {exc}")
            continue
        try:
            settings = validate_plugin_settings(config, name, obj)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        info = infos[name]
        info.settings = settings
        info.enabled = settings.enabled
        info.priority = settings.priority
        info.order = table.order
        if not settings.enabled:
            pm.set_blocked(name)
            continue
        try:
            instance = _instantiate(obj, name, settings, context)
            pm.register(instance, name=name)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        except pluggy.PluginValidationError as exc:
            problems.append(f"plugin {name}: invalid hook implementation: {exc}")
            continue
        except Exception as exc:
            problems.append(f"plugin {name}: failed to start: {type(exc).__name__}: {exc}")
            continue
        info.obj = instance
        ordering[name] = (settings.priority, table.order)

    for i, obj in enumerate(extra):
        name = getattr(obj, "name", None) or f"extra-{i}-{type(obj).__name__}"
        prio = int(getattr(obj, "priority", DEFAULT_PRIORITY))
        if inspect.isclass(obj):  # a plugin class, as an entry point would name it (tests)
            name = getattr(obj, "name", None) or obj.__name__.lower()
            try:
                settings = settings_class(obj).model_validate(
                    {**(config.plugins[name].values if name in config.plugins else {}),
                     "enabled": True})
                obj = _instantiate(obj, name, settings, context)
                prio = settings.priority
            except (ValueError, ConfigError) as exc:
                problems.append(f"plugin {name}: {exc}")
                continue
        try:
            pm.register(obj, name=name)
        except pluggy.PluginValidationError as exc:
            problems.append(f"plugin {name}: invalid hook implementation: {exc}")
            continue
        ordering[name] = (prio, 5_000 + i)
        infos[name] = PluginInfo(name=name, distribution="(test)", version="", builtin=False,
                                 enabled=True, priority=prio, order=5_000 + i, obj=obj)

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # name it as conf.d does, not by its repr
        name = pm.get_name(exc.plugin) or repr(exc.plugin)
        problems.append(f"plugin {name}: {str(exc).split(' in plugin ', 1)[0]} "
                        "(not in tampu's hook catalogue: misspelt?)")

    if problems:
        raise ConfigError(problems)

    caller = HookCaller(
        pm, ordering, timeout=config.server.plugin_timeout,
        hook_timeouts={"deliver": config.server.delivery_timeout},
        plugin_timeouts={name: info.settings.hook_timeout for name, info in infos.items()
                         if info.enabled and info.settings is not None
                         and info.settings.hook_timeout},
    )
    hooks = Hooks(caller)
    for name, info in infos.items():
        if info.enabled and pm.has_plugin(name):
            info.hooks = sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(name)) or [])
    return Registry(pm=pm, hooks=hooks, plugins=infos)


def list_available(eps: dict[str, EntryPoint] | None = None) -> dict[str, PluginInfo]:
    eps = available_entry_points() if eps is None else eps
    out = {}
    for name, ep in sorted(eps.items()):
        dist, version = _dist_of(ep)
        out[name] = PluginInfo(name=name, distribution=dist, version=version,
                               builtin=dist == "tampu", enabled=False)
    return out


def _instantiate(obj: Any, name: str, settings: PluginSettings, context: ServerContext) -> Any:
    """A class is instantiated with a PluginContext; a module or object is used as it is."""
    if inspect.isclass(obj):
        factory: Any = obj
        return factory(PluginContext(name=name, settings=settings, server=context))
    return obj
