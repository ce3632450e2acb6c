"""``localusers``: a recipient in a local domain is accepted only if the user exists.

Users are those of ``domains/<domain>/users`` (compared after dropping the address suffix and
the drop characters, case-insensitively). ``postmaster`` is always accepted (RFC 5321 4.5.1).
Other plugins (aliases) may accept more recipients through the same hook; when nobody accepts,
the core answers ``550 5.1.1``.
"""

from __future__ import annotations

from pydantic import Field

from tampu import Envelope, PluginContext, PluginSettings, Reply, Session, hookimpl
from tampu.plugins.auth.userdb import UserDirectory
from tampu.reply import RECIPIENT_OK


class LocalUsersSettings(PluginSettings):
    accept_postmaster: bool = Field(default=True, description="Accept postmaster@ every local "
                                    "domain, as RFC 5321 requires.")


class LocalUsersPlugin:
    Settings = LocalUsersSettings

    def __init__(self, ctx: PluginContext[LocalUsersSettings]) -> None:
        self.ctx = ctx
        self.users = UserDirectory(ctx.server.config.domains_dir,
                                   ctx.server.config.server.file_check_interval)

    def exists(self, address: str) -> bool:
        user, _, domain = address.rpartition("@")
        server = self.ctx.server
        if not server.is_local_domain(domain):
            return False
        wanted = server.normalize_user(user)
        if self.ctx.settings.accept_postmaster and wanted == "postmaster":
            return True
        users = self.users.db(domain).users()
        return wanted in users or any(server.normalize_user(u) == wanted for u in users)

    @hookimpl
    def smtp_rcpt_to(self, session: Session, envelope: Envelope, address: str,
                     params: dict[str, str | bool]) -> Reply | None:
        if self.exists(address):
            return RECIPIENT_OK
        return None
