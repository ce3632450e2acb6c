"""Tests of the greylist plugin with tampu's test kit: ``pip install 'tampu[testing]' .`` then
``pytest`` (the ``tampu_server`` fixture comes with tampu; nothing to import for it)."""

from __future__ import annotations

import time

import pytest
from tampu_greylist import Greylist

from tampu import ConfigError
from tampu.testing import ServerFactory

USER = "bob@example.test"


# docs/hooks.md ("Testing a plugin") shows this test as it is here
def test_greylist_defers_a_first_attempt(tampu_server: ServerFactory) -> None:
    srv = tampu_server(plugins=[Greylist], users={"bob@example.test": "pw"}, record=True)
    srv.send("alice@example.org", ["bob@example.test"]).assert_refused(451, stage="rcpt")
    srv.verdicts.assert_refused("rcpt", "bob@example.test", plugin="greylist")


def test_a_retry_after_the_delay_is_accepted(tampu_server: ServerFactory) -> None:
    srv = tampu_server(plugins=[Greylist], users={USER: "pw"}, record=True,
                       conf={"25-greylist.toml": "[plugins.greylist]\ndelay = 0.5\n"})
    srv.send("alice@example.org", [USER]).assert_refused(451, stage="rcpt")  # first time
    srv.send("alice@example.org", [USER]).assert_refused(451, stage="rcpt")  # too soon
    time.sleep(0.6)
    srv.send("alice@example.org", [USER]).assert_accepted()  # a retry after the delay
    assert srv.verdicts.last("rcpt", USER).plugin == "localusers"  # greylist let it pass
    srv.send("alice@example.org", ["nobody@example.test"]).assert_refused(451)  # new triplet
    assert len(srv.verdicts.calls_of("smtp_rcpt_to", "greylist")) == 4


def test_authenticated_users_are_not_greylisted(tampu_server: ServerFactory) -> None:
    srv = tampu_server(plugins=[Greylist], users={USER: "pw"}, record=True)
    srv.send(USER, ["x@remote.example"], login=(USER, "pw")).assert_accepted()
    assert srv.verdicts.last("rcpt").plugin == "relay"  # accepted it for an authenticated user


def test_settings_are_validated(tampu_server: ServerFactory) -> None:
    with pytest.raises(ConfigError, match="delay"):
        tampu_server(plugins=[Greylist],
                     conf={"25-greylist.toml": "[plugins.greylist]\ndelay = -1\n"})
