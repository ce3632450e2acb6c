"""dkim: tampu signs, independent verifiers (dkimpy, OpenDKIM's library) check; tampu verifies
what an independent signer (dkimpy) signed, keys served by a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from tampu import ConfigError, DeliveryResult, PluginContext, QueueItem, hookimpl
from tampu.authres import results
from tampu.cli import main as tampu_main
from tampu.config import load_config
from tampu.dns import Resolver
from tampu.files import FileStamp
from tampu.plugins.dkim import DkimPlugin, DkimSettings, rsa_verify
from tampu.plugins.dkim.keys import (
    DkimKey,
    KeyFileError,
    KeyStore,
    generate_key,
    key_path,
    load_key,
    write_key_file,
    zone_record,
)
from tampu.plugins.dkim.sign import author_domain, headers_to_sign, sign
from tampu.plugins.dkim.verify import INLINE_CHECK_BYTES, SignatureResult, Verifier, header_block
from tampu.testing import context_for, make_config_dir, server_toml
from tests.conftest import require_tool
from tests.dnsserver import DNSServer
from tests.plugins import opendkim

USER, PASSWORD = "user@example.test", "secret"
DOMAIN = "example.test"

MESSAGE = (b"From: Some One <user@example.test>\r\n"
           b"To: friend@example.org\r\n"
           b"Subject: hello\r\n"
           b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
           b"Message-ID: <1@example.test>\r\n"
           b"Received: from x by y; Mon, 01 Jan 2024 10:00:00 +0000\r\n"
           b"\r\n"
           b"Hello,\r\n\r\nthis is the body.\r\n")


# ------------------------------------------------------------------------------ helpers


def make_key(domain_dir: Path, selector: str, algorithm: str = "rsa2048",
             domain: str = DOMAIN) -> DkimKey:
    domain_dir.mkdir(parents=True, exist_ok=True)
    path = key_path(domain_dir, selector)
    write_key_file(path, generate_key(algorithm), overwrite=True)  # type: ignore[arg-type]
    return load_key(path, domain)


def served(line: str) -> tuple[str, str]:
    """(name, TXT rdata) of a zone-file line as `tampu dkim dns` prints it."""
    m = re.fullmatch(r"(\S+)\. IN TXT \((.*)\)", line.strip())
    assert m, line
    return m.group(1), m.group(2)


def record_text(rdata: str) -> str:
    """The record's text: its quoted strings joined (RFC 6376 3.6.2.2)."""
    return "".join(re.findall(r'"([^"]*)"', rdata))


def zone_for(*keys: DkimKey) -> dict[str, dict[str, list[str]]]:
    zone: dict[str, dict[str, list[str]]] = {}
    for key in keys:
        name, rdata = served(key.zone_record())
        zone.setdefault(name, {}).setdefault("TXT", []).append(rdata)
    return zone


def dkimpy_verifies(message: bytes, records: dict[str, str]) -> list[bool]:
    """dkimpy's own verifier on every signature, records by name (no DNS)."""
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        text = records.get(name.decode().rstrip("."))
        return text.encode() if text is not None else None

    d = dkim.DKIM(message)
    count = sum(1 for n, _ in d.headers if n.lower() == b"dkim-signature")
    return [bool(dkim.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)) for i in range(count)]


def signed(message: bytes, keys: list[DkimKey]) -> bytes:
    """What the core queues: the hook's fields on top of the message."""
    fields = sign(message, keys)
    return b"".join(f"{n}: {v}\r\n".encode() for n, v in fields) + message


def run_verify(port: int, message: bytes, *, dns_timeout: float = 2.0, timeout: float = 10.0,
               max_signatures: int = 10) -> list[SignatureResult]:
    async def go() -> list[SignatureResult]:
        resolver = Resolver([("127.0.0.1", port)], timeout=dns_timeout)
        try:
            return await Verifier(resolver, timeout=timeout,
                                  max_signatures=max_signatures).verify(message)
        finally:
            resolver.close()
    return asyncio.run(go())


def raw_keys(kind: str) -> tuple[bytes, str]:
    """(private key as dkimpy's sign takes it, p= value) made outside tampu."""
    if kind == "rsa":
        k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = k.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
        pub = k.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
        return pem, base64.b64encode(pub).decode()
    e = ed25519.Ed25519PrivateKey.generate()
    seed = e.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())
    pub = e.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed), base64.b64encode(pub).decode()


def dkimpy_sign(message: bytes, kind: str, selector: bytes = b"sel",
                domain: bytes = b"example.org", **kw) -> tuple[bytes, str]:
    """A message signed by dkimpy (not through tampu) and its key record text."""
    private, public = raw_keys(kind)
    alg = b"rsa-sha256" if kind == "rsa" else b"ed25519-sha256"
    kw.setdefault("include_headers", [b"from", b"to", b"subject", b"date"])
    field = dkim.sign(message, selector, domain, private, signature_algorithm=alg,
                      canonicalize=kw.pop("canonicalize", (b"relaxed", b"simple")), **kw)
    return field + message, f"v=DKIM1; k={kind}; p={public}"


def txt(text: str) -> str:
    """TXT rdata for a record text (strings of at most 255 bytes)."""
    return " ".join(f'"{text[i:i + 200]}"' for i in range(0, len(text), 200))


INCOMING = (b"From: Sender <sender@example.org>\r\nTo: user@example.test\r\n"
            b"Subject: signed elsewhere\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            b"\r\nA message from outside.\r\n")


# ------------------------------------------------------------------------------ signing


@pytest.mark.parametrize("algorithm", ["rsa2048", "ed25519"])
def test_signature_verifies_with_dkimpy(tmp_path, algorithm):
    key = make_key(tmp_path / DOMAIN, "s1", algorithm)
    message = signed(MESSAGE, [key])
    assert dkimpy_verifies(message, {f"s1._domainkey.{DOMAIN}": key.txt_record()}) == [True]
    tags = dkim.util.parse_tag_value(dkim.DKIM(message).headers[0][1])
    assert tags[b"a"] == (b"rsa-sha256" if algorithm == "rsa2048" else b"ed25519-sha256")
    assert tags[b"c"] == b"relaxed/relaxed"
    assert tags[b"d"] == b"example.test" and tags[b"s"] == b"s1"
    assert abs(int(tags[b"t"]) - time.time()) < 60
    signed_headers = [h.strip() for h in tags[b"h"].split(b":")]
    # those present, From oversigned, Received (never signed) left out
    assert signed_headers == [b"from", b"to", b"subject", b"date", b"message-id", b"from"]


def test_one_signature_per_selector_verified_by_dkimpy(tmp_path):
    rsa_key = make_key(tmp_path / DOMAIN, "rsa1", "rsa2048")
    ed_key = make_key(tmp_path / DOMAIN, "ed1", "ed25519")
    message = signed(MESSAGE, [rsa_key, ed_key])
    records = {f"rsa1._domainkey.{DOMAIN}": rsa_key.txt_record(),
               f"ed1._domainkey.{DOMAIN}": ed_key.txt_record()}
    assert dkimpy_verifies(message, records) == [True, True]


@pytest.mark.parametrize("algorithm", ["rsa2048", "rsa3072", "ed25519"])
def test_signature_verifies_with_opendkim(tmp_path, algorithm):
    key = make_key(tmp_path / DOMAIN, "sel", algorithm)
    message = signed(MESSAGE, [key])
    records = {f"sel._domainkey.{DOMAIN}": key.txt_record()}
    assert opendkim.verify(message, records, tmp_path) == {(DOMAIN, "sel"): (True, 0)}
    tampered = message.replace(b"this is the body", b"this is the b0dy")
    passed, error = opendkim.verify(tampered, records, tmp_path)[(DOMAIN, "sel")]
    assert not passed
    other = make_key(tmp_path / "other", "sel", algorithm)  # the wrong public key
    passed, _ = opendkim.verify(message, {f"sel._domainkey.{DOMAIN}": other.txt_record()},
                                tmp_path)[(DOMAIN, "sel")]
    assert not passed


_FIELD_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                     max_size=60)


@settings(max_examples=40, deadline=None)
@given(subject=_FIELD_TEXT, fold_at=st.integers(0, 60), spaces=st.text(" \t", max_size=3),
       body=st.lists(_FIELD_TEXT, max_size=8), blank_tail=st.integers(0, 3))
def test_any_message_tampu_signs_verifies_with_dkimpy(tmp_path_factory, subject, fold_at,
                                                     spaces, body, blank_tail):
    key = _PROPERTY_KEYS.get("k") or _PROPERTY_KEYS.setdefault(
        "k", make_key(tmp_path_factory.mktemp("k") / DOMAIN, "p1", "rsa2048"))
    folded = subject[:fold_at] + "\r\n " + subject[fold_at:] if fold_at < len(subject) \
        else subject
    message = (f"From: a <user@example.test>\r\nSubject:{spaces}{folded}{spaces}\r\n"
               f"To: b@example.org\r\n\r\n" + "".join(f"{line}{spaces}\r\n" for line in body)
               + "\r\n" * blank_tail).encode()
    assert dkimpy_verifies(signed(message, [key]),
                           {f"p1._domainkey.{DOMAIN}": key.txt_record()}) == [True]


_PROPERTY_KEYS: dict[str, DkimKey] = {}


def test_two_selectors_verify_with_opendkim(tmp_path):
    rsa_key = make_key(tmp_path / DOMAIN, "a", "rsa2048")
    ed_key = make_key(tmp_path / DOMAIN, "b", "ed25519")
    message = signed(MESSAGE, [rsa_key, ed_key])
    got = opendkim.verify(message, {f"a._domainkey.{DOMAIN}": rsa_key.txt_record(),
                                    f"b._domainkey.{DOMAIN}": ed_key.txt_record()}, tmp_path)
    assert got == {(DOMAIN, "a"): (True, 0), (DOMAIN, "b"): (True, 0)}


def test_oversigned_from_breaks_when_a_from_is_added(tmp_path):
    key = make_key(tmp_path / DOMAIN, "s1", "ed25519")
    message = signed(MESSAGE, [key])
    records = {f"s1._domainkey.{DOMAIN}": key.txt_record()}
    head, _, body = message.partition(b"\r\n\r\n")
    forged = head + b"\r\nFrom: ceo@example.test\r\n\r\n" + body
    assert dkimpy_verifies(forged, records) == [False]
    assert not opendkim.verify(forged, records, tmp_path)[(DOMAIN, "s1")][0]


def test_author_domain():
    assert author_domain(MESSAGE) == "example.test"
    assert author_domain(b"From: A <a@EXAMPLE.Test.>\r\n\r\n") == "example.test"
    assert author_domain(b"From: a@xn--fa-hia.de\r\n\r\n") == "faß.de"
    assert author_domain(b"From: a@x.test, b@x.test\r\n\r\n") == "x.test"
    assert author_domain(b"From: a@x.test, b@y.test\r\n\r\n") is None
    assert author_domain(b"From: a@x.test\r\nFrom: b@x.test\r\n\r\n") is None
    assert author_domain(b"Subject: no author\r\n\r\n") is None
    assert author_domain(b"From: undisclosed\r\n\r\n") is None


@given(st.lists(st.sampled_from(["From", "To", "Subject", "X-Other", "Received", "cc"]),
                max_size=12))
@settings(max_examples=200, deadline=None)
def test_headers_to_sign_property(names):
    message = b"".join(f"{n}: v\r\n".encode() for n in names) + b"\r\nbody\r\n"
    got = headers_to_sign(message, ["From", "To", "Subject", "Cc"])
    wanted = [n.lower().encode() for n in names if n.lower() in ("from", "to", "subject", "cc")]
    froms = names.count("From")
    assert got == (wanted + [b"from"] if froms else wanted)
    assert b"received" not in got


@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                      blacklist_characters='"\\'), max_size=2000))
@settings(max_examples=200, deadline=None)
def test_zone_record_strings_property(p):
    text = f"v=DKIM1; k=rsa; p={p}"
    line = zone_record("sel", "example.com", text)
    name, rdata = served(line)
    assert name == "sel._domainkey.example.com"
    strings = re.findall(r'"([^"]*)"', rdata)
    assert all(len(s.encode()) <= 255 for s in strings)
    assert "".join(strings) == text


def test_plugin_signs_what_it_should(tmp_path):
    cdir = make_config_dir(tmp_path / "cfg")
    make_key(cdir / "domains" / DOMAIN, "s1", "ed25519")
    plugin = DkimPlugin(PluginContext("dkim", DkimSettings(enabled=True),
                                      context_for(load_config(cdir))))

    def item(**kw) -> QueueItem:
        return QueueItem(id="q1", mail_from=kw.pop("mail_from", USER), recipients=[], **kw)

    submitted = plugin.signatures(item(auth_user=USER), MESSAGE)
    assert [n for n, _ in submitted] == ["DKIM-Signature"]
    dsn = MESSAGE.replace(b"user@example.test", b"MAILER-DAEMON@example.test")
    assert len(plugin.signatures(item(mail_from="", origin="dsn"), dsn)) == 1
    assert len(plugin.signatures(item(origin="forward"), MESSAGE)) == 1
    # mail from outside is never signed, even with a local From
    assert plugin.signatures(item(), MESSAGE) == []
    # a From in a domain that is not local, or local without keys, is not signed
    remote = MESSAGE.replace(b"user@example.test>", b"user@example.org>")
    assert plugin.signatures(item(auth_user=USER), remote) == []
    (cdir / "domains" / "other.test").mkdir()
    nokeys = MESSAGE.replace(b"user@example.test>", b"user@other.test>")
    assert plugin.signatures(item(auth_user=USER), nokeys) == []
    off = DkimPlugin(PluginContext("dkim", DkimSettings(enabled=True, sign=False),
                                   context_for(load_config(cdir))))
    assert off.signatures(item(auth_user=USER), MESSAGE) == []


def test_verify_timeout_stays_below_the_hook_timeout(tmp_path, caplog):
    cdir = make_config_dir(tmp_path / "cfg")
    context = context_for(load_config(cdir))
    with caplog.at_level("WARNING", logger="tampu.plugins.dkim"):
        plugin = DkimPlugin(PluginContext("dkim", DkimSettings(hook_timeout=2), context))
    assert plugin.verifier.timeout == pytest.approx(1.8)
    assert "verify_timeout (10.0 s) is not below the hook timeout (2.0 s)" in caplog.text
    plugin = DkimPlugin(PluginContext("dkim", DkimSettings(verify_timeout=3), context))
    assert plugin.verifier.timeout == 3  # below plugin_timeout (5 s in tests): as set


def test_headers_setting_is_validated():
    assert DkimSettings(headers=["Subject"]).headers == ["From", "Subject"]
    with pytest.raises(ValueError, match="must not be signed"):
        DkimSettings(headers=["From", "Received"])
    with pytest.raises(ValueError, match="not a header field name"):
        DkimSettings(headers=["From", "Bad Name"])


# ------------------------------------------------------------------------------ key files


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


BAD_KEYS = {
    "garbage": (b"this is not a key\n", "not a PEM private key"),
    "small": (_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
              "RSA key of 1024 bits is too small"),
    "ecdsa": (_pem(ec.generate_private_key(ec.SECP256R1())), "unsupported key type"),
    "encrypted": (rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pass")), "encrypted"),
}


@pytest.mark.parametrize("kind", sorted(BAD_KEYS))
def test_bad_key_file_is_a_startup_error_naming_it(tmp_path, capsys, kind):
    data, why = BAD_KEYS[kind]
    cdir = make_config_dir(tmp_path / "cfg", conf={"33-dkim.toml": "[plugins.dkim]\n"
                                                   "enabled = true\n"})
    path = cdir / "domains" / DOMAIN / "dkim:sel.pem"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as err:
        DkimPlugin(PluginContext("dkim", DkimSettings(enabled=True),
                                 context_for(load_config(cdir))))
    (problem,) = err.value.problems
    assert problem.startswith(f"{path}: ") and why in problem
    assert tampu_main(["check", "--config-dir", str(cdir)]) == 2
    out = capsys.readouterr().err
    assert str(path) in out and why in out


def test_bad_selector_name_is_refused(tmp_path):
    make_key(tmp_path / DOMAIN, "good")
    bad = tmp_path / DOMAIN / "dkim:no_underscores.pem"
    shutil.copy(tmp_path / DOMAIN / "dkim:good.pem", bad)
    with pytest.raises(KeyFileError, match="not a valid DKIM selector"):
        load_key(bad, DOMAIN)


def test_keys_are_reread_when_files_change(tmp_path, caplog):
    domains = tmp_path / "domains"
    store = KeyStore(domains, lambda p: FileStamp(p, 0))
    assert store.load_all() == [] and store.keys(DOMAIN) == []
    first = make_key(domains / DOMAIN, "a", "ed25519")
    assert [k.public for k in store.keys(DOMAIN)] == [first.public]
    assert [k.selector for k in store.keys("EXAMPLE.test.")] == ["a"]
    second = make_key(domains / DOMAIN, "b", "ed25519")
    assert [k.selector for k in store.keys(DOMAIN)] == ["a", "b"]
    replaced = make_key(domains / DOMAIN, "a", "ed25519")  # a new key under the same name
    assert replaced.public != first.public
    assert [k.public for k in store.keys(DOMAIN)] == [replaced.public, second.public]
    key_path(domains / DOMAIN, "a").write_text("broken\n")  # breaks while running
    with caplog.at_level("ERROR", logger="tampu.plugins.dkim"):
        assert [k.selector for k in store.keys(DOMAIN)] == ["b"]
    assert "dkim:a.pem" in caplog.text and "not a PEM private key" in caplog.text
    key_path(domains / DOMAIN, "b").unlink()
    assert store.keys(DOMAIN) == []
    shutil.rmtree(domains / DOMAIN)
    assert store.keys(DOMAIN) == []


def test_openssl_and_opendkim_genkey_keys_are_read(tmp_path):
    """Keys made by other tools: openssl genpkey (PKCS#8, as chasquid) and opendkim-genkey
    (PKCS#1); the p= tampu derives is the one opendkim-genkey publishes."""
    openssl = require_tool("openssl")
    for alg in ("ed25519", "rsa"):
        path = tmp_path / f"dkim:{alg}.pem"
        subprocess.run([openssl, "genpkey", "-algorithm", alg, "-out", str(path)], check=True,
                       capture_output=True, timeout=60)
        key = load_key(path, DOMAIN)
        assert key.key_type == alg and key.selector == alg
        assert dkimpy_verifies(signed(MESSAGE, [key]),
                               {f"{alg}._domainkey.{DOMAIN}": key.txt_record()}) == [True]
    genkey = require_tool("opendkim-genkey")
    subprocess.run([genkey, "-b", "2048", "-d", DOMAIN, "-s", "og", "-D", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    os.rename(tmp_path / "og.private", tmp_path / "dkim:og.pem")
    key = load_key(tmp_path / "dkim:og.pem", DOMAIN)
    published = record_text((tmp_path / "og.txt").read_text())
    assert f"p={key.public}" in published.replace(" ", "")


# ------------------------------------------------------------------------------ verifying


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_verifies_what_dkimpy_signed(kind):
    message, record = dkimpy_sign(INCOMING, kind)
    with DNSServer({"sel._domainkey.example.org": {"TXT": [txt(record)]}}) as dns:
        got = run_verify(dns.port, message)
    b = dkim.util.parse_tag_value(dkim.DKIM(message).headers[0][1])[b"b"][:8].decode()
    assert got == [SignatureResult("pass", "example.org", "sel", b, "",
                                   "rsa-sha256" if kind == "rsa" else "ed25519-sha256")]
    mr = got[0].method_result()
    assert str(mr) == f"dkim=pass header.d=example.org header.s=sel header.b={b}"


def test_small_messages_are_checked_on_the_loop_big_ones_in_a_thread(monkeypatch):
    where: list[bool] = []
    check = Verifier.check

    def spy(self, message, sigs):
        where.append(threading.current_thread() is threading.main_thread())
        return check(self, message, sigs)

    monkeypatch.setattr(Verifier, "check", spy)
    small, record = dkimpy_sign(INCOMING, "rsa")
    big, big_record = dkimpy_sign(INCOMING + b"More.\r\n" * (INLINE_CHECK_BYTES // 7), "rsa",
                                  selector=b"big")
    assert len(small) <= INLINE_CHECK_BYTES < len(big)
    with DNSServer({"sel._domainkey.example.org": {"TXT": [txt(record)]},
                    "big._domainkey.example.org": {"TXT": [txt(big_record)]}}) as dns:
        results = [run_verify(dns.port, m) for m in (small, big)]
    assert [[r.result for r in got] for got in results] == [["pass"], ["pass"]]
    assert where == [True, False]


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_tampering_fails(kind):
    message, record = dkimpy_sign(INCOMING, kind)
    with DNSServer({"sel._domainkey.example.org": {"TXT": [txt(record)]}}) as dns:
        body = run_verify(dns.port, message.replace(b"from outside", b"from 0utside"))
        header = run_verify(dns.port, message.replace(b"signed elsewhere", b"signed here"))
        unsigned_header = run_verify(dns.port, message.replace(
            b"\r\n\r\n", b"\r\nX-Added: not signed\r\n\r\n", 1))
    assert [(r.result, r.reason) for r in body] == [("fail", "body hash did not verify")]
    assert [(r.result, r.reason) for r in header] == [("fail", "signature did not verify")]
    assert [r.result for r in unsigned_header] == ["pass"]


_RSA_KEYS = {bits: rsa.generate_private_key(public_exponent=65537, key_size=bits)
             for bits in (1024, 2048)}


def test_dkimpy_checks_rsa_signatures_with_openssl():
    """The seam rsa_verify relies on: dkimpy's verify_sig_process calls the module-level
    RSASSA_PKCS1_v1_5_verify, which a Verifier replaces."""
    Verifier(Resolver([("127.0.0.1", 53)]))
    assert dkim.RSASSA_PKCS1_v1_5_verify is rsa_verify.rsa_verify
    assert "RSASSA_PKCS1_v1_5_verify" in dkim.DKIM.verify_sig_process.__code__.co_names


def test_a_signature_short_of_its_leading_zero_verifies_as_with_dkimpy():
    """About one RSA signature in 256 starts with a zero byte; dkimpy reads signatures as
    numbers, so one sent without that byte verifies: rsa_verify agrees (RFC 8017 would say
    invalid; what dkimpy accepted before stays accepted)."""
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key = _RSA_KEYS[1024]
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    public = dkim.crypto.parse_public_key(der)
    data, signature = next((d, sig) for d, sig in (
        (str(n).encode(), key.sign(str(n).encode(), padding.PKCS1v15(), hashes.SHA256()))
        for n in range(20_000)) if sig[0] == 0)
    for candidate in (signature, signature[1:], b"\0" + signature):
        assert rsa_verify.rsa_verify(dkim.HashThrough(hashlib.sha256(data)), candidate, public)
        assert rsa_verify._PURE(dkim.HashThrough(hashlib.sha256(data)), candidate, public)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300), bits=st.sampled_from([1024, 2048]),
       flip=st.integers(min_value=-1, max_value=255), sha1=st.booleans())
def test_openssl_and_dkimpy_agree_on_rsa_signatures(data, bits, flip, sha1):
    """Same arguments, same answer: a good signature, one with a flipped byte, one without
    its first byte, with a leading zero byte more, for SHA-256 and SHA-1. dkimpy reads the
    signature as a number, so a candidate is valid when its number is the good signature's
    (dropping a first byte that is 0, or that was flipped from 0, gives the good one)."""
    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key = _RSA_KEYS[bits]
    signature = key.sign(data, padding.PKCS1v15(), hashes.SHA1() if sha1 else hashes.SHA256())
    good = int.from_bytes(signature, "big")
    if flip >= 0:
        pos = flip % len(signature)
        signature = signature[:pos] + bytes([signature[pos] ^ 0x5A]) + signature[pos + 1:]
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    public = dkim.crypto.parse_public_key(der)
    hasher = hashlib.sha1 if sha1 else hashlib.sha256
    for candidate in (signature, b"\0" + signature, signature[1:]):
        valid = int.from_bytes(candidate, "big") == good
        ours = rsa_verify.rsa_verify(dkim.HashThrough(hasher(data)), candidate, public)
        theirs = rsa_verify._PURE(dkim.HashThrough(hasher(data)), candidate, public)
        assert ours == theirs == valid


def test_tampu_signed_verified_by_tampu(tmp_path):
    rsa_key = make_key(tmp_path / DOMAIN, "r", "rsa2048")
    ed_key = make_key(tmp_path / DOMAIN, "e", "ed25519")
    message = signed(MESSAGE, [rsa_key, ed_key])
    with DNSServer(zone_for(rsa_key, ed_key)) as dns:
        got = run_verify(dns.port, message)
    assert [(r.result, r.selector, r.algorithm) for r in got] == [
        ("pass", "r", "rsa-sha256"), ("pass", "e", "ed25519-sha256")]


def test_missing_key_record_is_permerror():
    message, _ = dkimpy_sign(INCOMING, "ed25519")
    with DNSServer({"example.org": {"A": ["192.0.2.1"]},
                    "sel._domainkey.example.org": {"A": ["192.0.2.1"]}}) as dns:
        nodata = run_verify(dns.port, message)  # the name exists, no TXT
        dns.zone.pop("sel._domainkey.example.org.")
        nxdomain = run_verify(dns.port, message)
    for got in (nodata, nxdomain):
        assert [(r.result, r.reason) for r in got] == [("permerror", "no key for signature")]


def test_dns_timeout_is_temperror():
    message, _ = dkimpy_sign(INCOMING, "rsa")
    with DNSServer(timeout={"sel._domainkey.example.org"}) as dns:
        started = time.monotonic()
        got = run_verify(dns.port, message, dns_timeout=0.5)
        assert time.monotonic() - started < 5
    assert [r.result for r in got] == ["temperror"]
    assert got[0].reason.startswith("key lookup failed")


def test_whole_verification_is_bounded_in_time():
    message, _ = dkimpy_sign(INCOMING, "rsa")
    with DNSServer(timeout={"sel._domainkey.example.org"}) as dns:
        started = time.monotonic()
        got = run_verify(dns.port, message, dns_timeout=30, timeout=0.5)
        assert time.monotonic() - started < 3
    assert [(r.result, r.reason) for r in got] == [("temperror", "verification took too long")]


def test_dns_servfail_is_temperror():
    message, _ = dkimpy_sign(INCOMING, "rsa")
    with DNSServer({"sel._domainkey.example.org": {"TXT": ['"v=DKIM1; p="']}}) as dns:
        dns.servfail.add("sel._domainkey.example.org")
        got = run_verify(dns.port, message, dns_timeout=1)
    assert [r.result for r in got] == ["temperror"]


def test_broken_signatures_and_records_are_permerror():
    message, record = dkimpy_sign(INCOMING, "rsa")
    sha1, sha1_record = dkimpy_sign(INCOMING, "rsa", selector=b"old")
    sha1 = sha1.replace(b"a=rsa-sha256", b"a=rsa-sha1", 1)
    nofrom, nofrom_record = dkimpy_sign(INCOMING, "rsa", selector=b"nofrom",
                                        include_headers=[b"from", b"subject"])
    assert b"h=from : subject;" in nofrom  # dkimpy refuses to leave From out: edit h=
    nofrom = nofrom.replace(b"h=from : subject;", b"h=subject;")
    zone = {"sel._domainkey.example.org": {"TXT": [txt(record)]},
            "old._domainkey.example.org": {"TXT": [txt(sha1_record)]},
            "nofrom._domainkey.example.org": {"TXT": [txt(nofrom_record)]},
            "revoked._domainkey.example.org": {"TXT": ['"v=DKIM1; k=rsa; p="']},
            "garbage._domainkey.example.org": {"TXT": ['"v=DKIM1; k=rsa; p=AAAA"']},
            "wrongtype._domainkey.example.org": {"TXT": [txt(record.replace("k=rsa",
                                                                            "k=ed25519"))]},
            "notemail._domainkey.example.org": {"TXT": [txt(record + "; s=tlsrpt")]}}
    cases = {
        "sha1": (sha1, "unsupported algorithm rsa-sha1"),
        "nofrom": (nofrom, "From is not signed"),
        "revoked": (message.replace(b"s=sel;", b"s=revoked;"), "key revoked"),
        "garbage": (message.replace(b"s=sel;", b"s=garbage;"), "unusable key"),
        "wrongtype": (message.replace(b"s=sel;", b"s=wrongtype;"), "does not match"),
        "notemail": (message.replace(b"s=sel;", b"s=notemail;"), "not for email"),
        "missing-tag": (re.sub(rb"bh=[^;]+;", b"", message), "missing bh="),
        "bad-tags": (message.replace(b"v=1;", b"v=1; v=1;"), "malformed tag list"),
        "expired": (message.replace(b"v=1;", b"v=1; x=1000;"), "x= value is past"),
    }
    with DNSServer(zone) as dns:
        for name, (msg, reason) in cases.items():
            got = run_verify(dns.port, msg)
            assert len(got) == 1 and got[0].result == "permerror", (name, got)
            assert reason in got[0].reason, (name, got)
            assert got[0].domain == "example.org", (name, got)


def test_no_signature_and_the_signature_cap():
    assert run_verify(1, INCOMING) == []  # no DNS needed at all
    private, public = raw_keys("ed25519")
    message = INCOMING
    for i in range(12):
        message = dkim.sign(message, f"s{i}".encode(), b"example.org", private,
                            signature_algorithm=b"ed25519-sha256",
                            include_headers=[b"from"]) + message
    zone = {f"s{i}._domainkey.example.org": {"TXT": [txt(f"v=DKIM1; k=ed25519; p={public}")]}
            for i in range(12)}
    with DNSServer(zone) as dns:
        got = run_verify(dns.port, message, max_signatures=10)
        asked = {name for name, _ in dns.queries}
    assert [r.result for r in got] == ["pass"] * 10 + ["neutral"]
    assert [r.selector for r in got[:10]] == [f"s{i}" for i in range(11, 1, -1)]
    assert got[10].reason == "2 more signatures not checked (max_signatures=10)"
    assert len(asked) == 10


@given(st.lists(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_parsing_hostile_signature_fields_never_raises(values):
    message = b"".join(b"DKIM-Signature: " + v + b"\r\n" for v in values) + INCOMING
    sigs, skipped = Verifier(Resolver([("127.0.0.1", 9)]), max_signatures=3).parse(message)
    assert len(sigs) == min(3, len(values)) and skipped == len(values) - len(sigs)
    for sig in sigs:
        assert sig.result is None or sig.result.result == "permerror"
        assert sig.result is not None or sig.qname  # undecided: its key will be looked up


def test_header_block():
    assert header_block(b"A: b\r\nC: d\r\n\r\nbody\r\n\r\n") == b"A: b\r\nC: d"
    assert header_block(b"A: b\nC: d\n\nbody") == b"A: b\nC: d"
    assert header_block(b"\r\nbody") == b""
    assert header_block(b"A: b") == b"A: b"


# ------------------------------------------------------------------------------ CLI


def test_cli_keygen_dns_round_trip(tmp_path, capsys):
    cdir = tmp_path / "cfg"
    (cdir / "domains" / DOMAIN).mkdir(parents=True)
    assert tampu_main(["dkim", "keygen", DOMAIN, "--config-dir", str(cdir)]) == 0
    out = capsys.readouterr().out
    today = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    path = cdir / "domains" / DOMAIN / f"dkim:{today}.pem"
    assert out.startswith(f'Key written to "{path}"\n\n')
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    keygen_line = out.strip().splitlines()[-1]
    assert keygen_line.startswith(f'{today}._domainkey.{DOMAIN}. IN TXT ("v=DKIM1; k=rsa; " "p=')
    # refuses to overwrite, unless --force
    before = path.read_bytes()
    assert tampu_main(["dkim", "keygen", DOMAIN, "--config-dir", str(cdir)]) == 1
    assert "already exists" in capsys.readouterr().err and path.read_bytes() == before
    assert tampu_main(["dkim", "--config-dir", str(cdir), "keygen", DOMAIN, "--selector",
                       "ed", "--algorithm", "ed25519"]) == 0
    capsys.readouterr()
    assert tampu_main(["dkim", "dns", DOMAIN, "--config-dir", str(cdir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == keygen_line and lines[1].startswith(
        f'ed._domainkey.{DOMAIN}. IN TXT ("v=DKIM1; k=ed25519; " "p=')
    # the printed records, served by a DNS server, verify what the plugin signs
    store = KeyStore(cdir / "domains", lambda p: FileStamp(p, 0))
    message = signed(MESSAGE, store.keys(DOMAIN))
    zone: dict[str, dict[str, list[str]]] = {}
    for line in lines:
        name, rdata = served(line)
        zone[name] = {"TXT": [rdata]}
    with DNSServer(zone) as dns:
        got = run_verify(dns.port, message)
    assert [(r.result, r.selector) for r in got] == [("pass", today), ("pass", "ed")]
    assert tampu_main(["dkim", "keygen", DOMAIN, "--config-dir", str(cdir), "--force"]) == 0
    assert path.read_bytes() != before and path.stat().st_mode & 0o777 == 0o600


def test_cli_errors(tmp_path, capsys):
    assert tampu_main(["dkim", "dns", "nokeys.test", "--config-dir", str(tmp_path)]) == 1
    assert "no DKIM keys found" in capsys.readouterr().err
    assert tampu_main(["dkim", "keygen", "bad..domain", "--config-dir", str(tmp_path)]) == 2
    assert tampu_main(["dkim", "keygen", DOMAIN, "--selector", "a/b",
                       "--config-dir", str(tmp_path)]) == 2
    (tmp_path / "domains" / DOMAIN).mkdir(parents=True)
    (tmp_path / "domains" / DOMAIN / "dkim:x.pem").write_text("junk")
    assert tampu_main(["dkim", "dns", DOMAIN, "--config-dir", str(tmp_path)]) == 1
    assert "dkim:x.pem: not a PEM private key" in capsys.readouterr().err


# ------------------------------------------------------------------------------ end to end


class AuthresProbe:
    """Reads the recorded results in its own smtp_data, after dkim's."""

    name = "probe"
    priority = 200

    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    @hookimpl
    def smtp_data(self, session, envelope, message):
        self.seen.append([str(r) for r in results(envelope, "dkim")])


def test_end_to_end(tampu_server, tampu_ca, tmp_path):
    incoming, record = dkimpy_sign(INCOMING, "rsa")
    with DNSServer({"sel._domainkey.example.org": {"TXT": [txt(record)]}}) as dns:
        cdir = make_config_dir(
            tmp_path / "srv", users={USER: PASSWORD}, ca=tampu_ca,
            base=server_toml(extra=f'dns_servers = ["127.0.0.1:{dns.port}"]\ndns_timeout = 1'),
            conf={"33-dkim.toml": "[plugins.dkim]\nenabled = true\n"})
        rsa_key = make_key(cdir / "domains" / DOMAIN, "r", "rsa2048")
        ed_key = make_key(cdir / "domains" / DOMAIN, "e", "ed25519")
        probe = AuthresProbe()
        srv = tampu_server(config_dir=cdir, plugins=[probe])

        # submission: the queued bytes are the signed bytes
        with srv.smtp("submission") as client:
            client.ehlo()
            client.starttls(context=srv.client_tls())
            client.ehlo()
            client.login(USER, PASSWORD)
            assert not client.sendmail(USER, ["friend@example.org"], MESSAGE)
        (qid,) = srv.queue_items()
        queued = srv.store.read_message_now(qid)
        records = {f"r._domainkey.{DOMAIN}": rsa_key.txt_record(),
                   f"e._domainkey.{DOMAIN}": ed_key.txt_record()}
        assert dkimpy_verifies(queued, records) == [True, True]
        assert opendkim.verify(queued, records, tmp_path) == {
            (DOMAIN, "e"): (True, 0), (DOMAIN, "r"): (True, 0)}
        assert probe.seen == [[]]  # authenticated sessions are not verified

        # incoming over smtp: verified, never signed by us
        arrived = []
        with srv.smtp() as client:
            for message in (incoming, INCOMING):
                before = set(srv.queue_items())
                assert not client.sendmail("sender@example.org", [USER], message)
                (new,) = set(srv.queue_items()) - before
                arrived.append(srv.store.read_message_now(new))
        b = dkim.util.parse_tag_value(dkim.DKIM(incoming).headers[0][1])[b"b"][:8].decode()
        assert probe.seen[1:] == [[f"dkim=pass header.d=example.org header.s=sel header.b={b}"],
                                  ["dkim=none"]]
        assert [m.count(b"DKIM-Signature:") for m in arrived] == [1, 0]
        assert dkimpy_verifies(arrived[0], {"sel._domainkey.example.org": record}) == [True]


class Capture:
    """A delivery backend that claims everything: the original fails, its DSN is kept."""

    name = "capture"
    priority = 1

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []

    @hookimpl
    def deliver(self, item, recipient, message):
        self.got.append((item.origin, message))
        if item.origin == "dsn":
            return DeliveryResult.sent("captured")
        return DeliveryResult.permanent("refused by the test")


def test_dsn_is_signed_end_to_end(tampu_server, tampu_ca, tmp_path):
    """The server's own mail (a DSN from MAILER-DAEMON@<hostname>) is signed when the
    hostname is a local domain with keys; mail from outside with a local From is not."""
    cdir = make_config_dir(tmp_path / "srv", users={USER: PASSWORD}, ca=tampu_ca,
                           base=server_toml(hostname=DOMAIN),
                           conf={"33-dkim.toml": "[plugins.dkim]\nenabled = true\n",
                                 "50-dsn.toml": "[plugins.dsn]\nenabled = true\n"})
    key = make_key(cdir / "domains" / DOMAIN, "bounce", "ed25519")
    capture = Capture()
    srv = tampu_server(config_dir=cdir, plugins=[capture], deliver=True)
    with srv.smtp() as client:
        assert not client.sendmail("someone@example.org", [USER], MESSAGE)
    deadline = time.monotonic() + 20
    while len(capture.got) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    origins = [origin for origin, _ in capture.got]
    assert origins == ["smtp", "dsn"], origins
    original, dsn = (message for _, message in capture.got)
    assert b"DKIM-Signature:" not in original
    assert b"MAILER-DAEMON@example.test" in dsn.split(b"\r\n\r\n", 1)[0]
    assert dkimpy_verifies(dsn, {f"bounce._domainkey.{DOMAIN}": key.txt_record()}) == [True]
    assert opendkim.verify(dsn, {f"bounce._domainkey.{DOMAIN}": key.txt_record()},
                           tmp_path) == {(DOMAIN, "bounce"): (True, 0)}
