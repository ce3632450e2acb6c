"""Sender rewriting for forwards (chasquid's ``+fwd_from=``), bounded, with a way back.

When mail from a remote sender is forwarded to a remote address, the envelope sender becomes
``alias+fwd_from=user=domain=TAG@alias-domain`` so that SPF passes at the destination:

* it is always made from the **original** sender: a sender that is already a rewritten
  address (ours or another tampu's, or chasquid's ``+fwd_from=user=domain``) is unwrapped
  first, so forwarding loops never nest it;
* a result whose local part would pass 64 octets (RFC 5321 4.5.3.1.1) is not used: the
  message keeps its original sender;
* ``TAG`` is a keyed hash with a day stamp (like SRS), so that a bounce coming back to the
  rewritten address (null sender) can be delivered to the original sender — and only for
  addresses this server made in the last :data:`VALID_DAYS` days (no backscatter relay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Final

MARK: Final = "fwd_from="
VALID_DAYS: Final = 21
_DAY = 86400


def load_key(path: Path) -> bytes:
    """The server's rewriting key, made (0600, atomically) on first use."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
    return key


def _tag(key: bytes, sender: str, day: int) -> str:
    stamp = base64.b32encode((day % 1024).to_bytes(2, "big")).decode()[:2].lower()
    mac = hmac.new(key, f"{day % 1024}:{sender.lower()}".encode(), hashlib.sha256).digest()
    return stamp + base64.b32encode(mac).decode()[:4].lower()


def original_sender(sender: str) -> str:
    """The sender a rewritten address stands for (``sender`` itself if it is not one)."""
    local, at, _ = sender.rpartition("@")
    mark = local.find(MARK)
    if not at or mark < 0:
        return sender
    parts = local[mark + len(MARK):].split("=")
    if len(parts) >= 3 and len(parts[-1]) == 6 and "." not in parts[-1]:
        parts = parts[:-1]  # tampu's form carries a tag
    if len(parts) < 2 or not parts[-1] or not all(parts[:-1]):
        return sender
    return f"{'='.join(parts[:-1])}@{parts[-1]}"


def rewrite(sender: str, alias: str, separator: str, key: bytes,
            now: float | None = None) -> str | None:
    """The rewritten sender for forwarding mail from ``sender`` to ``alias``'s target, or
    None when it would be too long (keep the original sender then)."""
    sender = original_sender(sender)
    user, _, domain = alias.rpartition("@")
    mark = user.find(separator + MARK) if separator else -1
    if mark >= 0:
        user = user[:mark]  # the alias itself was reached through a rewritten address
    s_user, _, s_domain = sender.rpartition("@")
    day = int((time.time() if now is None else now) // _DAY)
    local = f"{user}{separator}{MARK}{s_user}={s_domain}={_tag(key, sender, day)}"
    if len(local.encode("utf-8")) > 64:
        return None
    return f"{local}@{domain}"


def bounce_target(recipient: str, separator: str, key: bytes,
                  now: float | None = None) -> str | None:
    """For a bounce (null sender) to an address this server rewrote: the original sender.
    None when ``recipient`` is not such an address, or its tag is wrong or too old."""
    local, at, _ = recipient.rpartition("@")
    mark = local.find(separator + MARK) if separator else -1
    if not at or mark < 0:
        return None
    parts = local[mark + len(separator) + len(MARK):].split("=")
    if len(parts) < 3:
        return None
    tag = parts[-1].lower()
    sender = f"{'='.join(parts[:-2])}@{parts[-2]}"
    today = int((time.time() if now is None else now) // _DAY)
    for day in range(today, today - VALID_DAYS, -1):
        if hmac.compare_digest(_tag(key, sender, day), tag):
            return sender
    return None
