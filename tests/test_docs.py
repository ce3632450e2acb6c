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


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_testing_a_plugin_example_is_the_examples_test():
    """docs/hooks.md shows a third-party plugin tested in at most 10 lines, and that test is
    in examples/tampu-greylist/tests, which tests/test_examples.py runs."""
    section = _section((ROOT / "docs" / "hooks.md").read_text(), "Testing a plugin")
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(snippet.splitlines()) <= 10, snippet
    source = (ROOT / "examples" / "tampu-greylist" / "tests" / "test_greylist.py").read_text()
    imports, _, body = snippet.partition("\n\n\ndef ")
    assert body and "def " + body in source, "the doc's test differs from the example's"
    for line in imports.splitlines():
        assert line in source.splitlines(), line


def test_testing_a_plugin_documents_each_fixture_and_helper():
    import tampu.testing

    section = _section((ROOT / "docs" / "hooks.md").read_text(), "Testing a plugin")
    fixtures = ["tampu_server", "tampu_ca", "dns_server", "make_dns", "fake_mx"]
    for name in fixtures:
        assert callable(getattr(tampu.testing, name))
    helpers = ["launch", "make_config_dir", "server_toml", "runtime_for", "context_for",
               "wait_for", "VerdictRecorder", "CaptureBackend", "DNSServer", "FakeMX",
               "MXFarm", "ServerFactory", "write_ca"]
    methods = ["send", "assert_refused", "assert_accepted", "wait_record", "attempts",
               "calls_of", "wait_delivered", "defer", "fail", "crash", "spf", "mx", "dkim",
               "dmarc", "mta_sts", "tlsa", "answer", "wait_received", "publish",
               "delivery_smtp_conf"]
    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    code = " ".join(re.findall(r"`([^`]+)`", prose))
    missing = [n for n in fixtures + helpers + methods if not re.search(rf"\b{n}\b", code)]
    assert not missing, missing
    assert set(helpers) <= set(tampu.testing.__all__)


def test_backend_guide_test_is_the_webhook_examples_test():
    section = _section((ROOT / "docs" / "writing-a-delivery-backend.md").read_text(),
                       "Testing with `tampu.testing`")
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    source = (ROOT / "examples" / "tampu-webhook" / "tests" / "test_webhook.py").read_text()
    assert snippet in source
