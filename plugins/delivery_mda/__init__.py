"""``delivery_mda``: local delivery by running a mail delivery agent, as chasquid does.

Two kinds of recipients are claimed:

* **pipe recipients** (``route.pipe``, set by the aliases plugin), in any
  domain: the command runs as ``/bin/sh -c command``;
* **mailbox recipients** in a local domain (limited to ``domains`` when set) without a ``via``
  route: ``command`` runs with ``args``, where ``%from%``, ``%to_user%`` and the other
  chasquid placeholders are replaced (each substituted argument stays one argv item; no shell).

Either way the message is on stdin (LF line endings) and the environment has ``SENDER``,
``RECIPIENT``, ``ORIGINAL_RECIPIENT``, ``LOCAL``, ``DOMAIN`` and ``QUEUE_ID``. Exit status 0
means delivered, 75 (EX_TEMPFAIL) or death by a signal a temporary failure, any other status a
permanent one quoting the start of the program's output. A program that outlives ``timeout`` is
killed (with its children) and the delivery retried.
"""

from __future__ import annotations

import os
import re
import shutil

from pydantic import Field, field_validator

from tampu import (
    DeliveryResult,
    PluginContext,
    PluginSettings,
    QueueItem,
    Recipient,
    hookimpl,
    split_address,
)
from tampu.placeholders import check_placeholders, expand_placeholders
from tampu.plugins.delivery_mda.run import base_environment, result_of, run_program

PLACEHOLDERS = frozenset({"user", "domain", "from", "from_user", "from_domain", "to",
                          "to_user", "to_domain"})
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f/;\"'\\|*&$%()\[\]{}`!]")
"""Characters removed from substituted values, as chasquid does (defence in depth)."""

SHELL = "/bin/sh"
TIMEOUT_SHARE = 0.9
"""Part of ``[server] delivery_timeout`` a program may use, so that tampu kills it, not the core."""


class MdaSettings(PluginSettings):
    command: str = Field(default="maildrop", description="The MDA program (path, or name "
                         "looked up in PATH), like chasquid's mail_delivery_agent_bin.")
    args: list[str] = Field(
        default_factory=lambda: ["-f", "%from%", "-d", "%to_user%"],
        description="Its arguments, one per item, like chasquid's mail_delivery_agent_args. "
        "Placeholders: %from% %from_user% %from_domain% %to% %to_user% %to_domain% %user% "
        "%domain%.",
    )
    timeout: float = Field(default=60.0, gt=0, description="Seconds a delivery may take "
                           "before the program is killed and the delivery retried (at most "
                           "90% of [server] delivery_timeout).")
    domains: list[str] = Field(
        default_factory=list,
        description="Deliver mailboxes only for these local domains; empty: every local "
        "domain. Pipe recipients are run whatever their domain.",
    )

    @field_validator("args")
    @classmethod
    def _check_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            check_placeholders(arg, PLACEHOLDERS)
        return value

    @field_validator("domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [d.lower() for d in value]


def sanitize(value: str) -> str:
    return _UNSAFE.sub("", value)


def substitutions(mail_from: str, to_user: str, to_domain: str) -> dict[str, str]:
    """chasquid's replacements; ``to_user`` is already normalised (no +tag, lower case)."""
    from_user, from_domain = split_address(mail_from) if mail_from else ("", "")
    to = f"{to_user}@{to_domain}" if to_domain else to_user
    values = {
        "from": mail_from, "from_user": from_user, "from_domain": from_domain,
        "to": to, "to_user": to_user, "to_domain": to_domain,
        "user": to_user, "domain": to_domain,
    }
    return {k: sanitize(v) for k, v in values.items()}


def build_argv(command: str, templates: list[str], values: dict[str, str]) -> list[str]:
    """The argv of one run. Raises ValueError when a value would turn into an option."""
    argv = [command]
    for template in templates:
        arg = expand_placeholders(template, values)
        if arg.startswith("-") and not template.startswith("-"):
            raise ValueError(f"refusing to pass {arg!r} as an argument: it would read as an "
                             "option")
        argv.append(arg)
    return argv


class MdaPlugin:
    Settings = MdaSettings

    def __init__(self, ctx: PluginContext[MdaSettings]) -> None:
        self.ctx = ctx
        settings = ctx.settings
        if shutil.which(settings.command) is None:
            ctx.log.warning("MDA %r not found or not executable: mailboxes this plugin claims "
                            "(none while a Maildir or LMTP backend comes first) are retried "
                            "until it is installed; pipe aliases are not affected",
                            settings.command)
        if settings.timeout > self.delivery_timeout_share():
            ctx.log.warning("timeout %gs is above %d%% of [server] delivery_timeout; using %gs",
                            settings.timeout, TIMEOUT_SHARE * 100, self.delivery_timeout_share())

    def delivery_timeout_share(self) -> float:
        return float(self.ctx.server.config.server.delivery_timeout) * TIMEOUT_SHARE

    def timeout(self) -> float:
        return min(self.ctx.settings.timeout, self.delivery_timeout_share())

    def claims_mailbox(self, recipient: Recipient) -> bool:
        """A local mailbox (pipe routes are claimed before this is asked)."""
        return self.ctx.server.is_local_mailbox(recipient, self.ctx.settings.domains)

    def environment(self, item: QueueItem, recipient: Recipient, user: str,
                    domain: str) -> dict[str, str]:
        env = base_environment()
        env.update(SENDER=item.mail_from, RECIPIENT=recipient.address,
                   ORIGINAL_RECIPIENT=recipient.original, LOCAL=user, DOMAIN=domain,
                   QUEUE_ID=item.id)
        return {k: v.replace("\0", "") for k, v in env.items()}

    @hookimpl
    def delivery_route(self, item: QueueItem, recipient: Recipient) -> str | None:
        if recipient.route.pipe is not None:
            return f"pipe: /bin/sh -c {recipient.route.pipe!r}"
        if not self.claims_mailbox(recipient):
            return None
        user, domain = self.ctx.server.mailbox_of(recipient.address)
        try:
            argv = build_argv(self.ctx.settings.command, self.ctx.settings.args,
                              substitutions(item.mail_from, user, domain))
        except ValueError as exc:
            return f"a failure: {exc}"
        return "MDA " + " ".join(argv)

    @hookimpl
    async def deliver(self, item: QueueItem, recipient: Recipient,
                      message: bytes) -> DeliveryResult | None:
        pipe = recipient.route.pipe
        if pipe is None and not self.claims_mailbox(recipient):
            return None
        user, domain = self.ctx.server.mailbox_of(recipient.address)
        env = self.environment(item, recipient, user, domain)
        data = message.replace(b"\r\n", b"\n")
        timeout = self.timeout()
        if pipe is not None:
            if not pipe.strip():
                return DeliveryResult.permanent(f"bad pipe route {pipe!r}", remote="pipe")
            argv = [SHELL, "-c", pipe]
            what, remote = "pipe command", "pipe"
        else:
            try:
                argv = build_argv(self.ctx.settings.command, self.ctx.settings.args,
                                  substitutions(item.mail_from, user, domain))
            except ValueError as exc:
                return DeliveryResult.permanent(str(exc), remote="mda")
            what, remote = f"MDA {os.path.basename(self.ctx.settings.command)}", "mda"
        outcome = await run_program(argv, data, env=env, limit=timeout,
                                    cwd=self.ctx.server.data_dir)  # made at start
        return result_of(outcome, what, remote, timeout)  # the core logs the attempt
