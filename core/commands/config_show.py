"""``tampu config show``: the effective configuration, each value with where it came from
(like Postfix's ``postconf -n`` and ``chasquid-util print-config``).

Every ``[server]`` setting is shown with its value and the conf.d file that set it, or
``(default)``; then every plugin table with the plugin's validated settings. Secrets (the
fields a plugin lists in ``secret_fields``, and values given as ``$env``/``$file``) are never
printed. ``--changed`` shows only what conf.d set (``postconf -n``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    from tampu.cli import config_dir_option

    p = config_dir_option(sub.add_parser("config", help="the effective configuration"))
    ps = p.add_subparsers(dest="config_command", required=True)
    show = config_dir_option(ps.add_parser("show", help="every setting, its value and the "
                                           "file it came from"))
    show.add_argument("--changed", action="store_true", help="only what conf.d sets "
                      "(postconf -n)")
    p.set_defaults(func=run)


def _value(value: Any) -> str:  # noqa: ANN401 - any setting
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return json.dumps(value, ensure_ascii=False, default=str)


def run(args: argparse.Namespace) -> int:
    from tampu.cli import loaded, print_problems
    from tampu.errors import ConfigError
    from tampu.registry import available_entry_points, settings_class, validate_plugin_settings

    config = loaded(args)
    if config is None:
        return 2
    root = str(config.config_dir)

    def origin(*loc: str) -> str | None:
        found = config.origins.get(tuple(loc))
        return str(found).removeprefix(root + "/") if found is not None else None

    print(f"# tampu configuration in {root}")
    print("[server]")
    for name in type(config.server).model_fields:
        where = origin("server", name)
        if where is None and args.changed:
            continue
        print(f"{name} = {_value(getattr(config.server, name))}    # {where or '(default)'}")
    eps = available_entry_points()
    for name, table in config.plugins.items():
        secret_keys = {k for k, v in table.values.items() if isinstance(v, dict) or (
            isinstance(v, str) and v.startswith(("$env:", "$file:")))}
        try:
            obj = eps[name].load() if name in eps else None
            settings = validate_plugin_settings(config, name, obj) if obj is not None else None
        except ConfigError as exc:
            print_problems(exc)
            return 2
        except Exception as exc:  # a broken third-party plugin: say so and go on
            print(f"# plugin {name}: cannot be loaded: {exc}", file=sys.stderr)
            settings = None
        print(f"\n[plugins.{name}]")
        if settings is None:
            print("# not an available plugin")
            continue
        secrets = set(settings_class(obj).secret_fields) | secret_keys
        for key in type(settings).model_fields:
            where = origin("plugins", name, key)
            if where is None and args.changed:
                continue
            shown = "(secret)" if key in secrets else _value(getattr(settings, key))
            print(f"{key} = {shown}    # {where or '(default)'}")
    return 0
