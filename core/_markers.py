"""The pluggy markers, in a module that imports nothing of tampu (so no import cycles)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import pluggy

PROJECT = "tampu"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

F = TypeVar("F", bound=Callable[..., Any])

_BLOCKING_ATTR = "_tampu_blocking"


def blocking(func: F) -> F:
    """Mark a synchronous hook implementation that blocks (file or network I/O).

    The caller runs it in a worker thread so that it never stalls the event loop.
    Put it *below* ``@hookimpl``::

        @hookimpl
        @blocking
        def smtp_mail_from(self, session, envelope, address, params): ...
    """
    setattr(func, _BLOCKING_ATTR, True)
    return func


def is_blocking(func: Callable[..., Any]) -> bool:
    return bool(getattr(func, _BLOCKING_ATTR, False))


_UNSAFE_ATTR = "_tampu_dry_run_unsafe"


def dry_run_unsafe(func: F) -> F:
    """Mark a hook implementation that changes something outside the server's memory (runs a
    program, writes a file, sends a request): ``tampu try`` skips it and says so. Put it
    *below* ``@hookimpl``."""
    setattr(func, _UNSAFE_ATTR, True)
    return func


def is_dry_run_unsafe(func: Callable[..., Any]) -> bool:
    return bool(getattr(func, _UNSAFE_ATTR, False))
