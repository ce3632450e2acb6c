"""The example plugins of the documentation work (examples/, used as docs/hooks.md shows)."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

from tampu import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def load_example(package: str, folder: str):
    path = ROOT / "examples" / folder / package / "__init__.py"
    spec = importlib.util.spec_from_file_location(package, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def greylist():
    yield load_example("tampu_greylist", "tampu-greylist")
    sys.modules.pop("tampu_greylist", None)


def rcpt(srv, address: str) -> int:
    with srv.smtp() as client:
        client.ehlo()
        client.mail("sender@example.org")
        code, _ = client.rcpt(address)
        return code


def test_greylist_example_refuses_first_then_accepts(tampu_server, greylist):
    srv = tampu_server(users={"user@example.test": "pw"}, plugins=[greylist.Greylist],
                       conf={"25-greylist.toml": "[plugins.greylist]\ndelay = 0.5\n"})
    assert rcpt(srv, "user@example.test") == 451  # first time: greylisted
    assert rcpt(srv, "user@example.test") == 451  # too soon
    time.sleep(0.6)
    assert rcpt(srv, "user@example.test") == 250  # a retry after the delay passes
    assert rcpt(srv, "nobody@example.test") == 451  # another triplet: greylisted again
    info = srv.server.registry.plugins["greylist"]
    assert info.priority == 10 and info.hooks == ["smtp_rcpt_to"]


def test_greylist_example_spares_authenticated_users(tampu_server, greylist):
    srv = tampu_server(users={"user@example.test": "pw"}, plugins=[greylist.Greylist])
    with srv.smtp("submission") as client:
        client.ehlo()
        client.starttls(context=srv.client_tls())
        client.ehlo()
        client.login("user@example.test", "pw")
        refused = client.sendmail("user@example.test", ["x@remote.example"], b"Subject: x\r\n\r\n")
        assert refused == {}


def test_greylist_example_settings_are_validated(tampu_server, greylist):
    with pytest.raises(ConfigError, match="delay"):
        tampu_server(plugins=[greylist.Greylist],
                     conf={"25-greylist.toml": "[plugins.greylist]\ndelay = -1\n"})
