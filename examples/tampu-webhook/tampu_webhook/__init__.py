"""``webhook``: deliver mail for some domains by an HTTP POST of the message.

A third-party tampu delivery backend, packaged on its own: the entry point
``webhook = "tampu_webhook:WebhookBackend"`` in the group ``tampu.plugins`` makes it available,
``[plugins.webhook] enabled = true`` in conf.d loads it. Only the standard library is used
(urllib, run in a thread through ``@blocking``).

Outcome of one delivery: HTTP 2xx -> sent; 4xx -> permanent (the sender gets a DSN); 5xx,
timeouts and connection errors -> temporary (retried on tampu's schedule).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import ClassVar
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from tampu import (
    DeliveryResult,
    PluginContext,
    PluginSettings,
    QueueItem,
    Recipient,
    blocking,
    domain_of,
    hookimpl,
)

__version__ = "0.1.0"


class WebhookSettings(PluginSettings):
    url: str = Field(description="Where to POST each message (http:// or https://).")
    domains: list[str] = Field(
        default_factory=list,
        description="Recipient domains this backend delivers; others are left to other "
        "backends. Empty: it claims nothing.",
    )
    token: str = Field(default="", description="Sent as 'Authorization: Bearer <token>' when "
                       "set. Keep it out of conf.d: token = { \"$env\" = \"NAME\" }.")
    timeout: float = Field(default=30.0, gt=0, description="Seconds to wait for the answer; "
                           "a timeout is a temporary failure.")

    secret_fields: ClassVar[tuple[str, ...]] = ("token",)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("domains")
    @classmethod
    def _lower(cls, value: list[str]) -> list[str]:
        return [d.lower().rstrip(".") for d in value]


class WebhookBackend:
    """The plugin: tampu instantiates it with a PluginContext holding the validated settings."""

    Settings = WebhookSettings

    def __init__(self, ctx: PluginContext[WebhookSettings]) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.remote = urlsplit(self.settings.url).netloc
        # no proxies from the environment: the URL is what the administrator configured
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def claims(self, recipient: Recipient) -> bool:
        if recipient.route.pipe is not None or recipient.route.via:
            return False  # routes set by aliases belong to delivery_mda / delivery_smtp
        return domain_of(recipient.address) in self.settings.domains

    @hookimpl
    @blocking
    def deliver(self, item: QueueItem, recipient: Recipient,
                message: bytes) -> DeliveryResult | None:
        if not self.claims(recipient):
            return None  # not ours: the next backend is asked
        request = urllib.request.Request(self.settings.url, data=message, method="POST")
        request.add_header("Content-Type", "message/rfc822")
        request.add_header("X-Tampu-Queue-ID", item.id)
        request.add_header("X-Tampu-Mail-From", item.mail_from)
        request.add_header("X-Tampu-Rcpt-To", recipient.address)
        if self.settings.token:
            request.add_header("Authorization", f"Bearer {self.settings.token}")
        try:
            with self.opener.open(request, timeout=self.settings.timeout) as response:
                status = int(response.status)
                reason = str(response.reason)
        except urllib.error.HTTPError as exc:
            status, reason = exc.code, str(exc.reason)
            exc.close()
        except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout, TLS
            why = getattr(exc, "reason", exc)
            return DeliveryResult.temporary(f"webhook unreachable: {why}", remote=self.remote)
        return result_for(status, reason, self.remote)


def result_for(status: int, reason: str, remote: str) -> DeliveryResult:
    """Map an HTTP status to a delivery result: 2xx sent, 4xx permanent, else temporary."""
    text = f"webhook answered HTTP {status} {reason}".rstrip()
    if 200 <= status < 300:
        return DeliveryResult.sent(text, remote=remote)
    if 400 <= status < 500:
        return DeliveryResult.permanent(text, remote=remote)
    return DeliveryResult.temporary(text, remote=remote)
