"""delivery_smtp: real tampu, real DNS server, real receiving SMTP servers on 127.0.0.x."""

from __future__ import annotations

import socket

import pytest

from tampu import Envelope, QueueItem, Recipient, Route, hookimpl
from tampu.testing import server_toml, wait_for
from tests.plugins.delivery_kit import Recorder
from tests.plugins.remote_kit import MXFarm, Sink, free_port, remote_conf, submit

ZONE = {
    "remote.test": {"MX": ["10 mx1.remote.test.", "20 mx2.remote.test."]},
    "mx1.remote.test": {"A": ["127.0.0.2"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "backup.test": {"MX": ["10 down.backup.test.", "20 mx2.remote.test."]},
    "down.backup.test": {"A": ["127.0.0.4"]},  # nothing listens there
    "amx.test": {"A": ["127.0.0.2"]},  # no MX: the domain's own address
    "nullmx.test": {"MX": ["0 ."]},
    "relay.test": {"A": ["127.0.0.3"]},
}


@pytest.fixture
def farm():
    farm = MXFarm(free_port())
    yield farm
    farm.stop_all()


@pytest.fixture
def remote(tampu_server, make_dns, farm):
    """Start tampu (delivering) against the zone and the farm; returns (server, recorder)."""
    dns = make_dns(ZONE)

    def start(plugins=(), **kw):
        recorder = Recorder()
        srv = tampu_server(plugins=[recorder, *plugins], **remote_conf(dns.port, farm.port, **kw))
        return srv, recorder

    return start


def test_delivers_to_the_preferred_mx(remote, farm):
    mx1, mx2 = farm.start("127.0.0.2"), farm.start("127.0.0.3")
    srv, rec = remote()
    submit(srv, ["bob@remote.test"])
    got = wait_for(lambda: mx1.received, what="delivery to mx1")
    assert got[0].rcpt_tos == ["bob@remote.test"]
    assert got[0].mail_from == "user@example.test"
    assert got[0].helo == "localhost"  # [server] hostname
    assert b"hello out there" in got[0].content
    result = rec.first("bob@remote.test")
    assert result.status == "sent"
    assert result.remote == "mx1.remote.test [127.0.0.2]"
    assert mx2.received == []


def test_next_mx_when_the_first_is_down(remote, farm):
    mx2 = farm.start("127.0.0.3")
    srv, rec = remote()
    submit(srv, ["carol@backup.test"])
    got = wait_for(lambda: mx2.received, what="delivery to the backup MX")
    assert got[0].rcpt_tos == ["carol@backup.test"]
    assert rec.first("carol@backup.test").status == "sent"


def test_domain_without_mx_gets_mail_at_its_address(remote, farm):
    mx = farm.start("127.0.0.2")
    srv, rec = remote()
    submit(srv, ["dave@amx.test"])
    wait_for(lambda: mx.received, what="delivery to the A record")
    assert rec.first("dave@amx.test").remote == "amx.test [127.0.0.2]"


def test_null_mx_fails_for_good(remote):
    srv, rec = remote()
    submit(srv, ["eve@nullmx.test"])
    result = rec.first("eve@nullmx.test")
    assert result.status == "permanent"
    assert result.enhanced == "5.1.10"
    assert "null MX" in result.text


def test_unknown_domain_fails_for_good(remote):
    srv, rec = remote()
    submit(srv, ["frank@nowhere.test"])
    result = rec.first("frank@nowhere.test")
    assert result.status == "permanent"
    assert "does not exist" in result.text


def test_dns_trouble_is_temporary(tampu_server, make_dns, farm):
    dns = make_dns(ZONE, timeout={"slow.test"})
    conf = remote_conf(dns.port, farm.port)
    conf["base"] = conf["base"].replace("dns_servers", "dns_timeout = 0.5\ndns_servers")
    recorder = Recorder()
    srv = tampu_server(plugins=[recorder], **conf)
    submit(srv, ["hal@slow.test"])
    result = recorder.first("hal@slow.test")
    assert result.status == "temporary"
    assert "DNS lookup of MX for slow.test failed" in result.text


def test_silent_server_times_out_the_attempt(remote, farm):
    with socket.socket() as silent:  # accepts connections (backlog) but never greets
        silent.bind(("127.0.0.2", farm.port))
        silent.listen(5)
        srv, rec = remote(smtp_extra="attempt_timeout = 1")
        submit(srv, ["ida@remote.test"])
        result = rec.first("ida@remote.test")
    assert result.status == "temporary"
    assert result.text == "delivery attempt took longer than 1s"


def test_temporary_refusal_then_success_on_retry(remote, farm):
    mx = farm.start("127.0.0.2", Sink(rcpt_replies=["451 4.7.1 Greylisted, come back later"]))
    farm.start("127.0.0.3", Sink(rcpt_replies=["451 4.7.1 Greylisted here too"]))
    srv, rec = remote()
    submit(srv, ["gina@remote.test"])
    got = wait_for(lambda: mx.received, timeout=15, what="delivery on retry")
    assert got[0].rcpt_tos == ["gina@remote.test"]
    results = wait_for(lambda: rec.for_address("gina@remote.test")[1:] and
                       rec.for_address("gina@remote.test"), what="two attempts")
    first, second = results[0], results[1]
    assert first.status == "temporary"
    assert (first.code, first.enhanced) == (451, "4.7.1")
    assert "Greylisted" in first.text
    assert second.status == "sent"


def test_permanent_refusal_keeps_the_remote_reply(remote, farm):
    mx = farm.start("127.0.0.2", Sink(rcpt_replies=["550 5.1.1 No such user here"]))
    mx2 = farm.start("127.0.0.3")
    srv, rec = remote()
    submit(srv, ["nobody@remote.test"])
    result = rec.first("nobody@remote.test")
    assert result.status == "permanent"
    assert (result.code, result.enhanced, result.text) == (550, "5.1.1", "No such user here")
    assert result.remote == "mx1.remote.test [127.0.0.2]"
    assert mx.rcpt_seen == ["nobody@remote.test"]
    assert mx2.rcpt_seen == []  # a 5xx is final: the next MX is not asked


class ExpandToRemote:
    """A test plugin that turns local ``fwd@example.test`` into a remote recipient."""

    name = "expand"

    def __init__(self, route: dict[str, object]) -> None:
        self.route = route

    @hookimpl
    def queue_expand_recipient(self, envelope: Envelope | None, item: QueueItem,
                               recipient: str) -> list[Recipient] | None:
        if recipient != "fwd@example.test":
            return None
        return [Recipient("ivan@remote.test", recipient, route=Route.from_json(self.route))]


def _send_unauthenticated(srv) -> None:
    with srv.smtp() as client:
        client.ehlo()
        assert client.sendmail("stranger@elsewhere.example", ["fwd@example.test"],
                               b"Subject: x\r\n\r\nfrom outside\r\n") == {}


def test_unauthenticated_mail_is_not_relayed(remote, farm):
    mx = farm.start("127.0.0.2")
    srv, rec = remote(plugins=[ExpandToRemote({}), _LocalUser()])
    _send_unauthenticated(srv)
    result = rec.first("ivan@remote.test")
    assert result.status == "permanent"
    assert result.enhanced == "5.7.1"
    assert "relaying to <ivan@remote.test> denied" in result.text
    assert mx.rcpt_seen == []


def test_server_made_forward_may_leave(remote, farm):
    mx = farm.start("127.0.0.2")
    srv, rec = remote(plugins=[ExpandToRemote({"forward": True,
                                               "mail_from": "srs@example.test"}),
                               _LocalUser()])
    _send_unauthenticated(srv)
    got = wait_for(lambda: mx.received, what="the forward")
    assert got[0].rcpt_tos == ["ivan@remote.test"]
    assert got[0].mail_from == "srs@example.test"  # route["mail_from"] wins
    assert rec.first("ivan@remote.test").status == "sent"


def test_via_route_bypasses_mx(remote, farm):
    mx1 = farm.start("127.0.0.2")
    relay = farm.start("127.0.0.3")
    srv, rec = remote(plugins=[ExpandToRemote({"via": [f"relay.test:{farm.port}"]}),
                               _LocalUser()])
    submit(srv, ["fwd@example.test"])
    got = wait_for(lambda: relay.received, what="delivery through the via host")
    assert got[0].rcpt_tos == ["ivan@remote.test"]
    assert rec.first("ivan@remote.test").remote == "relay.test [127.0.0.3]"
    assert mx1.rcpt_seen == []


def test_local_recipients_are_not_claimed(remote, farm):
    mx = farm.start("127.0.0.2")
    srv, rec = remote()
    submit(srv, ["user@example.test"])
    result = rec.first("user@example.test")
    assert "no delivery backend" in result.text  # the core's answer: delivery_smtp said None
    assert mx.rcpt_seen == []


class _LocalUser:
    """Accept ``fwd@example.test`` at RCPT (the aliases plugin's job in a real set-up)."""

    name = "fwd-user"
    priority = 10

    @hookimpl
    def smtp_rcpt_to(self, session, envelope, address, params):
        from tampu.reply import RECIPIENT_OK

        return RECIPIENT_OK if address == "fwd@example.test" else None


def test_tampu_delivers_to_another_tampu(tampu_server, make_dns):
    """End to end between two real tampu servers: A relays for its authenticated user by MX
    to B, which accepts for its local user over opportunistic STARTTLS and stores the message
    in a Maildir."""
    b = tampu_server(
        base=server_toml(domains=("far.test",)), users={"bob@far.test": "pw"}, deliver=True,
        conf={"40-local.toml": "[plugins.delivery_maildir]\nenabled = true\n"})
    dns = make_dns({"far.test": {"MX": ["10 mx.far.test."]},
                    "mx.far.test": {"A": ["127.0.0.1"]}})
    a = tampu_server(**remote_conf(dns.port, b.port("smtp")))
    submit(a, ["bob@far.test"], body=b"From: user@example.test\r\nSubject: a to b\r\n\r\nhi b\r\n")

    maildir = b.server.config.data_dir / "mail" / "far.test" / "bob" / "new"
    files = wait_for(lambda: list(maildir.iterdir()) if maildir.is_dir() else [],
                     what="delivery into B's Maildir")
    message = files[0].read_bytes()
    assert b"Subject: a to b" in message and b"hi b" in message
    received = [line for line in message.split(b"\n") if line.startswith(b"Received:")]
    assert len(received) == 2  # B's (from A, over TLS) on top of A's (from the client)
    assert b"(tampu) with ESMTPS" in message.split(b"Received:")[1]  # B's header: TLS used
    wait_for(lambda: not a.queue_items(), what="A's queue to empty")


def test_a_trusted_network_may_relay_without_auth_and_nobody_else(remote, farm):
    """[plugins.relay] trusted_networks (Postfix's mynetworks): 127.0.0.0/8 here."""
    sink = farm.start("127.0.0.2")
    srv, _ = remote(smtp_extra='[plugins.relay]\ntrusted_networks = ["127.0.0.0/8"]')
    with srv.smtp() as c:  # no AUTH
        c.ehlo()
        assert c.mail("app@example.test")[0] == 250
        assert c.rcpt("ivan@remote.test")[0] == 250
        assert c.data(b"Subject: from the LAN\r\n\r\nhi\r\n")[0] == 250
    got = wait_for(lambda: sink.received, what="the relayed message")
    assert got[0].rcpt_tos == ["ivan@remote.test"]
    other, _ = remote(smtp_extra='[plugins.relay]\ntrusted_networks = ["192.0.2.0/24"]')
    with other.smtp() as c:
        c.ehlo()
        assert c.mail("app@example.test")[0] == 250
        assert c.rcpt("ivan@remote.test")[0] == 550
