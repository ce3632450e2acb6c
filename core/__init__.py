"""tampu: a small, secure, plugin-driven mail server.

The public API for plugin authors::

    from tampu import hookimpl, blocking, Reply, Session, Envelope, StashKey, PluginSettings
"""

from tampu._markers import blocking, hookimpl, hookspec
from tampu.config import PluginSettings, ServerSettings
from tampu.context import PluginContext, ServerContext, domain_of, split_address
from tampu.envelope import (
    AuthResult,
    Envelope,
    ListenerInfo,
    Message,
    Session,
    Stash,
    StashKey,
    TlsInfo,
)
from tampu.errors import ConfigError, PluginError, TampuError
from tampu.item import DeliveryResult, QueueItem, Recipient, RecipientStatus
from tampu.reply import Reply

__version__ = "0.1.0"

__all__ = [
    "AuthResult",
    "ConfigError",
    "DeliveryResult",
    "Envelope",
    "ListenerInfo",
    "Message",
    "PluginContext",
    "PluginError",
    "PluginSettings",
    "QueueItem",
    "Recipient",
    "RecipientStatus",
    "Reply",
    "ServerContext",
    "ServerSettings",
    "Session",
    "Stash",
    "StashKey",
    "TampuError",
    "TlsInfo",
    "__version__",
    "blocking",
    "domain_of",
    "hookimpl",
    "hookspec",
    "split_address",
]
