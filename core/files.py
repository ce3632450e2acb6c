"""Cheap change detection for files the server re-reads when they change (users, aliases...).

``os.stat`` on every SMTP command adds up; a FileStamp stats its path at most once per
``[server] file_check_interval`` (1 s by default), so a change is seen within that time.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"

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


def write_durably(path: Path, chunks: list[bytes], fsync: bool = True, *, mode: int = 0o600,
                  keep_attributes: bool = False) -> None:
    """Write ``chunks`` to ``path`` so that a crash leaves the old file or the whole new one:
    a temporary file, fsync, rename over ``path``, fsync of the directory.

    ``keep_attributes``: a file that exists keeps its mode, owner and group (files an
    administrator manages, such as users files, stay readable by whom they were).
    On any failure the temporary file is removed.
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    old: os.stat_result | None = None
    if keep_attributes:
        try:
            old = os.stat(path)
        except FileNotFoundError:
            pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        try:
            if old is not None:
                os.fchmod(fd, old.st_mode & 0o7777)
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(fd, old.st_uid, old.st_gid)
                    except PermissionError:
                        pass  # not root: the file becomes ours, with its old mode
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


UNIX_PATH_MAX = 107
"""Bytes of a UNIX socket path the kernel takes (sun_path is 108 with the NUL)."""


@contextlib.contextmanager
def unix_socket_path(path: Path) -> Iterator[str]:
    """A name for the UNIX socket ``path`` that bind() and connect() accept: the path itself,
    or, when it is too long, the same file through ``/proc/self/fd`` of its directory."""
    if len(os.fsencode(path)) <= UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
