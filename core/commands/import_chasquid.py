"""``tampu import chasquid DIR [--to DIR] [--force]``: take over a chasquid configuration.

Writes an equivalent ``conf.d/`` (default: beside ``chasquid.conf``, so tampu runs in the
chasquid directory as it is), prints each chasquid.conf field it mapped and each it could not
(with why), converts chasquid's domaininfo store into the domaininfo plugin's files, checks
the users files, and finally runs ``tampu check`` on the result. Users, aliases, certificates
and hooks stay where they are: tampu reads chasquid's layout and formats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from tampu.chasquid import (
    ChasquidConfig,
    ChasquidError,
    TextFormatError,
    read_config,
    read_domaininfo,
    read_users,
    to_confd,
    write_tampu_domaininfo,
)

KEPT = ("domains", "certs", "hooks")
"""chasquid's folders tampu reads in place; linked into --to DIR when it is elsewhere."""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``import chasquid`` to the ``tampu`` command's sub-commands."""
    imp = subparsers.add_parser("import", help="take over another mail server's configuration")
    sources = imp.add_subparsers(dest="import_source", required=True)
    p = sources.add_parser(
        "chasquid", help="write a conf.d equivalent to chasquid.conf; keep chasquid's users, "
        "aliases, certificates and hooks in place")
    p.add_argument("directory", help="chasquid's configuration directory (/etc/chasquid)")
    p.add_argument("--to", metavar="DIR", help="write the tampu configuration there (conf.d/, "
                   "links to chasquid's domains/, certs/, hooks/); default: DIRECTORY itself")
    p.add_argument("--force", action="store_true", help="replace an existing conf.d (the old "
                   "one is kept as conf.d.before-import-TIME)")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """Run with the arguments that follow ``tampu import``: ``["chasquid", DIR, ...]``."""
    parser = argparse.ArgumentParser(prog="tampu")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["import", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


def run(args: argparse.Namespace) -> int:
    source = Path(args.directory)
    target = Path(args.to) if args.to else source
    try:
        cfg = read_config(source / "chasquid.conf")
    except OSError as exc:
        print(f"tampu: cannot read {source / 'chasquid.conf'}: {exc.strerror}", file=sys.stderr)
        return 2
    except (TextFormatError, ChasquidError) as exc:
        print(f"tampu: chasquid would not load this file either: {exc}", file=sys.stderr)
        return 2
    confd = target / "conf.d"
    if confd.exists() and (not confd.is_dir() or any(confd.iterdir())):
        if not args.force:
            print(f"tampu: {confd} already exists; use --force to replace it", file=sys.stderr)
            return 2
        backup = confd.with_name(f"conf.d.before-import-{time.strftime('%Y%m%d-%H%M%S')}")
        confd.rename(backup)
        print(f"moved the existing {confd} to {backup}")

    files, mapped, unmapped = to_confd(cfg, source, target_dir=target)
    confd.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (confd / name).write_text(text, encoding="utf-8")
        (confd / name).chmod(0o644)  # no secrets in it; tampu's user must read it
        print(f"wrote {confd / name}")
    if target.resolve() != source.resolve():
        for name in KEPT:
            link, real = target / name, (source / name).resolve()
            if real.exists() and not link.exists() and not link.is_symlink():
                link.symlink_to(real, target_is_directory=True)
                print(f"linked {link} -> {real}")

    print("\nchasquid.conf fields mapped:")
    for line in mapped:
        print(f"  {line}")
    notes = survey(source, cfg)
    unmapped += notes
    print("\nnot mapped:" if unmapped else "\nnot mapped: nothing")
    for name, why in unmapped:
        print(f"  {name}: {why}")

    print("\nkept in place (tampu reads them as they are):")
    for line in kept(source):
        print(f"  {line}")
    print()
    convert_domaininfo(source, cfg)
    print()
    from tampu.cli import cmd_check

    if cmd_check(argparse.Namespace(config_dir=str(target))) != 0:
        return 1
    print(f"next: stop chasquid, then `tampu serve --config-dir {target}` (same ports, users, "
          "aliases and certificates)")
    return 0


def _data_dir(source: Path, cfg: ChasquidConfig) -> Path:
    data = Path(cfg.data_dir)
    return data if data.is_absolute() else source.resolve() / data


def kept(source: Path) -> list[str]:
    """What of chasquid's layout tampu uses as it is, with counts; problems are flagged."""
    lines = []
    domains = source / "domains"
    for d in sorted(domains.iterdir()) if domains.is_dir() else []:
        if not d.is_dir():
            continue
        parts = []
        if (d / "users").exists():
            try:
                users = read_users(d / "users")
                denied = sum(e.receive_only for e in users.values())
                parts.append(f"users: {len(users)} ({denied} receive-only)")
            except (OSError, TextFormatError) as exc:
                parts.append(f"users UNREADABLE ({exc}): logins for this domain will fail")
        if (d / "aliases").exists():
            parts.append("aliases")
        lines.append(f"domains/{d.name}: " + (", ".join(parts) or "a local domain"))
    certs = source / "certs"
    for c in sorted(certs.iterdir()) if certs.is_dir() else []:
        if (c / "fullchain.pem").exists() and (c / "privkey.pem").exists():
            lines.append(f"certs/{c.name}/")
    for hook in ("post-data", "alias-resolve", "alias-exists"):
        if os.access(source / "hooks" / hook, os.X_OK):
            lines.append(f"hooks/{hook}")
    return lines


def survey(source: Path, cfg: ChasquidConfig) -> list[tuple[str, str]]:
    """chasquid state and features outside chasquid.conf that tampu does not take over."""
    notes: list[tuple[str, str]] = []
    dkim = sorted(source.glob("domains/*/dkim:*.pem"))
    if dkim:
        notes.append(("domains/*/dkim:*.pem", f"{len(dkim)} DKIM key(s): used as they are by "
                      "the dkim plugin (it signs for the From: domain, chasquid for MAIL FROM)"))
    queue = _data_dir(source, cfg) / "queue"
    try:
        waiting = len(list(queue.glob("m:*")))
    except OSError:
        waiting = 0
    if waiting:
        notes.append((f"{queue}", f"{waiting} message(s) in chasquid's queue: tampu does not "
                      "read chasquid's queue; let chasquid deliver them before switching"))
    if (_data_dir(source, cfg) / "sts-cache").is_dir():
        notes.append(("sts-cache", "chasquid's MTA-STS policy cache: not read; tampu fetches "
                      "the policies again (delivery_smtp, mta_sts = true)"))
    return notes


def convert_domaininfo(source: Path, cfg: ChasquidConfig) -> None:
    """chasquid's ``<data_dir>/domaininfo/s:<domain>`` -> the domaininfo plugin's JSON files
    (the same folder: tampu keeps chasquid's data_dir)."""
    folder = _data_dir(source, cfg) / "domaininfo"
    try:
        infos, problems = read_domaininfo(folder)
        written = write_tampu_domaininfo(folder, infos) if infos else []
    except OSError as exc:
        print(f"domaininfo: cannot convert {folder}: {exc}; security levels will be learned "
              "again")
        return
    for problem in problems:
        print(f"domaininfo: skipped {problem}")
    if not infos:
        print(f"domaininfo: nothing to convert in {folder}")
        return
    print(f"domaininfo: {len(written)} domain(s) converted from {folder}/s:* to "
          f"{folder}/<domain>.json")


if __name__ == "__main__":
    sys.exit(main())
