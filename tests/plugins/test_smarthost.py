"""Smarthost: all (or one domain's) outgoing mail through a relay with TLS and AUTH.

Real relays: aiosmtpd servers on 127.0.0.x requiring AUTH over TLS (STARTTLS or implicit, a
trustme certificate), a real DNS server, tampu delivering through them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import SecretStr

from tampu import ConfigError
from tampu.plugins.delivery_smtp.smarthost import Relay, Smarthosts, SmarthostSettings
from tampu.testing import wait_for
from tests.plugins.delivery_kit import Recorder
from tests.plugins.outbound_kit import AuthRelay, start_dns
from tests.plugins.remote_kit import (
    Sink,
    SinkController,
    free_port,
    remote_conf,
    server_tls,
    submit,
    write_ca,
)

PASSWORD = "s3cret-Relay-pw!"
ZONE = {
    "relay.test": {"A": ["127.0.0.5"]},
    "partner-relay.test": {"A": ["127.0.0.6"]},
    "remote.test": {"MX": ["10 mx1.remote.test."]},  # nothing listens: only the relay works
    "mx1.remote.test": {"A": ["127.0.0.2"]},
}


@pytest.fixture
def dns():
    server = start_dns(ZONE)
    yield server
    server.stop()


@pytest.fixture
def port():
    return free_port("127.0.0.5", ("127.0.0.6",))


@pytest.fixture
def start(tampu_server, tampu_ca, dns, tmp_path):
    """``start(smarthost_toml)`` → (server, recorder), with the test CA trusted."""
    ca_file = write_ca(tampu_ca, tmp_path / "ca.pem")

    def run(extra: str):
        recorder = Recorder()
        conf = remote_conf(dns.port, 2525, ca_file=ca_file, smtp_extra=extra)
        return tampu_server(plugins=[recorder], **conf), recorder

    return run


def smarthost(port: int, *, tls: str = "starttls", host: str = "relay.test",
              username: str = "me", password: str = '{ "$env" = "RELAY_PW" }',
              table: str = "smarthost") -> str:
    return f"""
[plugins.delivery_smtp.{table}]
host = "{host}:{port}"
tls = "{tls}"
username = "{username}"
password = {password}
"""


def test_starttls_relay_with_auth_gets_the_mail(start, port, tampu_ca, monkeypatch):
    monkeypatch.setenv("RELAY_PW", PASSWORD)
    with AuthRelay("127.0.0.5", port, server_tls(tampu_ca, "relay.test"),
                   users={"me": PASSWORD}) as relay:
        srv, rec = start(smarthost(port))
        submit(srv, ["bob@remote.test", "carol@elsewhere.test"])
        got = wait_for(lambda: relay.sink.received, what="both recipients through the relay")
    # one transaction (two RCPT TO) for both domains: they leave by the same relay
    assert len(got) == 1 and sorted(got[0].rcpt_tos) == ["bob@remote.test",
                                                         "carol@elsewhere.test"]
    assert all(r.tls for r in got)
    assert relay.logins == [("me", True)]
    result = rec.first("bob@remote.test")
    assert result.status == "sent"
    assert result.remote == "relay.test [127.0.0.5]"


def test_implicit_tls_relay_with_a_password_file(start, port, tampu_ca, tmp_path):
    secret = tmp_path / "relay-password"
    secret.write_text(PASSWORD + "\n")
    with AuthRelay("127.0.0.5", port, server_tls(tampu_ca, "relay.test"), implicit=True,
                   users={"me": PASSWORD}) as relay:
        srv, rec = start(smarthost(port, tls="implicit",
                                   password=f'{{ "$file" = "{secret}" }}'))
        submit(srv, ["dave@remote.test"])
        got = wait_for(lambda: relay.sink.received, what="delivery over implicit TLS")
    assert got[0].rcpt_tos == ["dave@remote.test"]  # that listener speaks only TLS
    assert relay.logins == [("me", True)]
    assert rec.first("dave@remote.test").status == "sent"


def test_wrong_credentials_are_a_temporary_failure_and_never_logged(start, port, tampu_ca,
                                                                    monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RELAY_PW", PASSWORD)
    with AuthRelay("127.0.0.5", port, server_tls(tampu_ca, "relay.test"),
                   users={"me": "another password"}) as relay:
        srv, rec = start(smarthost(port))
        submit(srv, ["erin@remote.test"])
        result = rec.first("erin@remote.test")
        assert result.status == "temporary"
        assert result.enhanced == "4.7.0"
        assert result.text == (f"smarthost relay.test:{port} refused the credentials of me: "
                               "535 5.7.8 Authentication credentials invalid")
        assert relay.logins == [("me", False)]
        assert relay.sink.received == []
        qid = wait_for(lambda: srv.queue_items(), what="the message kept in the queue")[0]
        assert srv.store.load_now(qid).recipients[0].last_error == result.text
        plugin = srv.server.registry.plugins["delivery_smtp"].obj
        settings_repr = repr(plugin.ctx.settings)
        relay_repr = repr(plugin.outbound.smarthosts.default)
        srv.stop()
    assert "RELAY_PW" in settings_repr  # the reference, not the value
    assert PASSWORD not in settings_repr and PASSWORD not in relay_repr
    leaked = [r.name for r in caplog.records
              if PASSWORD in r.getMessage() or PASSWORD in (r.exc_text or "")]
    assert leaked == []
    assert any("refused the credentials of me" in r.getMessage() for r in caplog.records)
    for path in Path(srv.server.config.data_dir).rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("tls, failure", [("starttls", "TLS with relay.test failed:"),
                                          ("implicit", "cannot connect:")])
def test_relay_certificate_must_be_valid_and_no_credentials_go_otherwise(
        start, port, tampu_ca, monkeypatch, tls, failure):
    monkeypatch.setenv("RELAY_PW", PASSWORD)
    with AuthRelay("127.0.0.5", port, server_tls(tampu_ca, "not-the-relay.test"),
                   implicit=tls == "implicit", users={"me": PASSWORD}) as relay:
        srv, rec = start(smarthost(port, tls=tls))
        submit(srv, ["fay@remote.test"])
        result = rec.first("fay@remote.test")
    assert result.status == "temporary"
    assert result.text.startswith(f"smarthost relay.test:{port} ({tls}) requires TLS with a "
                                  f"certificate valid for relay.test: {failure}")
    assert "certificate verify failed" in result.text
    assert relay.logins == []  # AUTH never reached an unverified server
    assert relay.sink.received == []


class _NoAuthSink(Sink):
    """A relay that does not offer AUTH (aiosmtpd offers it unless the EHLO hook drops it)."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [r for r in responses if "AUTH" not in r.upper()]


def test_relay_without_auth_is_refused_when_credentials_are_set(start, port, tampu_ca,
                                                                monkeypatch):
    monkeypatch.setenv("RELAY_PW", PASSWORD)
    sink = _NoAuthSink()
    ctl = SinkController(sink, hostname="127.0.0.5", port=port, ready_timeout=5,
                     tls_context=server_tls(tampu_ca, "relay.test"))
    ctl.start()
    try:
        srv, rec = start(smarthost(port))
        submit(srv, ["gus@remote.test"])
        result = rec.first("gus@remote.test")
    finally:
        ctl.stop()
    assert result.text == (f"smarthost relay.test:{port} does not offer AUTH, but credentials "
                           "are configured for it")
    assert sink.rcpt_seen == []


def test_per_domain_relay(start, port, tampu_ca, monkeypatch):
    monkeypatch.setenv("RELAY_PW", PASSWORD)
    monkeypatch.setenv("PARTNER_PW", "partner pw")
    with AuthRelay("127.0.0.5", port, server_tls(tampu_ca, "relay.test"),
                   users={"me": PASSWORD}) as default, \
            AuthRelay("127.0.0.6", port, server_tls(tampu_ca, "partner-relay.test"),
                      implicit=True, users={"partner": "partner pw"}) as partner:
        srv, rec = start(smarthost(port) + smarthost(
            port, tls="implicit", host="partner-relay.test", username="partner",
            password='{ "$env" = "PARTNER_PW" }',
            table='smarthost_domains."Partner.TEST"'))
        submit(srv, ["hal@partner.test", "ivy@remote.test"])
        wait_for(lambda: partner.sink.received and default.sink.received,
                 what="one message through each relay")
    assert [r.rcpt_tos for r in partner.sink.received] == [["hal@partner.test"]]
    assert [r.rcpt_tos for r in default.sink.received] == [["ivy@remote.test"]]
    assert rec.first("hal@partner.test").remote == "partner-relay.test [127.0.0.6]"


def test_plaintext_relay_on_loopback(start):
    sink = Sink()
    relay_port = free_port("127.0.0.1", ())
    ctl = SinkController(sink, hostname="127.0.0.1", port=relay_port, ready_timeout=5)
    ctl.start()
    try:
        srv, rec = start(f"""
[plugins.delivery_smtp.smarthost]
host = "127.0.0.1:{relay_port}"
tls = "none"
""")
        submit(srv, ["jo@remote.test"])
        got = wait_for(lambda: sink.received, what="delivery to the local relay")
    finally:
        ctl.stop()
    assert got[0].rcpt_tos == ["jo@remote.test"]
    assert rec.first("jo@remote.test").remote == "127.0.0.1"


def test_relay_choice_by_domain():
    a, b = Relay("a.test", 587, "starttls"), Relay("b.test", 465, "implicit")
    relays = Smarthosts(a, {"Café.example": b})
    assert relays.pick("xn--caf-dma.example") is b
    assert relays.pick("CAFÉ.example.") is b
    assert relays.pick("sub.café.example") is a  # exact domains only
    assert Smarthosts(None, {"b.example": b}).pick("other.example") is None
    assert "password" not in repr(Relay("a.test", 587, "starttls", "me", SecretStr("pw")))


@pytest.mark.parametrize("values, problem", [
    ({"host": "relay.test", "tls": "none"}, "only allowed for a relay on a loopback address"),
    ({"host": "relay.test", "username": "me"}, "needs a password"),
    ({"host": "relay.test", "password": "x"}, "needs a username"),
    ({"host": "relay.test:http"}, "bad port"),
    ({"host": "relay.test", "tls": "ssl"}, "Input should be"),
    ({"host": "relay.test", "username": "me", "password": {"$env": "A", "$file": "b"}},
     "a secret is a string"),
])
def test_settings_are_checked(values, problem):
    with pytest.raises(ValueError, match=problem):
        SmarthostSettings.model_validate(values)
    assert SmarthostSettings.model_validate({"host": "[::1]", "tls": "none"}).tls == "none"
    assert SmarthostSettings.model_validate({"host": "localhost:2525", "tls": "none"})


def test_missing_secret_stops_the_start(start, port):
    with pytest.raises(ConfigError, match="smarthost.password: environment variable "
                                          "TAMPU_NOT_SET_PW is not set"):
        start(smarthost(port, password='{ "$env" = "TAMPU_NOT_SET_PW" }'))
