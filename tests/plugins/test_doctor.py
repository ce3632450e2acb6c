"""``tampu doctor DOMAIN``: a loopback DNS server with a good zone and broken ones, a real
HTTPS server for the MTA-STS policy (trustme certificate), the local DKIM key and the
certificate in certs/."""

from __future__ import annotations

import base64
import datetime
import json

import dns.rdata
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from tampu.cli import main as tampu_main
from tampu.plugins.dkim.keys import generate_key, key_path, load_key, write_key_file
from tampu.plugins.doctor.checks import next_id, tlsrpt_problem, with_mechanism
from tampu.plugins.doctor.report import quote_txt, txt_record
from tampu.testing import make_config_dir, server_toml
from tests.dnsserver import DNSServer
from tests.helpers import issue_cert
from tests.plugins.outbound_kit import PolicyServer, policy_text
from tests.plugins.remote_kit import write_ca

D = "example.test"
HOST = "mail.example.test"
SELECTOR = "s1"


def good_zone(key_record: str) -> dict[str, dict[str, list[str]]]:
    return {
        D: {"MX": [f"10 {HOST}."], "TXT": ['"v=spf1 mx -all"']},
        HOST: {"A": ["127.0.0.1"], "TXT": ['"v=spf1 a -all"']},
        "1.0.0.127.in-addr.arpa": {"PTR": [f"{HOST}."]},
        f"{SELECTOR}._domainkey.{D}": {"TXT": [key_record]},
        f"_dmarc.{D}": {"TXT": [f'"v=DMARC1; p=reject; rua=mailto:postmaster@{D}"']},
        f"_mta-sts.{D}": {"TXT": ['"v=STSv1; id=20260101"']},
        f"mta-sts.{D}": {"A": ["127.0.0.1"]},
        f"_smtp._tls.{D}": {"TXT": [f'"v=TLSRPTv1; rua=mailto:tls@{D}"']},
    }


class Setup:
    def __init__(self, root, dns, policy, key):
        self.root, self.dns, self.policy, self.key = root, dns, policy, key

    def run(self, capsys, *extra):
        code = tampu_main(["doctor", "--config-dir", str(self.root), *extra, D])
        out = capsys.readouterr().out
        return code, out

    def line(self, out: str, check: str) -> str:
        found = [ln for ln in out.splitlines() if ln.split()[1:2] == [check]]
        assert len(found) == 1, out
        return found[0]


@pytest.fixture
def setup(tmp_path, tampu_ca):
    policy = PolicyServer(tampu_ca, f"mta-sts.{D}")
    policy.serve(D, policy_text("enforce", HOST, max_age=604800))
    pem = generate_key("ed25519")
    root = tmp_path / "conf"
    write_ca(tampu_ca, tmp_path / "ca.pem")
    with policy, DNSServer(ttl=0) as dns:
        root = make_config_dir(root, ca=tampu_ca, base=server_toml(
            hostname=HOST, extra=f'dns_servers = ["{dns.address}"]\ndns_timeout = 2'), conf={
            "33-dkim.toml": "[plugins.dkim]\nenabled = true\n",
            "70-doctor.toml": f"[plugins.doctor]\nmta_sts_port = {policy.port}\n"
                              f'tls_ca_file = "{tmp_path / "ca.pem"}"\nfetch_timeout = 5\n'})
        path = key_path(root / "domains" / D, SELECTOR)
        write_key_file(path, pem)
        key = load_key(path, D)
        issue_cert(tampu_ca, root / "certs", HOST)
        for name, records in good_zone(f'"{key.txt_record()}"').items():
            for rtype, values in records.items():
                dns.set(name, rtype, values)
        yield Setup(root, dns, policy, key)


def test_good_zone_is_all_ok(setup, capsys):
    code, out = setup.run(capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"tampu doctor {D}: this host is {HOST}")
    checks = [ln.split()[:2] for ln in lines[1:-1]]
    assert checks == [["ok", c] for c in ("domain", "mx", "host", "ptr", "spf", "spf-helo",
                                          "dkim", "dmarc", "mta-sts", "tls-rpt",
                                          "certificate")], out
    assert "publish" not in out
    assert lines[-1] == "0 failed, 0 warnings, 11 ok"
    assert f"{D} MX: 10 {HOST}." in setup.line(out, "mx")
    assert "127.0.0.1 -> mail.example.test" in setup.line(out, "ptr")
    assert '"v=spf1 mx -all" passes for 127.0.0.1' in setup.line(out, "spf")
    assert f"{SELECTOR}._domainkey.{D} matches dkim:{SELECTOR}.pem (ed25519-sha256" in out
    assert "id 20260101, mode enforce, mx mail.example.test" in setup.line(out, "mta-sts")
    assert setup.policy.fetches(D) == 1 and setup.policy.sni == [f"mta-sts.{D}"]
    assert HOST in setup.line(out, "certificate") and "days)" in out
    # every lookup went to the configured server
    asked = {name for name, _ in setup.dns.queries}
    assert {f"{D}.", f"{HOST}.", f"_dmarc.{D}.", f"_smtp._tls.{D}."} <= asked


def test_json(setup, capsys):
    code, out = setup.run(capsys, "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True
    assert data["domain"] == D and data["hostname"] == HOST
    assert {f["status"] for f in data["findings"]} == {"ok"}
    setup.dns.set(f"_dmarc.{D}", "TXT", [])
    code, out = setup.run(capsys, "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False
    (dmarc,) = [f for f in data["findings"] if f["check"] == "dmarc"]
    assert dmarc["status"] == "FAIL"
    assert dmarc["records"] == [f'_dmarc.{D}. IN TXT "v=DMARC1; p=quarantine; '
                                f'rua=mailto:postmaster@{D}"']


def _other_key_record() -> str:
    raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw,
                                                                        PublicFormat.Raw)
    return f'"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"'


BROKEN = {
    "missing MX": ((D, "MX", []), "mx", f"{D} has no MX record",
                   f"{D}. IN MX 10 {HOST}."),
    "MX elsewhere": ((D, "MX", ["10 mx.other.test."]), "mx",
                     f"MX points elsewhere (10 mx.other.test.), not at {HOST}",
                     f"{D}. IN MX 10 {HOST}."),
    "SPF without the host": ((D, "TXT", ['"v=spf1 ip4:192.0.2.1 -all"']), "spf",
                             '"v=spf1 ip4:192.0.2.1 -all" does not pass for this host: '
                             "127.0.0.1: fail",
                             f'{D}. IN TXT "v=spf1 mx ip4:192.0.2.1 -all"'),
    "no SPF": ((D, "TXT", ['"something else"']), "spf", f"(no SPF record at {D})",
               f'{D}. IN TXT "v=spf1 mx -all"'),
    "PTR elsewhere": (("1.0.0.127.in-addr.arpa", "PTR", ["host.isp.test."]), "ptr",
                      f"127.0.0.1 -> host.isp.test, not {HOST}",
                      f"1.0.0.127.in-addr.arpa. IN PTR {HOST}."),
    "no DMARC": ((f"_dmarc.{D}", "TXT", []), "dmarc", f"no DMARC record at _dmarc.{D}",
                 f'_dmarc.{D}. IN TXT "v=DMARC1; p=quarantine; rua=mailto:postmaster@{D}"'),
    "broken TLS-RPT": ((f"_smtp._tls.{D}", "TXT", ['"v=TLSRPTv1;"']), "tls-rpt",
                       "it has no rua=",
                       f'_smtp._tls.{D}. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@{D}"'),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_zone(setup, capsys, case):
    (name, rtype, values), check, detail, record = BROKEN[case]
    setup.dns.set(name, rtype, values)
    code, out = setup.run(capsys)
    assert code == 1, out
    line = setup.line(out, check)
    assert line.startswith("FAIL") and detail in line, out
    assert f"      publish      {record}" in out.splitlines(), out
    # the other checks are not disturbed (the SPF "mx" needs the MX)
    others = [ln for ln in out.splitlines()[1:-1]
              if ln.startswith(("ok", "WARN", "FAIL")) and ln.split()[1] != check]
    assert all(ln.startswith("ok") for ln in others
               if ln.split()[1] not in ("spf", "spf-helo")), out


def test_dkim_record_not_matching_the_local_key(setup, capsys):
    setup.dns.set(f"{SELECTOR}._domainkey.{D}", "TXT", [_other_key_record()])
    code, out = setup.run(capsys)
    assert code == 1
    line = setup.line(out, "dkim")
    assert line.startswith("FAIL") and "does not match" in line and "another public key" in line
    assert f"      publish      {setup.key.zone_record()}" in out.splitlines()
    setup.dns.set(f"{SELECTOR}._domainkey.{D}", "TXT", [])
    code, out = setup.run(capsys)
    assert code == 1 and f"no key record at {SELECTOR}._domainkey.{D}" in out
    assert setup.key.zone_record() in out


def test_mta_sts_record_without_a_policy(setup, capsys):
    setup.policy.policies.clear()  # the host answers 404
    code, out = setup.run(capsys)
    assert code == 1
    line = setup.line(out, "mta-sts")
    assert line.startswith("FAIL")
    assert f"_mta-sts.{D} announces a policy (id 20260101) that cannot be fetched: " \
           f"https://mta-sts.{D}/.well-known/mta-sts.txt (127.0.0.1): HTTP 404" in line
    assert "HTTP 404" in line
    lines = out.splitlines()
    start = lines.index(line)
    assert f"serve at https://mta-sts.{D}/.well-known/mta-sts.txt" in lines[start + 1]
    assert [ln.strip() for ln in lines[start + 2:start + 6]] == [
        "version: STSv1", "mode: enforce", f"mx: {HOST}", "max_age: 604800"]


def test_mta_sts_policy_without_this_host(setup, capsys):
    setup.policy.serve(D, policy_text("enforce", "mx.other.test"))
    code, out = setup.run(capsys)
    assert code == 1
    line = setup.line(out, "mta-sts")
    assert line.startswith("FAIL") and f"lists mx mx.other.test, not {HOST}" in line
    today = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d")
    assert f'      publish      _mta-sts.{D}. IN TXT "v=STSv1; id={today}01"' in out
    assert "mx: mx.other.test\n" in out and f"mx: {HOST}\n" in out


def test_optional_records_missing_are_warnings(setup, capsys):
    for name in (f"_mta-sts.{D}", f"_smtp._tls.{D}"):
        setup.dns.set(name, "TXT", [])
    setup.dns.set(HOST, "TXT", [])
    code, out = setup.run(capsys)
    assert code == 0, out  # warnings only
    assert setup.line(out, "mta-sts").startswith("WARN")
    assert setup.line(out, "tls-rpt").startswith("WARN")
    assert setup.line(out, "spf-helo").startswith("WARN")
    assert f'publish      {HOST}. IN TXT "v=spf1 a -all"' in out
    assert f'publish      _smtp._tls.{D}. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@{D}"' in out
    assert out.splitlines()[-1] == "0 failed, 3 warnings, 8 ok"
    assert setup.policy.fetches(D) == 0


def test_certificate_expiring_soon_and_wrong_names(setup, capsys, tampu_ca):
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=5)
    cert = tampu_ca.issue_cert(HOST, not_after=soon)
    target = setup.root / "certs" / HOST
    cert.private_key_pem.write_to_path(str(target / "privkey.pem"))
    cert.cert_chain_pems[0].write_to_path(str(target / "fullchain.pem"))
    code, out = setup.run(capsys)
    assert code == 0, out
    line = setup.line(out, "certificate")
    assert line.startswith("WARN") and ("(4 days)" in line or "(5 days)" in line), line
    issue_cert(tampu_ca, setup.root / "certs", HOST, "other.example.test")
    code, out = setup.run(capsys)
    assert code == 1
    assert f"other.example.test: not valid for {HOST}" in setup.line(out, "certificate")


def test_a_host_without_addresses(setup, capsys):
    setup.dns.set(HOST, "A", [])
    code, out = setup.run(capsys)
    assert code == 1
    assert setup.line(out, "host").startswith(f"FAIL  host         {HOST} has no A or AAAA")
    assert f"publish      {HOST}. IN A <this server's public IPv4 address>" in out
    assert setup.line(out, "ptr").startswith("WARN")  # not checked, no second failure


def test_dns_trouble_is_a_failure(setup, capsys):
    setup.dns.servfail.add(f"_dmarc.{D}")
    code, out = setup.run(capsys)
    assert code == 1
    assert "DNS lookup of _dmarc" in setup.line(out, "dmarc")


def test_configuration_errors_exit_2(setup, capsys, tmp_path):
    assert setup.run(capsys)[0] == 0
    assert tampu_main(["doctor", "--config-dir", str(setup.root), "not a domain!"]) == 2
    key = setup.root / "domains" / D / "dkim:broken.pem"
    key.write_text("not a key\n")  # tampu check refuses it: so does the doctor
    assert tampu_main(["doctor", "--config-dir", str(setup.root), D]) == 2
    assert "dkim:broken.pem" in capsys.readouterr().err
    key.unlink()
    (setup.root / "conf.d" / "71-bad.toml").write_text("[plugins.doctor]\ncert_warn_days = -1\n")
    assert tampu_main(["doctor", "--config-dir", str(setup.root), D]) == 2
    err = capsys.readouterr().err
    assert "cert_warn_days" in err


def test_a_domain_that_is_not_local(setup, capsys):
    code = tampu_main(["doctor", "--config-dir", str(setup.root), "elsewhere.test"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL  domain       elsewhere.test is not a local domain" in out


def test_record_helpers():
    assert with_mechanism("v=spf1 include:_spf.example.net ~all", "mx") == \
        "v=spf1 mx include:_spf.example.net ~all"
    assert with_mechanism("v=spf1", "a") == "v=spf1 a"
    assert quote_txt('a "b" \\c') == '"a \\"b\\" \\\\c"'
    long = "p=" + "A" * 300
    assert quote_txt(long) == f'("p={"A" * 253}" "{"A" * 47}")'
    assert quote_txt("é" * 200).count('"') == 4  # split between characters, not inside one
    assert txt_record("x.test.", "v=1") == 'x.test. IN TXT "v=1"'
    day = datetime.date(2026, 12, 1)
    assert next_id(None, day) == "2026120101"
    assert next_id("2026120101", day) == "2026120102"
    assert next_id("20250101", day) == "2026120101"
    assert tlsrpt_problem("v=TLSRPTv1; rua=mailto:a@b.test,https://r.test/x") == ""
    assert "no rua" in tlsrpt_problem("v=TLSRPTv1")
    assert "neither" in tlsrpt_problem("v=TLSRPTv1; rua=ftp://x")



@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FFF),
               max_size=700))
def test_txt_records_read_back_as_written(text):
    """What doctor prints is what a zone file loader reads: same text, strings <= 255 bytes."""
    rdata = quote_txt(text).strip("()")
    parsed = dns.rdata.from_text("IN", "TXT", rdata)
    assert b"".join(parsed.strings).decode("utf-8") == text
    assert all(len(s) <= 255 for s in parsed.strings)
