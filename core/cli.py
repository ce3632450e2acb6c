"""The ``tampu`` command: serve, check, plugins, reload, init, queue; plugins add their own
through the ``tampu_register_cli`` hook (user, aliases, dkim ...).

Every subcommand takes ``--config-dir`` (default: ``$TAMPU_CONFIG_DIR``, else /etc/tampu).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tampu.config import Config, load_config
from tampu.errors import ConfigError, PluginError

if TYPE_CHECKING:
    from tampu.runtime import Runtime

PIDFILE = "tampu.pid"
DEFAULT_CONFIG_DIR = "/etc/tampu"


def default_config_dir() -> str:
    return os.environ.get("TAMPU_CONFIG_DIR") or DEFAULT_CONFIG_DIR


def config_dir_option(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config-dir`` to a (sub)command; given at any level, the last one wins."""
    parser.add_argument("--config-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="configuration directory (conf.d/, domains/, certs/); default: "
                        "$TAMPU_CONFIG_DIR, else /etc/tampu")
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s tampu[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def print_problems(exc: ConfigError) -> None:
    print("tampu: the configuration has problems:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def load(args: argparse.Namespace) -> Config:
    return load_config(args.config_dir)


def loaded(args: argparse.Namespace) -> Config | None:
    """The configuration of ``--config-dir``, or None after printing its problems (the
    command then exits with status 2)."""
    try:
        return load(args)
    except ConfigError as exc:
        print_problems(exc)
        return None


def signal_server(config: Config, sig: signal.Signals) -> bool:
    try:
        pid = int((config.data_dir / PIDFILE).read_text().strip())
        os.kill(pid, sig)
        return True
    except (OSError, ValueError):
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    config = loaded(args)
    if config is None:
        return 2
    setup_logging(config.server.log_level)
    # A log line must never fail (an address or HELO name the terminal cannot encode):
    # what cannot be encoded is escaped, whatever the locale.
    for stream in (sys.stderr, sys.stdout):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    from tampu import workers
    from tampu.runtime import ensure_certificates, preload
    from tampu.server import Server, bind_listeners

    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()
    except ImportError:
        pass
    extra = config.server.workers - 1
    try:
        ensure_certificates(config)  # once, before any worker forks
        preload(config)  # the modules every process imports, shared by the forked workers
        if extra > 0:  # fail early, before forking: every process binds the same addresses
            for socks in bind_listeners(config, reuse_port=True, listen=False).values():
                for sock in socks:
                    sock.close()
    except (ConfigError, OSError) as exc:
        print_problems(exc if isinstance(exc, ConfigError) else ConfigError([str(exc)]))
        return 2
    # Until the event loop handles them, SIGTERM/SIGINT only ask for a stop (nothing serves
    # yet); the workers, forked below, start with the same handlers.
    early: list[int] = []
    target: list[tuple[asyncio.AbstractEventLoop, Server]] = []

    def early_stop(signum: int, _frame: object) -> None:
        early.append(signum)
        for loop, server in target:
            loop.call_soon_threadsafe(server.request_stop)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, early_stop)
    team = workers.fork_workers(config, extra)

    async def run() -> int:
        try:
            server = Server(config)
            server.bind(reuse_port=extra > 0, listen=extra == 0)
        except ConfigError as exc:
            print_problems(exc)
            return 2
        workers.attach_main(server, team)
        pidfile = config.data_dir / PIDFILE
        config.data_dir.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(f"{os.getpid()}\n")
        target.append((asyncio.get_running_loop(), server))
        if early:
            server.request_stop()
        try:
            served = await server.serve(gate=workers.main_gate(server, team))
        finally:
            pidfile.unlink(missing_ok=True)
        if team.failure:
            return 1
        if not served and not server.stop_requested:
            return 1
        return 0

    try:
        return asyncio.run(run())
    except PluginError as exc:  # a start-up hook failed: no process serves
        logging.getLogger("tampu.server").error("tampu could not start: %s", exc)
        return 1
    except Exception:
        logging.getLogger("tampu.server").exception("tampu could not start")
        return 1
    finally:
        team.stop()


def check(config: Config) -> Runtime:
    """Exactly the validation ``serve`` runs (``build_runtime``), without starting anything:
    the runtime ``serve`` would run (for commands that look at it). Raises ConfigError."""
    from tampu.runtime import build_runtime
    from tampu.stores import make_stores

    stores = make_stores(config)  # not opened: nothing connects
    return build_runtime(config, stores.queue, state=stores.state)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load(args)
        check(config)
    except ConfigError as exc:
        print_problems(exc)
        return 2
    print(f"configuration in {config.config_dir} is valid "
          f"({len(config.files)} file(s), {sum(t.enabled for t in config.plugins.values())} "
          "plugin(s) enabled)")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    try:
        runtime = check(load(args))
    except ConfigError as exc:
        print_problems(exc)
        return 2
    print("Plugins:")
    infos = runtime.registry.plugins.values()
    for info in sorted(infos, key=lambda i: (not i.enabled, i.priority, i.order, i.name)):
        state = "enabled " if info.enabled else "disabled"
        kind = "built-in" if info.builtin else "third-party"
        hooks = ", ".join(info.hooks) if info.enabled else ""
        print(f"  {info.name:<16} {state} {kind:<11} {info.distribution} {info.version}"
              f"  priority={info.priority}" + (f"  hooks: {hooks}" if hooks else ""))
    print("Order per hook:")
    for hook, names in runtime.hook_order().items():
        if names:
            print(f"  {hook:<24} {' -> '.join(names)}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate here first (the same check as ``serve``); then ask the server and wait for
    its answer in ``<data_dir>/reload.result``."""
    from tampu.server import RELOAD_RESULT

    try:
        config = load(args)
        check(config)
    except ConfigError as exc:
        print_problems(exc)
        print("tampu: reload not requested; the server keeps its configuration",
              file=sys.stderr)
        return 2
    result = config.data_dir / RELOAD_RESULT
    asked = time.time()
    if not signal_server(config, signal.SIGHUP):
        print(f"tampu: no running server (no {config.data_dir / PIDFILE})", file=sys.stderr)
        return 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            outcome = json.loads(result.read_text())
            if outcome.get("time", 0) >= asked:
                if outcome.get("ok"):
                    print("configuration reloaded")
                    return 0
                print_problems(ConfigError(list(outcome.get("problems") or [])))
                return 2
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    print("tampu: the server did not answer within 30 s; see its log", file=sys.stderr)
    return 1


def cmd_init(args: argparse.Namespace) -> int:
    from tampu.scaffold import init_config

    try:
        files = init_config(Path(args.directory), args.domain, hostname=args.hostname,
                            data_dir=args.data_dir, force=args.force)
    except (ValueError, OSError) as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 2
    for path in files:
        print(f"wrote {path}")
    print(f"\nNext: put the certificate in {args.directory}/certs/ (see certs/README.txt), add "
          f"users with `tampu user add USER@{args.domain} --config-dir {args.directory}`, "
          f"check with `tampu check --config-dir {args.directory}`; docs/operations.md has "
          "the systemd unit and the DNS records to publish.")
    return 0


def command_index(argv: Sequence[str]) -> int | None:
    """Where the subcommand is in ``argv``: its first argument that is neither an option nor
    the value of ``--config-dir``; None when there is none."""
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--config-dir":
            skip = True
        elif not arg.startswith("-"):
            return i
    return None


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names, or None."""
    i = command_index(argv)
    return argv[i] if i is not None else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; for ``command`` one of this module's own (serve, check,
    plugins, reload, init) only those, so that ``serve`` and the workers it forks never
    import the other commands' modules nor every plugin for its CLI (about 1 MiB per
    process)."""
    from tampu import __version__

    parser = argparse.ArgumentParser(prog="tampu", description="tampu mail server")
    parser.add_argument("--version", action="version", version=f"tampu {__version__}")
    config_dir_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, text in (("serve", cmd_serve, "run the server"),
                             ("check", cmd_check, "validate the configuration"),
                             ("plugins", cmd_plugins, "list plugins and hook order"),
                             ("reload", cmd_reload, "make the running server re-read its "
                              "configuration")):
        config_dir_option(sub.add_parser(name, help=text)).set_defaults(func=func)
    init = sub.add_parser("init", help="write a commented production configuration")
    init.add_argument("directory", help="the configuration directory to create")
    init.add_argument("--domain", required=True, help="your mail domain (example.com)")
    init.add_argument("--hostname", help="the server's name (default: mail.DOMAIN)")
    init.add_argument("--data-dir", default="/var/lib/tampu", help="queue and mail "
                      "(default: /var/lib/tampu)")
    init.add_argument("--force", action="store_true", help="overwrite an existing conf.d")
    init.set_defaults(func=cmd_init)
    if command in sub.choices:  # one of the commands above: nothing more to build
        return parser
    from tampu.commands import config_show, import_chasquid, sendmail, try_, why
    from tampu.commands import queue as queue_commands

    queue_commands.register(sub)
    import_chasquid.register(sub)
    config_show.register(sub)
    why.register(sub)
    try_.register(sub)
    sendmail.register(sub)
    from tampu.caller import HookCaller
    from tampu.facade import Hooks
    from tampu.registry import cli_plugins

    Hooks(HookCaller(cli_plugins(), {}, 30.0)).tampu_register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    command = command_of(given)
    if command == "sendmail":  # sendmail's command line is not argparse's
        from tampu.commands import sendmail

        rest = sendmail.remainder(given)
        assert rest is not None
        return sendmail.main(rest)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not hasattr(args, "config_dir"):
        args.config_dir = default_config_dir()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
