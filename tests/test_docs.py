"""The hook catalogue documents itself: every hookspec follows the docstring template."""

from __future__ import annotations

import inspect
import re

import pytest

from tampu import hookspecs

SECTIONS = ("**Fires:**", "**Result:**", "**Async:**", "**Since:**")


def test_catalogue_is_complete():
    assert hookspecs.HOOK_NAMES
    for name in ("smtp_rcpt_to", "smtp_data", "deliver", "queue_enqueued", "tampu_startup"):
        assert name in hookspecs.HOOK_NAMES
    assert hookspecs.__doc__ and "smtp_connect -> smtp_helo" in hookspecs.__doc__


@pytest.mark.parametrize("name", hookspecs.HOOK_NAMES)
def test_hookspec_docstring(name):
    func = getattr(hookspecs, name)
    doc = inspect.getdoc(func)
    assert doc, f"{name} has no docstring"
    positions = [doc.find(section) for section in SECTIONS]
    missing = [s for s, pos in zip(SECTIONS, positions, strict=True) if pos < 0]
    assert not missing, f"{name}: missing {missing}"
    assert positions == sorted(positions), f"{name}: sections out of order"
    for section in SECTIONS:  # each section says something
        after = doc.split(section, 1)[1].strip()
        assert after and not after.startswith("**"), f"{name}: empty {section}"
    assert re.search(r"\*\*Since:\*\* \d+\.\d+", doc), f"{name}: Since needs a version"
    params = list(inspect.signature(func).parameters)
    documented = re.findall(r"^:param (\w+):", doc, re.M)
    assert documented == params, f"{name}: :param: lines {documented} != arguments {params}"
    if name in hookspecs.VERDICT_HOOKS:
        result = doc.split("**Result:**", 1)[1]
        assert "verdict" in result.split("\n\n")[0].lower(), f"{name}: say it is a verdict hook"
