"""``dovecot_auth``: SMTP AUTH and recipient checks against Dovecot's auth service (chasquid's
``dovecot_auth``).

For the domains it serves (by default the local domains without a ``domains/<d>/users`` file)
a login is checked with Dovecot's client socket and a local recipient is accepted if Dovecot's
userdb knows it. A login without ``@domain`` is passed to Dovecot as it is, as chasquid does;
the session is then authenticated as the name Dovecot gives back (``user=``, which carries
the domain if Dovecot adds one, e.g. with ``auth_default_realm``). When Dovecot cannot answer,
AUTH gets ``454 4.7.0`` and RCPT ``451 4.4.3``: nothing is accepted or refused for good on an
outage. The protocol client is :mod:`tampu.plugins.dovecot_auth.client`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from tampu import (
    AuthResult,
    Envelope,
    PluginContext,
    PluginError,
    PluginSettings,
    Reply,
    ServerContext,
    Session,
    hookimpl,
)
from tampu.addresses import (
    AddressError,
    normalize_address,
    normalize_domain,
    normalize_user,
    split_address,
)
from tampu.files import FileStamp
from tampu.plugins.dovecot_auth.client import (
    DEFAULT_TIMEOUT,
    DovecotAuth,
    is_safe_username,
)
from tampu.reply import RECIPIENT_OK

__all__ = ["TEMPORARY_LOOKUP_FAILURE", "DovecotAuth", "DovecotAuthPlugin",
           "DovecotAuthSettings"]

TEMPORARY_LOOKUP_FAILURE = Reply(451, "4.4.3", "Temporary error checking address")
"""RCPT answer when Dovecot cannot say whether a recipient exists (chasquid's words)."""


class DovecotAuthSettings(PluginSettings):
    priority: int = Field(default=60, description="Order on each hook: lower runs first. "
                          "After aliases (50), before auth and localusers (100), which "
                          "answer for every login and would refuse Dovecot's users first.")
    userdb_path: str = Field(default="", description="Dovecot's userdb socket (auth-userdb "
                             "listener). Empty: the first socket of "
                             "/var/run/dovecot/auth-chasquid-userdb, "
                             "/var/run/dovecot/auth-userdb, looked for on every request.")
    client_path: str = Field(default="", description="Dovecot's client socket (auth-client "
                             "listener). Empty: the first socket of "
                             "/var/run/dovecot/auth-chasquid-client, "
                             "/var/run/dovecot/auth-client, looked for on every request.")
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, description="Seconds one request "
                           "to Dovecot may take, connection included. Keep it above Dovecot's "
                           "auth_failure_delay (2 s) and below the hook timeout.")
    domains: list[str] = Field(default_factory=list, description="Domains whose users are "
                               "Dovecot's. Empty: every local domain that has no "
                               "domains/<domain>/users file (checked as files change).")
    bare_logins: bool = Field(default=True, description="Pass logins without @domain to "
                              "Dovecot as they are (chasquid does); false: leave them to "
                              "other plugins.")

    @field_validator("domains")
    @classmethod
    def _canonical_domains(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            try:
                out.append(normalize_domain(domain))
            except AddressError as exc:
                raise ValueError(f"{domain!r} is not a domain: {exc}") from exc
        return out


class DovecotAuthPlugin:
    """The hook glue around :class:`DovecotAuth`: which logins and recipients are Dovecot's."""

    Settings = DovecotAuthSettings

    def __init__(self, ctx: PluginContext[DovecotAuthSettings]) -> None:
        self.ctx = ctx
        settings = ctx.settings
        self.dovecot = DovecotAuth(settings.userdb_path, settings.client_path,
                                   settings.timeout, log=ctx.log)
        self.domains = frozenset(settings.domains)
        self._users_files: dict[str, FileStamp] = {}
        ctx.server.users.add_source(self)  # aliases and others see Dovecot's users too

    async def authenticate(self, login: str, password: str) -> bool | None:
        """The user directory's source interface: None for logins Dovecot does not serve
        or when it cannot answer."""
        target = self.login_for_dovecot(login)
        if target is None or not is_safe_username(target[0]):
            return None
        return (await self.dovecot.check_password(target[0], password)).ok

    async def exists(self, address: str) -> bool | None:
        user, domain = split_address(address)
        canonical = self.ctx.server.domains.canonical(domain) if domain else None
        if not user or canonical is None or not self.serves(canonical):
            return None
        wanted, _ = self.ctx.server.mailbox_of(address)
        if not is_safe_username(wanted):
            return None
        return await self.dovecot.exists(f"{wanted}@{canonical}")

    # ------------------------------------------------------------------ which users

    def serves(self, domain: str) -> bool:
        """Whether ``domain`` (canonical) is one whose users Dovecot knows."""
        if self.domains:
            return domain in self.domains
        server = self.ctx.server
        if not server.is_local_domain(domain):
            return False
        stamp = self._users_files.get(domain)
        if stamp is None:
            path: Path = server.domains.folder(domain) / "users"
            stamp = self._users_files[domain] = server.file_stamp(path)
        return not stamp.exists()

    def login_for_dovecot(self, login: str) -> tuple[str, str | None] | None:
        """``(name to send, session user)`` for a login this plugin answers, else None.

        ``user@domain`` is case-mapped and its domain made canonical, as chasquid does; the
        session user is that address. A bare login is sent as it is (case-mapped), and the
        session user is left to Dovecot's answer (None here).
        """
        user, domain = split_address(login)
        if not domain:
            if not self.ctx.settings.bare_logins or "@" in login:
                return None
            return normalize_user(login), None
        try:
            domain = normalize_domain(domain)
        except AddressError:
            return None
        if not user or not self.serves(domain):
            return None
        address = f"{normalize_user(user)}@{domain}"
        return address, address

    # ------------------------------------------------------------------ hooks

    @hookimpl
    async def tampu_startup(self, context: ServerContext) -> None:
        userdb, client = self.dovecot.userdb_socket(), self.dovecot.client_socket()
        if userdb and client:
            self.ctx.log.info("Dovecot auth: userdb socket %s, client socket %s", userdb,
                              client)
        else:
            self.ctx.log.warning(
                "Dovecot auth sockets not found (userdb: %s, client: %s); AUTH and RCPT for "
                "Dovecot's users get temporary failures until they appear",
                userdb or "none of " + ", ".join(self.dovecot.userdb_candidates),
                client or "none of " + ", ".join(self.dovecot.client_candidates))

    @hookimpl
    async def smtp_auth(self, session: Session, mechanism: str, login: str,
                        password: str) -> AuthResult | None:
        target = self.login_for_dovecot(login)
        if target is None:
            return None
        name, session_user = target
        if not is_safe_username(login) or not is_safe_username(name):
            return AuthResult(success=False, reason="login has white space or control "
                              "characters")
        answer = await self.dovecot.check_password(name, password,
                                                   remote_ip=session.peer_host)
        if answer.ok is None:
            # The core answers 454 4.7.0 for a PluginError; the client logged why.
            raise PluginError(self.ctx.name, "smtp_auth",
                              f"Dovecot auth unavailable: {answer.detail}")
        if not answer.ok:
            return AuthResult(success=False, reason=f"dovecot: {answer.detail}")
        if session_user is None:
            session_user = _session_user(answer.user or name)
        return AuthResult(success=True, user=session_user, reason="dovecot")

    @hookimpl
    async def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                           params: dict[str, str | bool]) -> Reply | None:
        user, domain = split_address(address)
        if not user or not domain:
            return None
        try:
            domain = normalize_domain(domain)
        except AddressError:
            return None
        server = self.ctx.server
        if not server.is_local_domain(domain) or not self.serves(domain):
            return None
        wanted, _ = server.mailbox_of(address)
        if not is_safe_username(wanted):
            return None
        found = await self.dovecot.exists(f"{wanted}@{domain}")
        if found is None:
            if wanted == "postmaster":
                return None  # localusers accepts postmaster (RFC 5321 4.5.1) without Dovecot
            return TEMPORARY_LOOKUP_FAILURE
        return RECIPIENT_OK if found else None


def _session_user(name: str) -> str:
    """Dovecot's ``user=`` in tampu's canonical form (a bare name stays bare)."""
    try:
        return normalize_address(name)
    except AddressError:
        return name
