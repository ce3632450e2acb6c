"""Every error tampu raises on purpose descends from TampuError."""

from __future__ import annotations


class TampuError(Exception):
    """Base of tampu's own errors."""


class ConfigError(TampuError):
    """The configuration is wrong. The message names the file, the key and the problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(TampuError):
    """A plugin raised or timed out while a hook ran; the core answers 4xx (fail closed)."""

    def __init__(self, plugin: str, hook: str, reason: str) -> None:
        self.plugin = plugin
        self.hook = hook
        self.reason = reason
        super().__init__(f"plugin {plugin!r} failed in {hook}: {reason}")


class QueueError(TampuError):
    """A queue item could not be written or read."""


class QueueFull(QueueError):
    """The queue holds as many items as it may (``[server] max_queue_items``)."""


class StateError(TampuError):
    """The state store (``context.state``) could not be read or written."""
