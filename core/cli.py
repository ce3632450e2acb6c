"""The ``tampu`` command: serve, check, plugins, queue; plugins add their own (user, aliases)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time

from tampu.commands import import_chasquid
from tampu.config import Config, load_config
from tampu.errors import ConfigError, QueueError
from tampu.queue import CORRUPT_DIR, Queue, format_age, valid_id
from tampu.registry import available_entry_points, build_registry

PIDFILE = "tampu.pid"


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s tampu[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-line chatter


def _load(config_dir: str) -> Config:
    return load_config(config_dir)


def _print_problems(exc: ConfigError) -> None:
    print("tampu: the configuration has problems:", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config_dir)
    except ConfigError as exc:
        _print_problems(exc)
        return 2
    _setup_logging(config.server.log_level)
    from tampu.server import Server, bind_listeners

    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()
    except ImportError:
        pass

    from tampu import workers

    extra = config.server.workers - 1
    if extra > 0:  # fail early, before forking: every process binds the same addresses
        try:
            for socks in bind_listeners(config, reuse_port=True).values():
                for sock in socks:
                    sock.close()
        except ConfigError as exc:
            _print_problems(exc)
            return 2
    pids, pipe = workers.fork_workers(config, extra)

    async def run() -> int:
        try:
            server = Server(config)
            server.bind(reuse_port=extra > 0)
            workers.attach_main(server, pids, pipe)
            config.data_dir.mkdir(parents=True, exist_ok=True)
            pidfile = config.data_dir / PIDFILE
            pidfile.write_text(f"{os.getpid()}\n")
            try:
                await server.serve()
            finally:
                pidfile.unlink(missing_ok=True)
        except ConfigError as exc:
            _print_problems(exc)
            return 2
        return 0

    try:
        return asyncio.run(run())
    finally:
        workers.reap(pids)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config_dir)
        from tampu.context import ServerContext
        from tampu.tls import load_certificates

        build_registry(config, ServerContext(config))
        load_certificates(config.certs_dir)
    except ConfigError as exc:
        _print_problems(exc)
        return 2
    print(f"configuration in {config.config_dir} is valid "
          f"({len(config.files)} file(s), {sum(t.enabled for t in config.plugins.values())} "
          "plugin(s) enabled)")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from tampu.context import ServerContext

    try:
        config = _load(args.config_dir)
        registry = build_registry(config, ServerContext(config))
    except ConfigError as exc:
        _print_problems(exc)
        return 2
    print("Plugins:")
    for info in sorted(registry.plugins.values(), key=lambda i: (not i.enabled, i.priority,
                                                                 i.order, i.name)):
        state = "enabled " if info.enabled else "disabled"
        kind = "built-in" if info.builtin else "third-party"
        hooks = ", ".join(info.hooks) if info.enabled else ""
        print(f"  {info.name:<16} {state} {kind:<11} {info.distribution} {info.version}"
              f"  priority={info.priority}" + (f"  hooks: {hooks}" if hooks else ""))
    print("Order per hook:")
    for hook, names in registry.order_by_hook().items():
        if names:
            print(f"  {hook:<24} {' -> '.join(names)}")
    return 0


def _queue(config_dir: str) -> tuple[Config, Queue]:
    from tampu.caller import HookCaller, Hooks
    from tampu.registry import new_plugin_manager

    config = _load(config_dir)
    hooks = Hooks(HookCaller(new_plugin_manager(), {}, timeout=30))
    return config, Queue(config.data_dir / "queue", hooks, config.server.max_queue_items)


def _signal_server(config: Config, sig: signal.Signals) -> bool:
    pidfile = config.data_dir / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, sig)
        return True
    except (OSError, ValueError):
        return False


def _queue_list(queue: Queue) -> int:
    now = time.time()
    ids = queue.ids()
    if not ids:
        print("queue is empty")
    for qid in ids:
        try:
            item = queue.load(qid)
        except QueueError as exc:
            print(f"{qid}  (unreadable: {exc})")
            continue
        print(f"{item.id}  age={format_age(now - item.created)}  from=<{item.mail_from}>  "
              f"attempts={item.attempts}  origin={item.origin}")
        for r in item.recipients:
            err = f"  last error: {r.last_error}" if r.last_error else ""
            print(f"    <{r.address}>  {r.status.value}{err}")
    corrupt = queue.dir / CORRUPT_DIR
    n_corrupt = sum(1 for p in corrupt.iterdir() if p.name.endswith(".item")) \
        if corrupt.is_dir() else 0
    if n_corrupt:
        print(f"{n_corrupt} unreadable item(s) set aside in {corrupt}")
    return 0


def _queue_show(queue: Queue, qid: str) -> int:
    try:
        item = queue.load(qid)
        message = queue.read_message(item.id)
    except (QueueError, OSError) as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({**item.header_json(), **item.state_json()}, indent=2))
    print()
    sys.stdout.write(message.decode("utf-8", "replace"))
    return 0


def _queue_delete(config: Config, queue: Queue, ids: list[str]) -> int:
    rc = 0
    for qid in ids:
        if not valid_id(qid) or not queue.item_path(qid).exists():
            print(f"tampu: no queue item {qid}", file=sys.stderr)
            rc = 1
            continue
        queue._remove_files(qid)
        print(f"deleted {qid}")
    _signal_server(config, signal.SIGUSR1)  # the server stops working on deleted items now
    return rc


def _queue_retry(config: Config, queue: Queue, ids: list[str]) -> int:
    for qid in ids:
        if not valid_id(qid) or not queue.item_path(qid).exists():
            print(f"tampu: no queue item {qid}", file=sys.stderr)
            return 1
    queue.request_retry(ids)
    if _signal_server(config, signal.SIGUSR1):
        print(f"asked the server to retry {' '.join(ids) or 'every item'} now")
        return 0
    print(f"tampu: no running server found (no {config.data_dir / PIDFILE}); items will be "
          "retried at its next start", file=sys.stderr)
    return 1


def cmd_queue(args: argparse.Namespace) -> int:
    try:
        config, queue = _queue(args.config_dir)
    except ConfigError as exc:
        _print_problems(exc)
        return 2
    if args.queue_command == "list":
        return _queue_list(queue)
    if args.queue_command == "show":
        return _queue_show(queue, args.id)
    if args.queue_command == "delete":
        return _queue_delete(config, queue, args.ids)
    if args.queue_command == "retry":
        return _queue_retry(config, queue, args.ids)
    return 2


def cmd_reload(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config_dir)
    except ConfigError as exc:
        _print_problems(exc)
        return 2
    if _signal_server(config, signal.SIGHUP):
        print("reload requested (see the server log for the outcome)")
        return 0
    print(f"tampu: no running server (no {config.data_dir / PIDFILE})", file=sys.stderr)
    return 1


def cmd_init(args: argparse.Namespace) -> int:
    from pathlib import Path

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tampu", description="tampu mail server")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config-dir", default=".", help="configuration directory (holds "
                       "conf.d/, domains/, certs/); default: current directory")
        return p

    with_config(sub.add_parser("serve", help="run the server")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("check", help="validate the configuration")).set_defaults(
        func=cmd_check)
    with_config(sub.add_parser("plugins", help="list plugins and hook order")).set_defaults(
        func=cmd_plugins)
    with_config(sub.add_parser("reload", help="make the running server re-read its "
                               "configuration")).set_defaults(func=cmd_reload)
    init = sub.add_parser("init", help="write a commented production configuration")
    init.add_argument("directory", help="the configuration directory to create")
    init.add_argument("--domain", required=True, help="your mail domain (example.com)")
    init.add_argument("--hostname", help="the server's name (default: mail.DOMAIN)")
    init.add_argument("--data-dir", default="/var/lib/tampu", help="queue and mail "
                      "(default: /var/lib/tampu)")
    init.add_argument("--force", action="store_true", help="overwrite an existing conf.d")
    init.set_defaults(func=cmd_init)
    q = with_config(sub.add_parser("queue", help="inspect and act on the queue"))
    qs = q.add_subparsers(dest="queue_command", required=True)
    qs.add_parser("list", help="items with age, sender, recipients and last error")
    qs.add_parser("show", help="one item with its message").add_argument("id")
    qs.add_parser("retry", help="deliver now (all items, or the IDs given)").add_argument(
        "ids", nargs="*")
    qs.add_parser("delete", help="remove items").add_argument("ids", nargs="+")
    q.set_defaults(func=cmd_queue)
    import_chasquid.register(sub)
    for name, ep in sorted(available_entry_points().items()):
        try:
            obj = ep.load()
        except Exception:  # a broken plugin must not break the CLI
            continue
        module = sys.modules.get(getattr(obj, "__module__", "") or "", obj)
        register = getattr(obj, "register_cli", None) or getattr(module, "register_cli", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
