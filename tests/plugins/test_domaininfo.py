"""domaininfo: security levels per domain, outgoing (through delivery_smtp) and incoming."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from tampu import MethodResult, add_result, hookimpl
from tampu.plugins.domaininfo.store import DomainInfoStore, SecLevel
from tampu.testing import wait_for
from tests.helpers import RawClient
from tests.plugins.delivery_kit import Recorder
from tests.plugins.remote_kit import MXFarm, free_port, remote_conf, server_tls, submit, write_ca

ZONE = {
    "secure.test": {"MX": ["10 mx1.secure.test."]},
    "mx1.secure.test": {"A": ["127.0.0.2"]},
}


@pytest.fixture
def farm():
    farm = MXFarm(free_port())
    yield farm
    farm.stop_all()


def level_file(srv, domain: str):
    return srv.server.config.data_dir / "domaininfo" / f"{domain}.json"


# ---------------------------------------------------------------------------- the store


def test_store_keeps_the_highest_level_per_direction(tmp_path):
    store = DomainInfoStore(tmp_path / "di")

    async def run() -> None:
        assert await store.outgoing("a.test") is SecLevel.PLAIN  # nothing known: plain
        assert await store.check_outgoing("A.test", SecLevel.TLS_UNVERIFIED)
        assert await store.check_outgoing("a.test", SecLevel.TLS_VERIFIED)
        assert not await store.check_outgoing("a.test", SecLevel.TLS_UNVERIFIED)
        assert not await store.check_outgoing("a.test", SecLevel.PLAIN)
        assert await store.check_incoming("a.test", SecLevel.PLAIN)  # separate directions

    asyncio.run(run())
    data = json.loads((tmp_path / "di" / "a.test.json").read_text())
    assert data == {"domain": "a.test", "outgoing": "tls_verified"}
    assert sorted(p.name for p in (tmp_path / "di").iterdir()) == [".lock", "a.test.json"]
    assert asyncio.run(store.forget("a.test"))
    assert asyncio.run(store.check_outgoing("a.test", SecLevel.PLAIN))


def test_store_names_cannot_escape_its_folder(tmp_path):
    store = DomainInfoStore(tmp_path / "di")
    assert asyncio.run(store.check_incoming("../../evil", SecLevel.TLS_UNVERIFIED))
    assert asyncio.run(store.check_incoming("a/b", SecLevel.TLS_UNVERIFIED))
    assert store.path("..") is None and store.path("a/b") is None  # not domain names
    assert list((tmp_path / "di").glob("*.json")) == []
    assert not list(tmp_path.glob("*.json"))


def test_store_is_safe_across_threads_and_processes_sharing_the_files(tmp_path):
    """Concurrent raises from separate stores on the same folder (as reception workers are):
    compare-and-set under the flock keeps the highest."""
    levels = [SecLevel.TLS_VERIFIED, SecLevel.PLAIN, SecLevel.TLS_UNVERIFIED] * 10

    def one(level: SecLevel) -> None:
        asyncio.run(DomainInfoStore(tmp_path / "di").check_outgoing("b.test", level))

    threads = [threading.Thread(target=one, args=(lvl,)) for lvl in levels]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert asyncio.run(DomainInfoStore(tmp_path / "di").outgoing("b.test")) \
        is SecLevel.TLS_VERIFIED


# ---------------------------------------------------------------------------- outgoing


def test_outgoing_downgrade_is_refused(tampu_server, tampu_ca, make_dns, farm, tmp_path):
    dns = make_dns(ZONE)
    secure = farm.start("127.0.0.2", tls=server_tls(tampu_ca, "mx1.secure.test"))
    recorder = Recorder()
    srv = tampu_server(plugins=[recorder], **remote_conf(
        dns.port, farm.port, ca_file=write_ca(tampu_ca, tmp_path / "ca.pem")))
    submit(srv, ["one@secure.test"])
    got = wait_for(lambda: secure.received, what="the TLS delivery")
    assert got[0].tls
    assert recorder.first("one@secure.test").status == "sent"
    path = level_file(srv, "secure.test")
    assert json.loads(path.read_text())["outgoing"] == "tls_verified"
    before = (path.read_bytes(), path.stat().st_mtime_ns)

    farm.stop("127.0.0.2")
    plain = farm.start("127.0.0.2")  # the same MX, now without STARTTLS
    submit(srv, ["two@secure.test"])
    result = recorder.first("two@secure.test")
    assert result.status == "temporary"
    assert "security level downgrade" in result.text
    assert plain.rcpt_seen == []  # nothing was sent in plain text
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_unverified_certificate_is_tls_unverified(tampu_server, tampu_ca, make_dns, farm):
    dns = make_dns(ZONE)
    mx = farm.start("127.0.0.2", tls=server_tls(tampu_ca, "mx1.secure.test"))
    srv = tampu_server(**remote_conf(dns.port, farm.port))  # the test CA is not trusted
    submit(srv, ["three@secure.test"])
    got = wait_for(lambda: mx.received, what="the delivery over unverified TLS")
    assert got[0].tls  # TLS all the same, just not verified
    level = json.loads(level_file(srv, "secure.test").read_text())["outgoing"]
    assert level == "tls_unverified"


def test_disabled_domaininfo_checks_nothing(tampu_server, make_dns, farm):
    dns = make_dns(ZONE)
    mx = farm.start("127.0.0.2")
    conf = remote_conf(dns.port, farm.port, domaininfo=False)
    srv = tampu_server(**conf)
    asyncio.run(DomainInfoStore(srv.server.config.data_dir / "domaininfo").check_outgoing(
        "secure.test", SecLevel.TLS_VERIFIED))
    submit(srv, ["four@secure.test"])
    got = wait_for(lambda: mx.received, what="plain delivery")
    assert not got[0].tls


# ---------------------------------------------------------------------------- incoming


class SpfPass:
    """Stands in for the spf plugin: every sender in sender.test passes SPF."""

    name = "spf-stub"
    priority = 10

    @hookimpl
    def smtp_mail_from(self, session, envelope, address, params):
        domain = address.rpartition("@")[2]
        result = "pass" if domain == "sender.test" else "fail"
        add_result(envelope, MethodResult("spf", result, (("smtp.mailfrom", address),)))


def _mail_from(srv, address: str, *, tls: bool) -> tuple[int, list[str]]:
    with RawClient(srv.port("smtp")) as client:
        assert client.reply()[0] == 220
        assert client.cmd("EHLO client.test")[0] == 250
        if tls:
            client.starttls(srv.client_tls())
            assert client.cmd("EHLO client.test")[0] == 250
        return client.cmd(f"MAIL FROM:<{address}>")


def test_incoming_downgrade_is_refused(tampu_server):
    srv = tampu_server(plugins=[SpfPass()], conf={"45-delivery-remote.toml": """
        [plugins.domaininfo]
        enabled = true
        """})
    assert _mail_from(srv, "a@sender.test", tls=False)[0] == 250  # nothing known: plain ok
    assert _mail_from(srv, "a@sender.test", tls=True)[0] == 250  # raises the level
    path = level_file(srv, "sender.test")
    assert json.loads(path.read_text())["incoming"] == "tls_unverified"
    code, lines = _mail_from(srv, "b@sender.test", tls=False)
    assert code == 451
    assert lines[0].startswith("4.7.3 Security level check failed")
    assert _mail_from(srv, "c@sender.test", tls=True)[0] == 250
    # no SPF pass: nothing recorded, nothing refused
    assert _mail_from(srv, "x@other.test", tls=True)[0] == 250
    assert _mail_from(srv, "x@other.test", tls=False)[0] == 250
    assert not level_file(srv, "other.test").exists()
