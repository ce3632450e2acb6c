"""``%name%`` placeholders in configuration templates (chasquid's style: ``%user%``, ``%to%``).

For plugins: validate a template against the names they fill in, and expand it in one pass.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

PLACEHOLDER = re.compile(r"%([a-z_]+)%")


def check_placeholders(template: str, known: Iterable[str]) -> str:
    """``template`` if every ``%name%`` in it is ``known``; else ValueError naming them."""
    allowed = set(known)
    unknown = set(PLACEHOLDER.findall(template)) - allowed
    if unknown:
        raise ValueError(f"unknown placeholder(s) {', '.join(sorted(unknown))} in "
                         f"{template!r}; known: " + " ".join(f"%{p}%" for p in sorted(allowed)))
    return template


def expand_placeholders(template: str, values: Mapping[str, str]) -> str:
    """Replace each ``%name%`` by its value in one pass (values are never re-expanded);
    unknown names stay as they are."""
    return PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)
