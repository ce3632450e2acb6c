"""tampu: a small, secure, plugin-driven mail server.

The public API for plugin authors::

    from tampu import hookimpl, blocking, Reply, Session, Envelope, StashKey, PluginSettings
"""

from tampu._markers import blocking, dry_run_unsafe, hookimpl, hookspec
from tampu.addresses import domain_of, split_address
from tampu.authres import MethodResult, add_result, results
from tampu.config import PluginSettings, ServerSettings
from tampu.context import PluginContext, ServerContext
from tampu.envelope import (
    AuthResult,
    Envelope,
    ListenerInfo,
    Message,
    Session,
    Stash,
    StashKey,
    TlsInfo,
    Verdict,
)
from tampu.errors import ConfigError, PluginError, StateError, TampuError
from tampu.item import DeliveryResult, QueueItem, Recipient, RecipientStatus, Route
from tampu.reply import Reply
from tampu.state_store import StateStore

__version__ = "0.2.0"

__all__ = [
    "AuthResult",
    "ConfigError",
    "DeliveryResult",
    "Envelope",
    "ListenerInfo",
    "Message",
    "MethodResult",
    "PluginContext",
    "PluginError",
    "PluginSettings",
    "QueueItem",
    "Recipient",
    "RecipientStatus",
    "Reply",
    "Route",
    "ServerContext",
    "ServerSettings",
    "Session",
    "Stash",
    "StashKey",
    "StateError",
    "StateStore",
    "TampuError",
    "TlsInfo",
    "Verdict",
    "__version__",
    "add_result",
    "blocking",
    "domain_of",
    "dry_run_unsafe",
    "hookimpl",
    "hookspec",
    "results",
    "split_address",
]
