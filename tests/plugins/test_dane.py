"""DANE (RFC 7672, RFC 6698): TLSA matching, discovery with the AD bit, and delivery.

Real trustme certificates, a real DNS server on loopback that sets the AD bit (as a validating
resolver does for signed zones), real receiving SMTP servers on 127.0.0.x.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import ssl
from typing import Any

import dns.rdata
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

from tampu.dns import Resolver
from tampu.plugins.delivery_smtp import dane
from tampu.plugins.delivery_smtp.dane import DaneHost, DaneLookupError, Tlsa
from tampu.testing import wait_for
from tests.plugins.delivery_kit import Recorder
from tests.plugins.outbound_kit import PolicyServer, policy_text, start_dns, tlsa
from tests.plugins.remote_kit import MXFarm, free_port, remote_conf, server_tls, submit, write_ca

HOST = "mx1.remote.test"


def record(text: str) -> Tlsa:
    r: Any = dns.rdata.from_text("IN", "TLSA", text)
    return Tlsa(r.usage, r.selector, r.mtype, r.cert)


def host_with(*texts: str) -> DaneHost:
    records = tuple(record(t) for t in texts)
    return DaneHost(HOST, f"_25._tcp.{HOST}", tuple(r for r in records if r.usable),
                    len(records))


def der_chain(leaf: trustme.LeafCert, *extra: trustme.CA) -> list[bytes]:
    pems = [p.bytes() for p in leaf.cert_chain_pems] + [ca.cert_pem.bytes() for ca in extra]
    return [x509.load_pem_x509_certificate(p).public_bytes(Encoding.DER) for p in pems]


@pytest.fixture(scope="module")
def pki():
    root = trustme.CA()
    inter = root.create_child_ca()
    return root, inter, inter.issue_cert(HOST)


# ---------------------------------------------------------------------------- records


def test_usable_records():
    assert record("3 1 1 " + "ab" * 32).usable
    assert record("2 0 2 " + "ab" * 64).usable
    assert record("3 0 0 abcd").usable
    assert not record("0 0 1 " + "ab" * 32).usable  # PKIX-TA: unusable for SMTP (3.1.3)
    assert not record("1 1 1 " + "ab" * 32).usable  # PKIX-EE
    assert not record("3 2 1 " + "ab" * 32).usable  # unknown selector
    assert not record("3 1 3 abcd").usable  # unknown matching type
    assert str(record("3 1 1 " + "ab" * 32)) == "3 1 1 abababababababab..."


# ---------------------------------------------------------------------------- matching


@pytest.mark.parametrize("params", [(3, 1, 1), (3, 0, 1), (3, 0, 0), (3, 1, 2), (3, 1, 0)])
def test_dane_ee_matches_the_end_certificate(pki, params):
    _, _, leaf = pki
    verdict = dane.verify(der_chain(leaf), host_with(tlsa(leaf.cert_chain_pems[0].bytes(),
                                                          *params)))
    assert verdict.ok
    assert verdict.detail.startswith(f"DANE-EE {params[0]} {params[1]} {params[2]} ")


def test_dane_ee_ignores_names_and_dates(pki):
    _, inter, _ = pki
    old = inter.issue_cert("somewhere-else.test",
                           not_before=datetime.datetime(2000, 1, 1),
                           not_after=datetime.datetime(2001, 1, 1))
    verdict = dane.verify(der_chain(old), host_with(tlsa(old.cert_chain_pems[0].bytes(),
                                                         3, 1, 1)))
    assert verdict.ok  # RFC 7672 3.1.1: neither the name nor the expiry matter


def test_dane_ee_mismatch(pki):
    _, inter, leaf = pki
    other = inter.issue_cert(HOST)
    verdict = dane.verify(der_chain(leaf), host_with(tlsa(other.cert_chain_pems[0].bytes(),
                                                          3, 1, 1)))
    assert not verdict.ok
    assert verdict.detail == (f"the certificate of {HOST} matches none of its 1 usable TLSA "
                              f"record (_25._tcp.{HOST})")


@pytest.mark.parametrize("params", [(2, 0, 1), (2, 1, 1), (2, 0, 0), (2, 1, 2)])
def test_dane_ta_matches_an_intermediate(pki, params):
    _, inter, leaf = pki
    verdict = dane.verify(der_chain(leaf), host_with(tlsa(inter.cert_pem.bytes(), *params)))
    assert verdict.ok, verdict.detail
    assert verdict.detail.startswith("DANE-TA")


def test_dane_ta_matches_a_root_in_the_chain(pki):
    root, _, leaf = pki
    ta = host_with(tlsa(root.cert_pem.bytes(), 2, 0, 1))
    assert dane.verify(der_chain(leaf, root), ta).ok
    verdict = dane.verify(der_chain(leaf), ta)  # the root was not presented
    assert not verdict.ok


def test_dane_ta_checks_the_name(pki):
    _, inter, _ = pki
    wrong = inter.issue_cert("mx9.remote.test")
    wild = inter.issue_cert("*.remote.test")
    ta = host_with(tlsa(inter.cert_pem.bytes(), 2, 0, 1))
    verdict = dane.verify(der_chain(wrong), ta)
    assert not verdict.ok
    assert verdict.detail.endswith(f": the certificate is not valid for {HOST}")
    assert dane.verify(der_chain(wild), ta).ok


def test_dane_ta_checks_dates_below_the_anchor(pki):
    _, inter, _ = pki
    expired = inter.issue_cert(HOST, not_before=datetime.datetime(2000, 1, 1),
                               not_after=datetime.datetime(2001, 1, 1))
    verdict = dane.verify(der_chain(expired), host_with(tlsa(inter.cert_pem.bytes(), 2, 0, 1)))
    assert not verdict.ok
    assert "expired" in verdict.detail


def test_dane_ta_needs_a_real_chain(pki):
    root, inter, leaf = pki
    stranger = root.create_child_ca().issue_cert(HOST)  # same root, another intermediate
    ta = host_with(tlsa(inter.cert_pem.bytes(), 2, 0, 1))
    forged = der_chain(stranger)[:1] + der_chain(leaf)[1:]  # presents our intermediate
    verdict = dane.verify(forged, ta)
    assert not verdict.ok
    assert "does not chain to the trust anchor" in verdict.detail
    # the end certificate itself is no trust anchor
    assert not dane.verify(der_chain(leaf), host_with(tlsa(leaf.cert_chain_pems[0].bytes(),
                                                           2, 0, 1))).ok


def test_dane_ta_refuses_a_leaf_acting_as_a_ca(pki):
    _, inter, leaf = pki
    leaf_cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    leaf_key = load_pem_private_key(leaf.private_key_pem.bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    evil = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(leaf_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .sign(leaf_key, hashes.SHA256()))
    chain = [evil.public_bytes(Encoding.DER), *der_chain(leaf)]
    verdict = dane.verify(chain, host_with(tlsa(leaf.cert_chain_pems[0].bytes(), 2, 0, 1)))
    assert not verdict.ok
    assert "not a CA" in verdict.detail


# ---------------------------------------------------------------------------- discovery


def _lookup(server, domain, host, port=25):
    async def run():
        resolver = Resolver([("127.0.0.1", server.port)], timeout=1)
        try:
            return await dane.lookup(resolver, domain, host, port)
        finally:
            resolver.close()

    return asyncio.run(run())


def _zone(records):
    return {"remote.test": {"MX": [f"10 {HOST}."]}, HOST: {"A": ["127.0.0.2"]},
            f"_25._tcp.{HOST}": {"TLSA": records}}


def test_lookup_needs_authenticated_answers(pki):
    _, _, leaf = pki
    text = tlsa(leaf.cert_chain_pems[0].bytes(), 3, 1, 1)
    signed = start_dns(_zone([text, "1 1 1 " + "ab" * 32]), authenticated=True)
    unsigned = start_dns(_zone([text]))
    try:
        found = _lookup(signed, "remote.test", HOST)
        assert found is not None
        assert found.name == f"_25._tcp.{HOST}"
        assert [str(r) for r in found.records] == [str(record(text))]  # the PKIX-EE dropped
        assert found.published == 2
        assert _lookup(unsigned, "remote.test", HOST) is None  # no AD bit: no DANE
        signed.set(f"_25._tcp.{HOST}", "TLSA", [])
        assert _lookup(signed, "remote.test", HOST) is None  # signed, no records
        signed.set(f"_25._tcp.{HOST}", "TLSA", ["0 0 1 " + "ab" * 32])
        found = _lookup(signed, "remote.test", HOST)
        assert found is not None and not found.usable and found.published == 1
        signed.servfail.add(f"_25._tcp.{HOST}")
        with pytest.raises(DaneLookupError, match="TLSA lookup for _25._tcp.mx1.remote.test"):
            _lookup(signed, "remote.test", HOST)
    finally:
        signed.stop()
        unsigned.stop()


# ---------------------------------------------------------------------------- delivery


def _context_for(cert):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return ctx


@pytest.fixture
def farm():
    farm = MXFarm(free_port())
    yield farm
    farm.stop_all()


@pytest.fixture
def remote(tampu_server, farm, tmp_path):
    """``start(tlsa_records, authenticated=True, ...)`` → (server, recorder) delivering to
    remote.test (MX mx1.remote.test at 127.0.0.2) with those TLSA records."""
    servers = []

    def start(records, *, authenticated=True, ca=None, extra="", zone=None):
        dns_server = start_dns({**_zone(records), **(zone or {})}, authenticated=authenticated)
        servers.append(dns_server)
        name = f"_{farm.port}._tcp.{HOST}"  # the port tampu connects to
        dns_server.set(name, "TLSA", records)
        recorder = Recorder()
        ca_file = write_ca(ca, tmp_path / "ca.pem") if ca is not None else None
        srv = tampu_server(plugins=[recorder], **remote_conf(
            dns_server.port, farm.port, ca_file=ca_file, smtp_extra=extra))
        start.dns = dns_server
        return srv, recorder

    yield start
    for server in servers:
        server.stop()


def test_dane_ee_authenticates_an_untrusted_certificate(remote, farm, caplog):
    caplog.set_level(logging.INFO, "tampu.plugins.delivery_smtp")
    cert = trustme.CA().issue_cert("anything.test")  # a private CA, another name: DANE-EE
    mx = farm.start("127.0.0.2", tls=_context_for(cert))
    srv, rec = remote([tlsa(cert.cert_chain_pems[0].bytes(), 3, 1, 1)])
    submit(srv, ["bob@remote.test"])
    got = wait_for(lambda: mx.received, what="delivery over DANE-authenticated TLS")
    assert got[0].tls
    assert rec.first("bob@remote.test").status == "sent"
    assert any(r.getMessage().startswith(f"DANE: {HOST} authenticated by DANE-EE 3 1 1 ")
               for r in caplog.records)
    level = srv.server.config.data_dir / "domaininfo" / "remote.test.json"
    assert json.loads(level.read_text())["outgoing"] == "tls_verified"


def test_dane_ta_delivers(remote, farm, caplog):
    caplog.set_level(logging.INFO, "tampu.plugins.delivery_smtp")
    root = trustme.CA()
    inter = root.create_child_ca()
    cert = inter.issue_cert(HOST)
    mx = farm.start("127.0.0.2", tls=_context_for(cert))
    srv, rec = remote([tlsa(inter.cert_pem.bytes(), 2, 0, 1)])
    submit(srv, ["carol@remote.test"])
    got = wait_for(lambda: mx.received, what="delivery over DANE-TA")
    assert got[0].tls
    assert rec.first("carol@remote.test").status == "sent"
    # the intermediate came from the presented chain (tls_policy.peer_chain)
    assert any(r.getMessage().startswith(f"DANE: {HOST} authenticated by DANE-TA 2 0 1 ")
               for r in caplog.records)


def test_dane_mismatch_is_a_temporary_failure_even_with_a_valid_certificate(
        remote, farm, tampu_ca):
    mx = farm.start("127.0.0.2", tls=server_tls(tampu_ca, HOST))  # PKIX-valid for tampu
    other = trustme.CA().issue_cert(HOST)
    srv, rec = remote([tlsa(other.cert_chain_pems[0].bytes(), 3, 1, 1)], ca=tampu_ca)
    submit(srv, ["dave@remote.test"])
    result = rec.first("dave@remote.test")
    assert result.status == "temporary"
    assert result.enhanced == "4.7.5"
    assert result.text == (f"DANE (_{farm.port}._tcp.{HOST}): the certificate of {HOST} "
                           f"matches none of its 1 usable TLSA record "
                           f"(_{farm.port}._tcp.{HOST})")
    assert mx.rcpt_seen == []  # neither plaintext nor PKIX-only fallback
    assert srv.queue_items()


def test_dane_host_without_starttls_gets_nothing(remote, farm):
    mx = farm.start("127.0.0.2")  # plain text only
    cert = trustme.CA().issue_cert(HOST)
    srv, rec = remote([tlsa(cert.cert_chain_pems[0].bytes(), 3, 1, 1)])
    submit(srv, ["erin@remote.test"])
    result = rec.first("erin@remote.test")
    assert result.status == "temporary"
    assert result.text == (f"DANE (_{farm.port}._tcp.{HOST}), but {HOST} does not offer "
                           "STARTTLS")
    assert mx.rcpt_seen == []


def test_without_the_ad_bit_dane_is_not_used(remote, farm):
    mx = farm.start("127.0.0.2")  # plain text, and records that would not match anyway
    srv, rec = remote(["3 1 1 " + "ab" * 32], authenticated=False)
    submit(srv, ["fay@remote.test"])
    got = wait_for(lambda: mx.received, what="opportunistic delivery")
    assert not got[0].tls
    assert rec.first("fay@remote.test").status == "sent"


def test_failed_tlsa_lookup_is_a_temporary_failure(remote, farm):
    mx = farm.start("127.0.0.2")
    srv, rec = remote(["3 1 1 " + "ab" * 32])
    remote.dns.servfail.add(f"_{farm.port}._tcp.{HOST}")
    submit(srv, ["gus@remote.test"])
    result = rec.first("gus@remote.test")
    assert result.status == "temporary"
    assert result.text.startswith(f"DANE: TLSA lookup for _{farm.port}._tcp.{HOST} failed: "
                                  "SERVFAIL")
    assert result.text.endswith(f"{HOST} is not used without its TLSA records")
    assert mx.rcpt_seen == []


def test_unusable_records_still_require_tls(remote, farm):
    mx = farm.start("127.0.0.2")
    srv, rec = remote(["1 1 1 " + "ab" * 32])  # PKIX-EE only: unusable for SMTP
    submit(srv, ["hal@remote.test"])
    result = rec.first("hal@remote.test")
    assert result.status == "temporary"
    assert "no usable record) requires TLS, but mx1.remote.test does not offer STARTTLS" \
        in result.text
    assert mx.rcpt_seen == []
    farm.stop("127.0.0.2")
    mx = farm.start("127.0.0.2", tls=_context_for(trustme.CA().issue_cert("x.test")))
    got = wait_for(lambda: mx.received, timeout=15, what="delivery over unauthenticated TLS")
    assert got[0].tls


def test_dane_takes_precedence_over_mta_sts(remote, farm, tampu_ca):
    cert = trustme.CA().issue_cert(HOST)
    mx = farm.start("127.0.0.2", tls=_context_for(cert))
    with PolicyServer(tampu_ca, "mta-sts.remote.test") as policy:
        policy.serve("remote.test", policy_text("enforce", "mx.elsewhere.test"))
        srv, rec = remote([tlsa(cert.cert_chain_pems[0].bytes(), 3, 1, 1)], ca=tampu_ca,
                          extra=f"mta_sts_port = {policy.port}",
                          zone={"_mta-sts.remote.test": {"TXT": ['"v=STSv1; id=1"']},
                                "mta-sts.remote.test": {"A": ["127.0.0.1"]}})
        submit(srv, ["ivy@remote.test"])
        got = wait_for(lambda: mx.received, what="delivery by DANE despite MTA-STS")
        assert policy.fetches("remote.test") == 1  # the policy was there, and known
    assert got[0].tls
    assert rec.first("ivy@remote.test").status == "sent"
