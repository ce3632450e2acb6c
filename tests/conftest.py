"""Shared fixtures. ``tampu_server``, ``tampu_ca``, ``dns_server``, ``make_dns`` and
``fake_mx`` come from the test kit, ``tampu.testing`` (a pytest11 plugin)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The path of an external tool; skip if missing (fail under TAMPU_REQUIRE_TOOLS=1)."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}")
                                  else None)
    if path is None:
        msg = f"{name} is not installed (apt-get install it; see README)"
        if os.environ.get("TAMPU_REQUIRE_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path
