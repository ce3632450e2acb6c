"""``auth``: SMTP AUTH against the core's user directory (``domains/<domain>/users``, in
tampu's or chasquid's format), and ``tampu user add|remove|list|check``, ``tampu users check``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from pydantic import Field

from tampu import AuthResult, PluginContext, PluginSettings, Session, blocking, hookimpl
from tampu.users import DEFAULT_LOG_N


class AuthSettings(PluginSettings):
    scrypt_log_n: int = Field(default=DEFAULT_LOG_N, ge=10, le=20,
                              description="scrypt cost (log2 N) for new passwords.")


class AuthPlugin:
    Settings = AuthSettings

    def __init__(self, ctx: PluginContext[AuthSettings]) -> None:
        self.ctx = ctx

    @hookimpl
    @blocking
    def smtp_auth(self, session: Session, mechanism: str, login: str,
                  password: str) -> AuthResult | None:
        outcome = self.ctx.server.users.check_password(login, password)
        if outcome is None:
            if "@" not in login:
                return None  # another source (Dovecot) may know bare logins
            return AuthResult(success=False, reason="not a local domain")
        ok, user, reason = outcome
        return AuthResult(success=ok, user=user if ok else None, reason=reason)


# ------------------------------------------------------------------------------ CLI


@hookimpl
def tampu_register_cli(subparsers: argparse._SubParsersAction[Any]) -> None:
    from tampu.cli import config_dir_option

    p = config_dir_option(subparsers.add_parser("user", help="manage users "
                                                "(domains/<domain>/users)"))
    sub = p.add_subparsers(dest="user_command", required=True)
    add = config_dir_option(sub.add_parser("add", help="add a user or change a password"))
    add.add_argument("address", help="user@domain")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input (one line)")
    add.add_argument("--format", choices=("tampu", "chasquid"), help="write the users file "
                     "in this format (default: the format it already has)")
    add.add_argument("--receive-only", action="store_true", help="the address receives mail "
                     "but cannot authenticate (chasquid's receive-only users)")
    rm = config_dir_option(sub.add_parser("remove", help="remove a user"))
    rm.add_argument("address")
    ls = config_dir_option(sub.add_parser("list", help="list users"))
    ls.add_argument("domain", nargs="?")
    chk = config_dir_option(sub.add_parser("check", help="test a password (asks for it)"))
    chk.add_argument("address")
    chk.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=_cli)
    users = config_dir_option(subparsers.add_parser("users", help="all users files"))
    usub = users.add_subparsers(dest="users_command", required=True)
    config_dir_option(usub.add_parser("check", help="validate every users file"))
    users.set_defaults(func=_cli_users)


def _read_password(from_stdin: bool, *, twice: bool = True) -> str:
    try:
        if from_stdin or not sys.stdin.isatty():
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = getpass.getpass("Password: ")
            if twice and getpass.getpass("Again: ") != password:
                raise SystemExit("tampu: passwords do not match")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        raise SystemExit("tampu: no password given") from None
    if not password:
        raise SystemExit("tampu: empty password refused")
    return password


def _scrypt_log_n(config: Any) -> int:  # noqa: ANN401 - a Config
    """``[plugins.auth] scrypt_log_n`` of the configuration, or the default without one."""
    from tampu.errors import ConfigError
    from tampu.registry import validate_plugin_settings

    if "auth" not in config.plugins:
        return DEFAULT_LOG_N
    try:
        settings = validate_plugin_settings(config, "auth", AuthPlugin)
    except ConfigError:  # `tampu check` reports a broken configuration
        return DEFAULT_LOG_N
    return settings.scrypt_log_n if isinstance(settings, AuthSettings) else DEFAULT_LOG_N


def _directory(config_dir: str) -> tuple[Any, Any]:
    from tampu.config import load_config
    from tampu.users import Domains, UserDirectory

    config = load_config(config_dir)
    server = config.server
    domains = Domains(config.domains_dir, server.local_domains, 0.0)
    return config, UserDirectory(domains, server.suffix_separators, server.drop_characters)


def _cli(args: argparse.Namespace) -> int:
    from tampu.addresses import AddressError, normalize_domain, normalize_user
    from tampu.errors import ConfigError
    from tampu.users import (
        Format,
        UserRecord,
        UsersFileError,
        hash_password,
        read_users_file,
        write_users_file,
    )

    try:
        config, directory = _directory(args.config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tampu: {problem}", file=sys.stderr)
        return 2
    if args.user_command == "list":
        domains = [args.domain] if args.domain else sorted(directory.domains.all())
        for domain in domains:
            for user, record in sorted(directory.file(domain).load().items()):
                print(f"{user}@{domain}" + ("  (receive only)" if record.receive_only else ""))
        return 0
    user, at, domain = args.address.rpartition("@")
    try:
        if not at or not user:
            raise AddressError("not user@domain")
        user, domain = normalize_user(user), normalize_domain(domain)
    except AddressError:
        print(f"tampu: {args.address!r} is not user@domain", file=sys.stderr)
        return 2
    users = directory.file(domain)
    if args.user_command == "check":
        password = _read_password(args.password_stdin, twice=False)
        outcome = directory.check_password(f"{user}@{domain}", password)
        ok = outcome is not None and outcome[0]
        print("password correct" if ok else
              f"authentication failed: {outcome[2] if outcome else 'not a local domain'}")
        return 0 if ok else 1
    fmt: Format = "tampu"
    records: dict[str, UserRecord] = {}
    if users.path.exists():
        try:
            fmt, records = read_users_file(users.path)
        except (OSError, UsersFileError) as exc:
            print(f"tampu: {exc}", file=sys.stderr)
            return 2
    fmt = "chasquid" if getattr(args, "format", None) == "chasquid" else \
        "tampu" if getattr(args, "format", None) == "tampu" else fmt
    if args.user_command == "add":
        if args.receive_only:
            records[user] = UserRecord(user, "", receive_only=True)
        else:
            secret = hash_password(_read_password(args.password_stdin),
                                   log_n=_scrypt_log_n(config))
            records[user] = UserRecord(user, secret)
        users.path.parent.mkdir(parents=True, exist_ok=True)
        write_users_file(users.path, records, fmt)
        print(f"user {user}@{domain} saved in {users.path}")
        return 0
    if user not in records:
        print(f"tampu: no user {user}@{domain} in {users.path}", file=sys.stderr)
        return 1
    del records[user]
    write_users_file(users.path, records, fmt)
    print(f"user {user}@{domain} removed")
    return 0


def _cli_users(args: argparse.Namespace) -> int:
    from tampu.errors import ConfigError

    try:
        _, directory = _directory(args.config_dir)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"tampu: {problem}", file=sys.stderr)
        return 2
    problems = directory.problems()
    for problem in problems:
        print(f"tampu: {problem}", file=sys.stderr)
    files = [d for d in directory.domains.all() if directory.has_file(d)]
    if not problems:
        print(f"{len(files)} users file(s), all valid")
    return 1 if problems else 0

