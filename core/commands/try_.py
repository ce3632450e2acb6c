"""``tampu try``: a dry run of reception and routing for one envelope, with the live
configuration (its plugins, files and DNS), writing nothing.

    tampu try --from a@example.org --to bob@example.com [--to ...] [--ip 203.0.113.5]
              [--helo mx.example.org] [--auth user@example.com] [--listener smtp]
              [--message FILE] [--json]

Every reception hook runs as for a real session (connect, HELO, MAIL FROM, each RCPT TO,
DATA with the message), then the expansion of each accepted recipient and, for each final
recipient, the core's relay guard and the ``delivery_route`` of the backends (which one
would deliver it, and where). Nothing is queued and nothing is delivered: ``deliver`` is never
called, no lifecycle hook runs (no listener opens), and implementations marked
``@dry_run_unsafe`` (the post-data program, domaininfo's level records) are skipped and named.
The exit status is 0 when everything would be accepted and routed, 1 when something would
be refused, 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from tampu.envelope import Envelope, ListenerInfo, Message, Session
from tampu.errors import PluginError
from tampu.item import QueueItem, Recipient
from tampu.reply import Reply


def register(sub: argparse._SubParsersAction[Any]) -> None:
    from tampu.cli import config_dir_option

    p = config_dir_option(sub.add_parser("try", help="a dry run of reception and routing "
                                         "for an envelope (writes nothing)"))
    p.add_argument("--from", dest="sender", default="", help="MAIL FROM (default: <>)")
    p.add_argument("--to", dest="rcpts", action="append", required=True, help="RCPT TO "
                   "(repeat for several)")
    p.add_argument("--ip", default="192.0.2.1", help="the client's address")
    p.add_argument("--helo", default="client.example", help="the client's HELO name")
    p.add_argument("--auth", help="act as this authenticated user")
    p.add_argument("--listener", default=None, help="the listener (default: the first of "
                   "kind smtp, or submission with --auth)")
    p.add_argument("--message", help="a message file for DATA (default: a small one)")
    p.add_argument("--json", action="store_true", help="the steps as JSON")
    p.set_defaults(func=run)


def _line(stage: str, subject: str, reply: Reply | None, plugin: str | None,
          default: str) -> dict[str, Any]:
    if reply is None:
        return {"stage": stage, "subject": subject, "outcome": "accepted", "plugin": None,
                "text": default}
    outcome = "accepted" if reply.is_positive else "refused"
    return {"stage": stage, "subject": subject, "outcome": outcome,
            "plugin": plugin or "core", "text": str(reply).replace("\r\n", " / ")}


async def dry_run(runtime: Any, args: argparse.Namespace) -> list[dict[str, Any]]:  # noqa: ANN401
    from tampu.addresses import PathError, parse_path
    from tampu.authres import results
    from tampu.delivery_round import NO_BACKEND, relay_refusal

    hooks, settings = runtime.hooks, runtime.config.server
    kind = "submission" if args.auth else "smtp"
    listener = args.listener or next(
        (n for n, lst in settings.listeners.items() if lst.kind == kind), kind)
    lst = settings.listeners.get(listener)
    info = ListenerInfo(listener, lst.kind if lst else kind, "dry-run")  # type: ignore[arg-type]
    session = Session(peer_host=args.ip, peer_port=0, listener=info, helo=args.helo,
                      esmtp=True, auth_user=args.auth)
    steps: list[dict[str, Any]] = []

    async def ask(stage: str, subject: str, call: Any, default: str) -> Reply | None:  # noqa: ANN401
        try:
            reply, plugin = await call
        except PluginError as exc:
            reply, plugin = Reply(451, "4.3.0", f"plugin {exc.plugin} failed: {exc.reason}"), \
                exc.plugin
        steps.append(_line(stage, subject, reply, plugin, default))
        return reply if reply is not None and not reply.is_positive else None

    if await ask("connect", args.ip, hooks.smtp_connect(session), "the greeting is sent"):
        return steps
    if await ask("helo", args.helo, hooks.smtp_helo(session, args.helo), "250"):
        return steps
    try:
        path = parse_path(f"<{args.sender}>", sender=True)
    except PathError as exc:
        steps.append(_line("mail", args.sender, exc.reply, "core", ""))
        return steps
    env = Envelope(mail_from=path.address, mail_params=path.params)
    if await ask("mail", path.address or "<>", hooks.smtp_mail_from(
            session, env, path.address, path.params), "250 2.1.0 Sender OK"):
        return steps
    for raw in args.rcpts:
        try:
            rpath = parse_path(f"<{raw}>", sender=False)
        except PathError as exc:
            steps.append(_line("rcpt", raw, exc.reply, "core", ""))
            continue
        before = len(steps)
        refused = await ask("rcpt", rpath.address, hooks.smtp_rcpt_to(
            session, env, rpath.address, rpath.params), "")
        if steps[before]["plugin"] is None:  # nobody accepted it: the core refuses
            steps[before].update(outcome="refused", plugin="core",
                                 text="550 5.1.1 Unknown recipient (no plugin accepted it)")
        elif refused is None:
            env.rcpt_to.append(rpath.address)
            env.rcpt_params.append(rpath.params)
    if not env.rcpt_to:
        steps.append({"stage": "data", "subject": "", "outcome": "refused", "plugin": "core",
                      "text": "554 5.5.1 No valid recipients"})
        return steps
    data = args.message_data or (
        f"From: {args.sender}\r\nSubject: tampu try\r\n\r\ndry run\r\n".encode())
    message = Message(data)
    if await ask("data", "", hooks.smtp_data(session, env, message),
                 "250 2.0.0 would be queued"):
        return steps
    item = QueueItem(id="dryrun", mail_from=env.mail_from, recipients=[],
                     auth_user=session.auth_user, trusted_network=session.trusted_network)
    added = [name for name, _ in message.added_headers]
    for result in results(env):
        steps.append({"stage": "check", "subject": result.method, "outcome": result.result,
                      "plugin": None, "text": str(result)})
    for rcpt in env.rcpt_to:
        try:
            finals, plugin = await hooks.queue_expand_recipient(env, item, rcpt)
        except PluginError as exc:
            steps.append({"stage": "expand", "subject": rcpt, "outcome": "refused",
                          "plugin": exc.plugin, "text": f"451 4.3.0 {exc.reason}"})
            continue
        for final in finals if finals is not None else [Recipient(rcpt, rcpt)]:
            if final.address != rcpt or final.route.to_json():
                steps.append({"stage": "expand", "subject": rcpt, "outcome": final.address,
                              "plugin": plugin, "text": json.dumps(final.route.to_json())})
            item.recipients.append(final)
    try:
        added += [name for name, _ in await hooks.queue_add_headers(item, data)]
    except PluginError as exc:
        steps.append({"stage": "headers", "subject": "", "outcome": "refused",
                      "plugin": exc.plugin, "text": f"451 4.3.0 {exc.reason}"})
    if added:
        steps.append({"stage": "headers", "subject": "", "outcome": "added", "plugin": None,
                      "text": ", ".join(["Received", *added])})
    for final in item.recipients:
        guard = relay_refusal(runtime.context.is_local_domain, item, final)
        if guard is not None:
            steps.append({"stage": "route", "subject": final.address, "outcome": "refused",
                          "plugin": "core", "text": guard.text})
            continue
        try:
            where, plugin = await hooks.delivery_route(item, final)
        except PluginError as exc:
            where, plugin = f"cannot tell: {exc.reason}", exc.plugin
        if where is None:
            order = hooks.order(["deliver", "deliver_batch", "delivery_route"])
            cannot = [n for n in dict.fromkeys(order["deliver_batch"] + order["deliver"])
                      if n not in order["delivery_route"]]
            where = (f"no backend says it would take it ({', '.join(cannot)} cannot tell)"
                     if cannot else NO_BACKEND + ": a permanent failure")
        steps.append({"stage": "route", "subject": final.address, "outcome": where,
                      "plugin": plugin, "text": ""})
    return steps


def show(steps: list[dict[str, Any]], skipped: list[tuple[str, str]]) -> str:
    names = {"connect": "CONNECT", "helo": "HELO", "mail": "MAIL FROM", "rcpt": "RCPT TO",
             "data": "DATA"}
    lines = []
    for s in steps:
        stage = s["stage"]
        if stage in names:
            who = f" by {s['plugin']}" if s["plugin"] else " (no plugin objected)"
            lines.append(f"{names[stage]} {s['subject']}: {s['outcome']}{who}"
                         + (f": {s['text']}" if s["text"] else ""))
        elif stage == "check":
            lines.append(f"  check: {s['text']}")
        elif stage == "expand":
            lines.append(f"  <{s['subject']}> expands to <{s['outcome']}> ({s['plugin']}"
                         + (f", route {s['text']})" if s["text"] != "{}" else ")"))
        elif stage == "headers":
            lines.append(f"  headers added on top: {s['text']}")
        elif stage == "route":
            by = f" by {s['plugin']}" if s["plugin"] else ""
            lines.append(f"  <{s['subject']}>: {s['outcome']}{by}")
    for hook, plugin in dict.fromkeys(skipped):
        lines.append(f"  skipped {plugin} in {hook}: unsafe for dry runs")
    lines.append("nothing was queued or delivered")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tampu.cli import check, load, print_problems
    from tampu.errors import ConfigError

    try:
        runtime = check(load(args))
    except ConfigError as exc:
        print_problems(exc)
        return 2
    try:
        args.message_data = Path(args.message).read_bytes() if args.message else b""
    except OSError as exc:
        print(f"tampu: cannot read the message: {exc}", file=sys.stderr)
        return 2
    runtime.hooks.caller.start_dry_run()
    start = time.monotonic()
    try:
        steps = asyncio.run(dry_run(runtime, args))
    except OSError as exc:
        print(f"tampu: {exc}", file=sys.stderr)
        return 2
    skipped = runtime.hooks.caller.skipped
    if args.json:
        print(json.dumps({"steps": steps, "skipped": [list(p) for p in dict.fromkeys(skipped)],
                          "seconds": round(time.monotonic() - start, 3)}, indent=1))
    else:
        print(show(steps, skipped))
    refused = any(s["outcome"] == "refused" for s in steps)
    return 1 if refused else 0
