"""The kit's DNS server and zone helpers, asked by the core's own resolver."""

from __future__ import annotations

import asyncio
import base64
import hashlib

import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from tampu.dns import Resolver, parse_server
from tampu.plugins.delivery_smtp.mta_sts import parse_txt
from tampu.plugins.dmarc.record import parse_record, parse_tags
from tampu.testing.dns import (
    DNSServer,
    dmarc_text,
    make_dkim_key,
    mx_rdata,
    spf_text,
    tlsa_rdata,
    txt_rdata,
    txt_text,
)


def ask(server: DNSServer, *questions: tuple[str, str]):
    """The core's resolver's answers to ``questions`` (no cache between calls)."""
    res = Resolver([parse_server(server.address)], timeout=2)

    async def main():
        try:
            return [await res.query(name, rdtype) for name, rdtype in questions]
        finally:
            res.close()

    return asyncio.run(main())


def test_spf_replaces_only_the_spf_record(dns_server):
    dns_server.txt("example.org", "google-site-verification=abc", "v=spf1 -all")
    assert dns_server.spf("example.org", "ip4:127.0.0.1 ~all") == "v=spf1 ip4:127.0.0.1 ~all"
    (answer,) = ask(dns_server, ("example.org", "TXT"))
    assert sorted(answer.texts()) == ["google-site-verification=abc",
                                      "v=spf1 ip4:127.0.0.1 ~all"]


def test_mx_and_addresses(dns_server):
    dns_server.mx("remote.test", "mx1.remote.test", "5 mx0.remote.test.",
                  addresses={"mx1.remote.test": "127.0.0.2", "mx0.remote.test": ["::1",
                                                                                 "127.0.0.3"]})
    mx, a1, a0, aaaa0, none = ask(dns_server, ("remote.test", "MX"), ("mx1.remote.test", "A"),
                                  ("mx0.remote.test", "A"), ("mx0.remote.test", "AAAA"),
                                  ("mx1.remote.test", "AAAA"))
    assert sorted((r.preference, r.exchange.to_text()) for r in mx.records) == [
        (5, "mx0.remote.test."), (10, "mx1.remote.test.")]
    assert [r.address for r in a1.records] == ["127.0.0.2"]
    assert [r.address for r in a0.records] == ["127.0.0.3"]
    assert [r.address for r in aaaa0.records] == ["::1"]
    assert none.records == () and not none.nxdomain  # the name exists, no AAAA
    dns_server.mx("null.test", ".")  # RFC 7505: accepts no mail
    (null,) = ask(dns_server, ("null.test", "MX"))
    assert [(r.preference, r.exchange.to_text()) for r in null.records] == [(10, ".")]


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_dkim_key_is_published_and_verifies(dns_server, algorithm):
    key = dns_server.dkim("example.org", "sel", algorithm=algorithm)
    message = (b"From: a@example.org\r\nTo: b@example.test\r\nSubject: signed\r\n"
               b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n\r\nbody\r\n")
    signed = key.sign(message)
    assert signed.startswith(b"DKIM-Signature:") and signed.endswith(message)
    (answer,) = ask(dns_server, ("sel._domainkey.example.org", "TXT"))
    assert answer.texts() == [key.txt]
    if algorithm == "rsa":  # 2048 bits: several strings, an answer too big for UDP
        assert len(answer.records[0].strings) > 1
        assert len(key.txt) > 255
    published = {b"sel._domainkey.example.org.": answer.texts()[0].encode()}
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: published.get(name))
    assert not dkim.verify(signed.replace(b"body", b"bodY"),
                           dnsfunc=lambda name, timeout=5: published.get(name))


def test_dkim_key_installs_where_the_plugin_reads_it(tmp_path):
    from tampu.plugins.dkim.keys import parse_key

    key = make_dkim_key("example.test", "s1")
    path = key.install(tmp_path)
    assert path == tmp_path / "domains" / "example.test" / "dkim:s1.pem"
    parsed = parse_key(path.read_bytes(), path, "example.test", "s1")
    assert parsed.txt_record() == key.txt and parsed.bits == 2048


def test_dmarc_and_mta_sts_records_parse(dns_server):
    dns_server.dmarc("example.org", "quarantine", pct=50, rua="mailto:d@example.org")
    dns_server.mta_sts("example.org", "20240601T000000")
    dmarc_answer, sts = ask(dns_server, ("_dmarc.example.org", "TXT"),
                            ("_mta-sts.example.org", "TXT"))
    record = parse_record(dmarc_answer.texts()[0])
    assert (record.p, record.pct, record.rua[0].uri) == ("quarantine", 50,
                                                         "mailto:d@example.org")
    assert parse_txt(sts.texts()) == "20240601T000000"
    dns_server.dmarc("example.org", "v=DMARC1; p=none")  # replaces, not adds
    (again,) = ask(dns_server, ("_dmarc.example.org", "TXT"))
    assert again.texts() == ["v=DMARC1; p=none"]


def test_tlsa_of_a_trustme_certificate(dns_server, tampu_ca):
    leaf = tampu_ca.issue_cert("mx.remote.test")
    rdata = dns_server.tlsa("mx.remote.test", leaf)
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert rdata == f"3 1 1 {hashlib.sha256(spki).hexdigest()}"
    (answer,) = ask(dns_server, ("_25._tcp.mx.remote.test", "TLSA"))
    assert [(r.usage, r.selector, r.mtype, r.cert) for r in answer.records] == [
        (3, 1, 1, hashlib.sha256(spki).digest())]
    ca_full = tlsa_rdata(tampu_ca, usage=2, selector=0, mtype=0)  # DANE-TA, whole cert
    ca_der = x509.load_pem_x509_certificate(tampu_ca.cert_pem.bytes()).public_bytes(
        Encoding.DER)
    assert ca_full == f"2 0 0 {ca_der.hex()}"
    with pytest.raises(ValueError, match="matching type"):
        tlsa_rdata(leaf, mtype=3)


def test_timeout_servfail_and_remove(dns_server):
    from tampu.dns import DnsTempError

    dns_server.a("gone.test", "192.0.2.1")
    dns_server.remove("gone.test")
    (answer,) = ask(dns_server, ("gone.test", "A"))
    assert answer.nxdomain
    dns_server.servfail.add("broken.test")
    with pytest.raises(DnsTempError):
        ask(dns_server, ("broken.test", "A"))


def test_conf_line_points_tampu_at_it(dns_server):
    assert dns_server.conf_line == f'dns_servers = ["127.0.0.1:{dns_server.port}"]'


def test_ipv6_address_is_bracketed():
    with DNSServer(host="::1") as server:
        assert server.address == f"[::1]:{server.port}"
        assert parse_server(server.address) == ("::1", server.port)


# ------------------------------------------------------------------ properties of the helpers

@given(st.binary(max_size=1200))
def test_txt_rdata_round_trips(raw):
    rdata = txt_rdata(raw)
    assert txt_text(rdata) == raw
    parsed = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, rdata)
    assert all(len(s) <= 255 for s in parsed.strings)


@given(st.text(max_size=600))
def test_txt_rdata_of_text_is_its_utf8(text):
    assert txt_text(txt_rdata(text)) == text.encode("utf-8")


_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


@given(st.lists(_LABEL, min_size=1, max_size=4), st.integers(0, 65535), st.booleans(),
       st.booleans())
def test_mx_rdata_is_a_valid_mx(labels, preference, inline, dot):
    host = ".".join(labels) + ("." if dot else "")
    spec = f"{preference} {host}" if inline else host
    rdata = mx_rdata(spec, preference if not inline else 10)
    parsed = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, rdata)
    assert parsed.preference == preference
    assert parsed.exchange.to_text() == ".".join(labels) + "."


@given(st.text(max_size=40))
def test_mx_rdata_refuses_junk_or_makes_a_valid_record(spec):
    try:
        rdata = mx_rdata(spec, 10)
    except ValueError:
        return
    dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX, rdata)  # no exception


_VALUE = st.from_regex(r"\A[A-Za-z0-9:@.!_-]{1,30}\Z")


@given(st.sampled_from(["none", "quarantine", "reject"]),
       st.dictionaries(st.sampled_from(["pct", "rua", "ruf", "adkim", "aspf", "sp", "fo"]),
                       _VALUE, max_size=4))
def test_dmarc_text_keeps_every_tag(policy, tags):
    text = dmarc_text(policy, **tags)
    assert text.startswith("v=DMARC1; ")
    assert parse_tags(text) == [("v", "DMARC1"), ("p", policy), *tags.items()]


@given(st.text(max_size=60))
def test_spf_text_is_idempotent(policy):
    once = spf_text(policy)
    assert once.lower().startswith("v=spf1")
    assert spf_text(once) == once


def test_dkim_public_key_matches_private():
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = make_dkim_key("example.org", algorithm="ed25519")
    private = load_pem_private_key(key.private_pem, None)
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert base64.b64decode(key.public) == raw
