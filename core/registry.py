"""Plugin discovery (entry points), enabling, validation of settings and hook order.

Built-in plugins are entry points of the ``tampu`` distribution in group ``tampu.plugins``,
exactly like third-party ones. ``[plugins.NAME] enabled = true`` in conf.d loads NAME; nothing
else is loaded. The core never imports ``tampu.plugins.*``. Plugin objects given by a test go
through the same validation (their conf.d table, if any, with ``enabled`` forced on).
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
from tampu.config import Config, PluginSettings, format_validation_error, resolve_secrets
from tampu.context import PluginContext, ServerContext
from tampu.errors import ConfigError

GROUP = "tampu.plugins"
DEFAULT_PRIORITY = 100
UNSUPPORTED_MARKS = ("wrapper", "hookwrapper", "tryfirst", "trylast")


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
    """The loaded plugins of one configuration: a PluginManager, their order and timeouts."""

    pm: pluggy.PluginManager
    plugins: dict[str, PluginInfo]
    ordering: dict[str, tuple[int, int]]
    plugin_timeouts: dict[str, float]


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


def validate_plugin_settings(config: Config, name: str, obj: Any,
                             force_enabled: bool = False) -> PluginSettings:
    """Validate ``[plugins.NAME]`` against the plugin's Settings; raises ConfigError."""
    table = config.plugins.get(name)
    values = dict(table.values) if table is not None else {}
    if force_enabled:
        values["enabled"] = True
    try:
        return settings_class(obj).model_validate(resolve_secrets(values, config.config_dir))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, ("plugins", name),
                                                  config.origin_of)) from None
    except ValueError as exc:
        where = table.files[0] if table is not None and table.files else "conf.d"
        raise ConfigError([f"{where}: plugins.{name}: {exc}"]) from None


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _unsupported(pm: pluggy.PluginManager, name: str) -> list[str]:
    """tampu calls implementations itself, in priority order: pluggy's wrappers and
    tryfirst/trylast would be silently mishandled, so they are refused at start-up."""
    plugin = pm.get_plugin(name)
    problems = []
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            marks = [m for m in UNSUPPORTED_MARKS if getattr(impl, m, False)]
            if marks:
                problems.append(f"plugin {name}: hook {caller.name} is marked "
                                f"{'/'.join(marks)}, which tampu does not support; order "
                                f"plugins with [plugins.{name}] priority instead")
    return problems


class _Loader:
    def __init__(self, config: Config, context: ServerContext) -> None:
        self.config = config
        self.context = context
        self.pm = new_plugin_manager()
        self.problems: list[str] = []
        self.infos = list_available()
        self.ordering: dict[str, tuple[int, int]] = {}

    def add(self, name: str, obj: Any, order: int, *, given: bool = False) -> None:
        """Validate settings, instantiate and register one plugin (problems are collected)."""
        try:
            settings = validate_plugin_settings(self.config, name, obj, force_enabled=given)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return
        info = self.infos.get(name) or PluginInfo(
            name, getattr(obj, "distribution", "(test)"), "", False, True)
        self.infos[name] = info
        info.settings, info.enabled = settings, settings.enabled
        info.priority, info.order = settings.priority, order
        if not settings.enabled:
            self.pm.set_blocked(name)
            return
        try:
            factory: Any = obj
            instance = factory(PluginContext(name, settings, self.context)) \
                if inspect.isclass(obj) else obj
            self.pm.register(instance, name=name)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return
        except pluggy.PluginValidationError as exc:
            self.problems.append(f"plugin {name}: invalid hook implementation: {exc}")
            return
        except Exception as exc:  # a broken plugin must not crash start-up
            self.problems.append(f"plugin {name}: failed to start: {type(exc).__name__}: {exc}")
            return
        self.problems.extend(_unsupported(self.pm, name))
        info.obj = instance
        priority = settings.priority
        if given and not inspect.isclass(obj) and isinstance(getattr(obj, "priority", None), int):
            priority = info.priority = obj.priority  # a test object may say it itself
        self.ordering[name] = (priority, order)


def build_registry(config: Config, context: ServerContext,
                   extra: Iterable[Any] = ()) -> Registry:
    """Load the enabled plugins of ``config`` (and ``extra`` plugin objects or classes, for
    tests). Collects every problem before raising one ConfigError."""
    loader = _Loader(config, context)
    eps = available_entry_points()
    extra = list(extra)
    names = [getattr(obj, "name", None) or (obj.__name__.lower() if inspect.isclass(obj)
                                            else f"extra-{i}-{type(obj).__name__}")
             for i, obj in enumerate(extra)]
    for name, table in config.plugins.items():
        if name in names:
            continue  # a test gives this plugin itself; its table configures it
        if name not in eps:
            where = table.files[0] if table.files else "conf.d"
            loader.problems.append(f"{where}: key plugins.{name}: unknown plugin {name!r} "
                                   f"(available: {', '.join(sorted(eps)) or 'none'})")
            continue
        try:
            obj = eps[name].load()
        except Exception as exc:  # a broken third-party package must not crash start-up
            loader.problems.append(f"plugin {name}: cannot be loaded: "
                                   f"{type(exc).__name__}: {exc}")
            continue
        loader.add(name, obj, table.order)
    for i, (name, obj) in enumerate(zip(names, extra, strict=True)):
        loader.add(name, obj, 5_000 + i, given=True)
    try:
        loader.pm.check_pending()
    except pluggy.PluginValidationError as exc:  # name it as conf.d does, not by its repr
        name = loader.pm.get_name(exc.plugin) or repr(exc.plugin)
        loader.problems.append(f"plugin {name}: {str(exc).split(' in plugin ', 1)[0]} "
                               "(not in tampu's hook catalogue: misspelt?)")
    if loader.problems:
        raise ConfigError(loader.problems)
    pm = loader.pm
    for name, info in loader.infos.items():
        if info.enabled and pm.has_plugin(name):
            info.hooks = sorted(h.name for h in pm.get_hookcallers(pm.get_plugin(name)) or [])
    timeouts = {name: info.settings.hook_timeout for name, info in loader.infos.items()
                if info.enabled and info.settings is not None and info.settings.hook_timeout}
    return Registry(pm, loader.infos, loader.ordering, timeouts)


def preload_plugins(config: Config) -> None:
    """Import the modules of the plugins ``config`` names, enabled or not (as
    :func:`build_registry` does, to check their settings), without instantiating anything
    (``serve``, before its workers fork: see :func:`tampu.runtime.preload`). One that cannot
    be loaded is left to :func:`build_registry`, which reports it."""
    eps = available_entry_points()
    for name in config.plugins:
        if name in eps:
            try:
                eps[name].load()
            except Exception:  # noqa: BLE001, S112 - reported by build_registry
                continue


def list_available(eps: dict[str, EntryPoint] | None = None) -> dict[str, PluginInfo]:
    eps = available_entry_points() if eps is None else eps
    out = {}
    for name, ep in sorted(eps.items()):
        dist, version = _dist_of(ep)
        out[name] = PluginInfo(name=name, distribution=dist, version=version,
                               builtin=dist == "tampu", enabled=False)
    return out


def cli_plugins() -> pluggy.PluginManager:
    """The module of every available plugin, for ``tampu_register_cli``: module-level
    implementations, neither enabled nor instantiated (``tampu user add`` works with the
    server stopped and whatever the configuration)."""
    import sys

    pm = new_plugin_manager()
    for name, ep in sorted(available_entry_points().items()):
        try:
            obj = ep.load()
            module = obj if inspect.ismodule(obj) else sys.modules[obj.__module__]
            if not pm.is_registered(module):
                pm.register(module, name=name)
        except Exception:  # a broken plugin must not break the CLI
            continue
    return pm
