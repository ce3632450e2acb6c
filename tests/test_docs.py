"""The hook catalogue documents itself: every hookspec follows the docstring template."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from tampu import hookspecs

ROOT = Path(__file__).resolve().parent.parent

SECTIONS = ("**Fires:**", "**Result:**", "**Async:**", "**Since:**")


def test_catalogue_is_complete():
    assert hookspecs.HOOK_NAMES
    for name in ("smtp_rcpt_to", "smtp_data", "deliver", "queue_enqueued", "tampu_startup"):
        assert name in hookspecs.HOOK_NAMES
    doc = hookspecs.__doc__ or ""
    for name in hookspecs.HOOK_NAMES:  # the firing orders name every hook of a stage
        if name.startswith(("smtp_", "queue_")) or name in ("deliver", "make_dsn"):
            assert name in doc, name


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


def _plugin_settings():
    from tampu.registry import available_entry_points, settings_class

    for name, ep in sorted(available_entry_points().items()):
        if ep.dist is not None and ep.dist.metadata["Name"] == "tampu":
            yield name, settings_class(ep.load())


def test_every_setting_is_documented():
    """Every [server], listener and built-in plugin setting is named in docs/ (as `key`)."""
    from tampu.config import ListenerSettings, PluginSettings, ServerSettings

    docs = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    missing = [f"server.{f}" for f in ServerSettings.model_fields if f"`{f}`" not in docs]
    missing += [f"listener.{f}" for f in ListenerSettings.model_fields if f"`{f}`" not in docs]
    for name, cls in _plugin_settings():
        missing += [f"plugins.{name}.{f}" for f in cls.model_fields
                    if f not in PluginSettings.model_fields and f"`{f}`" not in docs]
    assert not missing, f"settings missing from docs/: {missing}"


def test_every_setting_has_a_description():
    from tampu.config import ListenerSettings, ServerSettings

    models = [("server", ServerSettings), ("listener", ListenerSettings), *_plugin_settings()]
    lacking = [f"{name}.{f}" for name, cls in models for f, info in cls.model_fields.items()
               if not info.description]
    assert not lacking, f"settings without description=: {lacking}"
