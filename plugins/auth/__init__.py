"""``auth``: SMTP AUTH against per-domain user databases (``domains/<domain>/users``).

Also provides ``tampu user add|remove|list``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from pydantic import Field

from tampu import AuthResult, PluginContext, PluginSettings, Session, blocking, hookimpl
from tampu.plugins.auth.userdb import (
    DEFAULT_LOG_N,
    UserDirectory,
    burn_time,
    hash_password,
    verify_password,
)


class AuthSettings(PluginSettings):
    scrypt_log_n: int = Field(default=DEFAULT_LOG_N, ge=10, le=20,
                              description="scrypt cost (log2 N) for new passwords.")


class AuthPlugin:
    Settings = AuthSettings

    def __init__(self, ctx: PluginContext[AuthSettings]) -> None:
        self.ctx = ctx
        self.users = UserDirectory(ctx.server.config.domains_dir,
                                   ctx.server.config.server.file_check_interval)

    @hookimpl
    @blocking
    def smtp_auth(self, session: Session, mechanism: str, login: str,
                  password: str) -> AuthResult | None:
        user, _, domain = login.rpartition("@")
        if not _ or not user or not domain:
            burn_time(password)
            return AuthResult(success=False, reason="login must be user@domain")
        encoded = self.users.lookup(user.lower(), domain)
        if encoded is None:
            burn_time(password)
            return AuthResult(success=False, reason="unknown user")
        if verify_password(password, encoded):
            return AuthResult(success=True, user=f"{user.lower()}@{domain.lower()}")
        return AuthResult(success=False, reason="wrong password")


# ------------------------------------------------------------------------------ CLI


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tampu user add|remove|list``: found by the CLI through this plugin's entry point."""
    p = subparsers.add_parser("user", help="manage users (domains/<domain>/users)")
    p.add_argument("--config-dir", default=".", help="configuration directory")
    sub = p.add_subparsers(dest="user_command", required=True)
    # --config-dir also after the subcommand (`tampu user add --config-dir DIR ...`);
    # SUPPRESS keeps the value given before it when it is not repeated.
    here = argparse.ArgumentParser(add_help=False)
    here.add_argument("--config-dir", default=argparse.SUPPRESS, help="configuration directory")
    add = sub.add_parser("add", help="add a user or change a password", parents=[here])
    add.add_argument("address", help="user@domain")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from standard input (one line)")
    rm = sub.add_parser("remove", help="remove a user", parents=[here])
    rm.add_argument("address")
    ls = sub.add_parser("list", help="list users", parents=[here])
    ls.add_argument("domain", nargs="?")
    p.set_defaults(func=_cli)


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise SystemExit("tampu: passwords do not match")
    if not password:
        raise SystemExit("tampu: empty password refused")
    return password


def _scrypt_log_n(config_dir: Path) -> int:
    """``[plugins.auth] scrypt_log_n`` of the configuration, or the default without one."""
    from tampu.config import load_config, resolve_secrets
    from tampu.errors import ConfigError

    try:
        table = load_config(config_dir).plugins.get("auth")
        if table is None:
            return DEFAULT_LOG_N
        values = resolve_secrets(table.values, config_dir)
        return AuthSettings.model_validate(values).scrypt_log_n
    except (ConfigError, ValueError):  # `tampu check` reports a broken configuration
        return DEFAULT_LOG_N


def _cli(args: argparse.Namespace) -> int:
    directory = UserDirectory(Path(args.config_dir) / "domains")
    if args.user_command == "list":
        root = directory.domains_dir
        domains = [args.domain] if args.domain else sorted(
            p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for domain in domains:
            for user in sorted(directory.db(domain).users()):
                print(f"{user}@{domain}")
        return 0
    user, at, domain = args.address.rpartition("@")
    if not at or not user or not domain:
        print(f"tampu: {args.address!r} is not user@domain", file=sys.stderr)
        return 2
    user, domain = user.lower(), domain.lower()
    db = directory.db(domain)
    users = dict(db.users())
    if args.user_command == "add":
        users[user] = hash_password(_read_password(args.password_stdin),
                                    log_n=_scrypt_log_n(Path(args.config_dir)))
        db.write(users)
        print(f"user {user}@{domain} saved in {db.path}")
        return 0
    if user not in users:
        print(f"tampu: no user {user}@{domain} in {db.path}", file=sys.stderr)
        return 1
    del users[user]
    db.write(users)
    print(f"user {user}@{domain} removed")
    return 0
