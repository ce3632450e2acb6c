"""Cheap change detection for files the server re-reads when they change (users, aliases...).

``os.stat`` on every SMTP command adds up; a FileStamp stats its path at most once per
``[server] file_check_interval`` (1 s by default), so a change is seen within that time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

Stamp = tuple[int, int, int]


class FileStamp:
    """The (mtime, size, inode) of ``path``, or None when it does not exist; re-read lazily."""

    __slots__ = ("path", "interval", "_checked", "_stamp")

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._checked = float("-inf")
        self._stamp: Stamp | None = None

    def stamp(self) -> Stamp | None:
        now = time.monotonic()
        if now - self._checked >= self.interval:
            try:
                st = os.stat(self.path)
                self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                self._stamp = None
            self._checked = now
        return self._stamp

    def exists(self) -> bool:
        return self.stamp() is not None

    def refresh(self) -> None:
        """Forget the cached stamp: the next call stats again (on reload)."""
        self._checked = float("-inf")
