"""dmarc: the evaluation as a library against a real DNS server, then end to end over SMTP
(real tampu, real SPF plugin, DKIM signed and verified with dkimpy)."""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import random
import time

import dkim
import dns.message
import dns.query
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tampu import blocking, hookimpl
from tampu.authres import MethodResult, add_result, results
from tampu.dns import DerivedCache, Resolver
from tampu.plugins.dmarc import method_result
from tampu.plugins.dmarc.author import author_domains
from tampu.plugins.dmarc.evaluate import (
    Actions,
    Decision,
    Identifiers,
    PolicyCache,
    PolicyLookup,
    Verdict,
    check_message,
    decide,
    discover_policy,
    evaluate,
    evaluate_domain,
    identifiers,
    strictest,
)
from tampu.plugins.dmarc.orgdomain import aligned, organizational_domain
from tampu.testing import server_toml

USER, PASSWORD = "user@example.test", "secret"


def txt(*records: str) -> dict[str, list[str]]:
    return {"TXT": [f'"{r}"' for r in records]}


ZONE = {
    "_dmarc.reject.test": txt("v=DMARC1; p=reject; rua=mailto:d@reject.test"),
    "_dmarc.quar.test": txt("v=DMARC1; p=quarantine"),
    "_dmarc.none.test": txt("v=DMARC1; p=none"),
    "_dmarc.strict.test": txt("v=DMARC1; p=reject; adkim=s; aspf=s"),
    "_dmarc.sub.test": txt("v=DMARC1; p=reject; sp=quarantine"),
    "_dmarc.own.sub.test": txt("v=DMARC1; p=none"),
    "_dmarc.example.co.uk": txt("v=DMARC1; p=reject; sp=none"),
    "_dmarc.two.test": txt("v=DMARC1; p=reject", "v=DMARC1; p=none"),
    "_dmarc.mixed.test": txt("v=spf1 -all", "v=DMARC1; p=reject", "something else"),
    "_dmarc.broken.test": txt("v=DMARC1; p=bogus"),
    "_dmarc.rescued.test": txt("v=DMARC1; p=bogus; rua=mailto:d@rescued.test"),
    "_dmarc.pct.test": txt("v=DMARC1; p=reject; pct=30"),
    "_dmarc.pct0.test": txt("v=DMARC1; p=quarantine; pct=0"),
    "_dmarc.slow2.test": txt("v=DMARC1; p=reject"),
    "nopolicy.test": {"A": ["192.0.2.1"]},
}
SLOW = {"_dmarc.slow.test", "_dmarc.slow2.test"}


@pytest.fixture
def zone_dns(make_dns):
    return make_dns(ZONE, timeout=SLOW)


def run(server, fn):
    """Run ``await fn(resolver)`` with a fresh tampu resolver pointed at the test server."""
    async def main():
        resolver = Resolver([("127.0.0.1", server.port)], timeout=1.0)
        try:
            return await fn(resolver)
        finally:
            resolver.close()
            await asyncio.sleep(0)  # let the transport finish closing
    return asyncio.run(main())


def verdict_for(server, domain, spf=(), dkim=(), rng=None):
    ids = Identifiers(tuple(spf), tuple(dkim))
    return run(server, lambda r: evaluate_domain(r, domain, ids, rng or random.Random(1)))


# ---------------------------------------------------------------------------- discovery


def _checked_twice(server):
    """Two messages From the same domains, one after the other, through one policy cache."""
    async def twice(resolver):
        cache: PolicyCache = DerivedCache(resolver)
        ids = Identifiers((), ())
        out = []
        for _ in range(2):
            out.append(await check_message(resolver, ["a@reject.test, b@mail.nopolicy.test"],
                                           ids, Actions(), random.Random(1), 5.0, cache))
            out.append(len(server.queries))
        return out
    return run(server, twice)


def test_a_policy_is_kept_while_its_answers_are_cached(zone_dns):
    """reject.test's record is kept for its TTL; mail.nopolicy.test has none, and the test
    server's NXDOMAIN carries no SOA (not cacheable, RFC 2308): it is asked again."""
    first, asked, second, asked_again = _checked_twice(zone_dns)
    assert asked == 3 and asked_again == asked + 2
    assert second.checked == first.checked and first.decision.action == "reject"


def test_answers_with_ttl_0_keep_no_policy(make_dns):
    dns = make_dns(ZONE, ttl=0)
    first, asked, second, asked_again = _checked_twice(dns)
    assert asked == 3 and asked_again == 6 and second.checked == first.checked


def test_no_record_looks_up_the_domain_then_its_organizational_domain(zone_dns):
    v = verdict_for(zone_dns, "mail.nopolicy.test")
    assert v.result == "none" and v.lookup.status == "none"
    asked = [name for name, rtype in zone_dns.queries if rtype == "TXT"]
    assert asked == ["_dmarc.mail.nopolicy.test.", "_dmarc.nopolicy.test."]


def test_organizational_domain_via_the_public_suffix_list(zone_dns):
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("a.b.example.com") == "example.com"
    assert organizational_domain("co.uk") == "co.uk"
    assert organizational_domain("alice.github.io") == "alice.github.io"  # private section
    assert organizational_domain("mail.example.test") == "example.test"  # unknown TLD
    v = verdict_for(zone_dns, "mail.example.co.uk")
    assert v.lookup.source == "example.co.uk" and v.lookup.subdomain_policy
    assert v.result == "fail" and v.policy == "none"  # sp=none of example.co.uk
    asked = [name for name, rtype in zone_dns.queries if rtype == "TXT"]
    assert asked == ["_dmarc.mail.example.co.uk.", "_dmarc.example.co.uk."]
    assert verdict_for(zone_dns, "example.co.uk").policy == "reject"


def test_several_dmarc_records_mean_none_and_other_txt_records_are_ignored(zone_dns):
    v = verdict_for(zone_dns, "two.test")
    assert v.result == "none" and "2 DMARC records" in v.reason
    v = verdict_for(zone_dns, "mixed.test")
    assert v.result == "fail" and v.policy == "reject"


def test_invalid_policy_is_permerror_unless_rua_is_valid(zone_dns):
    v = verdict_for(zone_dns, "broken.test")
    assert v.result == "permerror" and "invalid p=bogus" in v.reason
    v = verdict_for(zone_dns, "rescued.test")
    assert v.result == "fail" and v.policy == "none" and v.lookup.record.fallback
    assert decide(v, Actions()).action == "accept"


def test_subdomain_policy(zone_dns):
    assert verdict_for(zone_dns, "sub.test").policy == "reject"  # p= for the domain itself
    v = verdict_for(zone_dns, "mail.sub.test")  # no own record: sp= of sub.test
    assert v.lookup.source == "sub.test" and v.policy == "quarantine"
    v = verdict_for(zone_dns, "own.sub.test")  # its own record: its p=
    assert v.lookup.source == "own.sub.test" and v.policy == "none"


@pytest.mark.parametrize("domain", ["slow.test", "mail.slow2.test"])
def test_dns_timeout_is_temperror_in_bounded_time(zone_dns, domain):
    start = time.monotonic()
    v = verdict_for(zone_dns, domain)
    assert time.monotonic() - start < 3
    assert v.result == "temperror" and "timeout" in v.reason.lower()
    assert decide(v, Actions()).action == "accept"
    assert decide(v, Actions(on_temperror="tempfail")).action == "tempfail"


def test_servfail_is_temperror(zone_dns):
    zone_dns.servfail.add("_dmarc.reject.test")
    v = verdict_for(zone_dns, "reject.test")
    assert v.result == "temperror" and "SERVFAIL" in v.reason


def test_overall_time_limit(zone_dns):
    start = time.monotonic()
    outcome = run(zone_dns, lambda r: check_message(
        r, ["a@slow.test"], Identifiers(), Actions(), random.Random(), 0.2))
    assert time.monotonic() - start < 0.9
    assert [v.result for v, _ in outcome.checked] == ["temperror"]
    assert "more than 0.2s" in outcome.checked[0][0].reason


# ---------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("kind", ["spf", "dkim"])
def test_relaxed_alignment(zone_dns, kind):
    def check(domain, authenticated):
        ids = {kind: (authenticated,)}
        return verdict_for(zone_dns, domain, **ids)
    assert check("reject.test", "reject.test").result == "pass"
    assert check("reject.test", "bounces.reject.test").result == "pass"
    assert check("mail.example.co.uk", "example.co.uk").result == "pass"
    v = check("reject.test", "other.test")
    assert v.result == "fail" and v.requested == "reject"
    assert check("example.co.uk", "other.co.uk").result == "fail"  # co.uk is public


@pytest.mark.parametrize("kind", ["spf", "dkim"])
def test_strict_alignment(zone_dns, kind):
    v = verdict_for(zone_dns, "strict.test", **{kind: ("bounces.strict.test",)})
    assert v.result == "fail"
    v = verdict_for(zone_dns, "strict.test", **{kind: ("STRICT.test",)})
    assert v.result == "pass"
    assert (v.spf_aligned if kind == "spf" else v.dkim_aligned) == "STRICT.test"


def test_either_aligned_pass_is_enough(zone_dns):
    v = verdict_for(zone_dns, "reject.test", spf=("other.test",), dkim=("reject.test",))
    assert v.result == "pass" and v.dkim_aligned and not v.spf_aligned


def test_only_passing_results_count():
    ids = identifiers([("fail", "reject.test"), ("pass", "a.test"), ("softfail", "b.test")],
                      [("fail", "reject.test"), ("PASS", "Sig.Test"), ("pass", "")])
    assert ids == Identifiers(("a.test",), ("sig.test",))


def test_alignment_function():
    assert aligned("mail.example.co.uk", "www.example.co.uk", "r")
    assert not aligned("mail.example.co.uk", "www.example.co.uk", "s")
    assert aligned("EXAMPLE.com.", "example.com", "s")
    assert aligned("xn--exmple-cua.de", "exämple.de", "s")
    assert not aligned("", "example.com", "r")
    assert not aligned("[192.0.2.1]", "example.com", "r")


# ---------------------------------------------------------------------------- policy


@pytest.mark.parametrize("domain,action,dis", [
    ("reject.test", "reject", "reject"), ("quar.test", "quarantine", "quarantine"),
    ("none.test", "accept", "none"), ("nopolicy.test", "accept", "none"),
])
def test_policy_actions(zone_dns, domain, action, dis):
    v = verdict_for(zone_dns, domain, spf=("unrelated.test",))
    assert decide(v, Actions()) == Decision(action, dis)


def test_operator_overrides_and_exemptions(zone_dns):
    rej = verdict_for(zone_dns, "reject.test")
    quar = verdict_for(zone_dns, "quar.test")
    assert decide(rej, Actions(on_reject="quarantine")) == Decision("quarantine", "quarantine")
    assert decide(rej, Actions(on_reject="accept")) == Decision("accept", "none")
    assert decide(quar, Actions(on_quarantine="reject")) == Decision("reject", "reject")
    assert decide(quar, Actions(on_quarantine="accept")) == Decision("accept", "none")
    exempt = Actions(exempt=("test",))
    assert decide(rej, exempt) == Decision("accept", "none", exempt=True)
    assert decide(rej, Actions(exempt=("eject.test",))).action == "reject"  # not a suffix match
    assert strictest([Decision("accept", "none"), Decision("reject", "reject"),
                      Decision("quarantine", "quarantine")]).action == "reject"


def test_pct_sampling_with_a_seeded_rng(zone_dns):
    lookup = run(zone_dns, lambda r: discover_policy(r, "pct.test"))
    rng = random.Random(7489)
    verdicts = [evaluate(lookup, Identifiers(), rng) for _ in range(2000)]
    sampled = sum(v.sampled for v in verdicts)
    assert 0.25 < sampled / 2000 < 0.35
    # 6.6.4: a message not sampled gets the next lower policy: reject -> quarantine
    assert {v.requested for v in verdicts if not v.sampled} == {"quarantine"}
    assert {v.requested for v in verdicts if v.sampled} == {"reject"}
    again = [evaluate(lookup, Identifiers(), random.Random(7489)).sampled for _ in range(5)]
    assert len(set(again)) == 1  # the same seed, the same choice
    zero = verdict_for(zone_dns, "pct0.test")
    assert not zero.sampled and zero.requested == "none" and zero.policy == "quarantine"


def test_authentication_results_entries(zone_dns):
    v = verdict_for(zone_dns, "reject.test")
    assert str(method_result(v, Decision("quarantine", "quarantine"))) == \
        "dmarc=fail (p=reject dis=quarantine) header.from=reject.test"
    v = verdict_for(zone_dns, "mail.sub.test", dkim=("sub.test",))
    assert str(method_result(v, decide(v, Actions()))) == \
        "dmarc=pass (p=reject sp=quarantine dis=none) header.from=mail.sub.test"
    v = verdict_for(zone_dns, "pct.test", rng=random.Random(0))
    assert "pct=30" in str(method_result(v, decide(v, Actions())))
    v = verdict_for(zone_dns, "slow.test")
    assert str(method_result(v, decide(v, Actions()))).startswith(
        'dmarc=temperror reason="DNS timeout looking up _dmarc.slow.test TXT"')
    v = Verdict("", "permerror", PolicyLookup("", "permerror"), reason="no From header")
    assert str(method_result(v, decide(v, Actions()))) == 'dmarc=permerror reason="no From header"'


# ---------------------------------------------------------------------------- From header


def test_author_domains():
    assert author_domains(["Joe <joe@Example.COM>"]).domains == ("example.com",)
    assert not author_domains(["joe@example.com"]).problem
    one = author_domains(["a@x.test, b@y.test, c@X.test"])
    assert one.domains == ("x.test", "y.test") and "several addresses" in one.problem
    two = author_domains(["a@x.test", "b@y.test"])
    assert two.domains == ("x.test", "y.test") and "2 From headers" in two.problem
    # a repaired header: every @domain counts, so the one a MUA may show is not missed
    odd = author_domains(["a@evil.test <ceo@victim.test>"])
    assert set(odd.domains) == {"evil.test", "victim.test"} and "malformed" in odd.problem
    assert author_domains([]).domains == () and author_domains([]).problem == "no From header"
    assert author_domains(["undisclosed:;"]).domains == ()
    assert author_domains(["José <jo@exämple.de>"]).domains == ("xn--exmple-cua.de",)
    # a display name that looks like an address is not an author
    assert author_domains(['"ceo@victim.test" <a@x.test>']).domains == ("x.test",)
    assert len(author_domains([", ".join(f"a@d{i}.test" for i in range(30))]).domains) == 10


def test_several_from_domains_apply_the_strictest(zone_dns):
    ids = Identifiers(spf=("none.test",))
    outcome = run(zone_dns, lambda r: check_message(
        r, ["a@none.test, b@reject.test, c@quar.test"], ids, Actions(), random.Random(), 5))
    assert [(v.domain, v.result) for v, _ in outcome.checked] == [
        ("none.test", "pass"), ("reject.test", "fail"), ("quar.test", "fail")]
    assert outcome.decision.action == "reject" and outcome.deciding.domain == "reject.test"
    outcome = run(zone_dns, lambda r: check_message(
        r, [], ids, Actions(), random.Random(), 5))
    assert outcome.checked[0][0].result == "permerror" and outcome.decision.action == "accept"


# ---------------------------------------------------------------------------- end to end


def _keypair():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = base64.b64encode(key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
    record = f"v=DKIM1; k=rsa; p={public}"
    chunks = " ".join(f'"{record[i:i + 200]}"' for i in range(0, len(record), 200))
    return private, chunks


PRIVATE_KEY, KEY_RECORD = _keypair()

E2E_ZONE = {
    "pass.test": txt("v=spf1 ip4:127.0.0.1 -all"),  # SPF passes for a@pass.test
    "victim.test": txt("v=spf1 ip4:127.0.0.1 -all"),
    "_dmarc.victim.test": txt("v=DMARC1; p=reject"),
    "_dmarc.quar.test": txt("v=DMARC1; p=quarantine"),
    "_dmarc.exempt.test": txt("v=DMARC1; p=reject"),
    "_dmarc.signed.test": txt("v=DMARC1; p=reject; adkim=s"),
    "sel._domainkey.signed.test": {"TXT": [KEY_RECORD]},
}


class DkimVerifier:
    """A stand-in for the dkim plugin: verifies every signature with dkimpy against the test
    DNS server and records the results, before dmarc (priority 150) runs."""

    name = "test-dkim"
    priority = 100

    def __init__(self, port: int) -> None:
        self.port = port

    def txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        query = dns.message.make_query(name.decode(), "TXT")
        answer = dns.query.tcp(query, "127.0.0.1", port=self.port, timeout=timeout)
        for rrset in answer.answer:
            return b"".join(rrset[0].strings)
        return None

    @hookimpl
    @blocking
    def smtp_data(self, session, envelope, message):
        verifier = dkim.DKIM(message.data)
        for idx in range(message.count_header("DKIM-Signature")):
            try:
                ok = verifier.verify(idx=idx, dnsfunc=self.txt)
            except dkim.DKIMException:  # body hash mismatch, bad key ...
                ok = False
            add_result(envelope, MethodResult("dkim", "pass" if ok else "fail",
                                              (("header.d", verifier.domain.decode()),)))


class Recorder:
    """Keeps the authentication results of each finished transaction."""

    name = "test-recorder"
    priority = 200

    def __init__(self) -> None:
        self.seen: list[list[MethodResult]] = []

    @hookimpl
    def smtp_transaction_done(self, session, envelope, reply, queue_id):
        self.seen.append(results(envelope))


@pytest.fixture
def dmarc_server(tampu_server, make_dns):
    dns_server = make_dns(E2E_ZONE, timeout={"_dmarc.slow.test"})

    def start(dmarc_conf: str = ""):
        base = server_toml(extra=f'dns_servers = ["127.0.0.1:{dns_server.port}"]\n'
                                 "dns_timeout = 1")
        conf = {"30-spf.toml": "[plugins.spf]\nenabled = true\n",
                "34-dmarc.toml": f"[plugins.dmarc]\nenabled = true\n{dmarc_conf}\n"}
        recorder = Recorder()
        srv = tampu_server(base=base, conf=conf, users={USER: PASSWORD},
                           plugins=[DkimVerifier(dns_server.port), recorder])
        srv.recorder = recorder
        return srv
    return start


def message(author: str, body: str = "Hello.\r\n") -> bytes:
    return (f"From: {author}\r\nTo: {USER}\r\nSubject: dmarc\r\n"
            f"Message-ID: <1@client.test>\r\n\r\n{body}").encode()


def signed(author: str, domain: str = "signed.test") -> bytes:
    msg = message(author)
    sig = dkim.sign(msg, b"sel", domain.encode(), PRIVATE_KEY,
                    include_headers=[b"from", b"to", b"subject"])
    return sig + msg


def send(srv, data: bytes, sender: str = "a@pass.test"):
    with srv.smtp() as c:
        c.ehlo("client.test")
        assert c.mail(sender)[0] == 250
        assert c.rcpt(USER)[0] == 250
        return c.data(data)


def queued(srv, text: bytes) -> email.message.Message:
    qid = text.decode().rsplit(" ", 1)[-1]
    return email.message_from_bytes(srv.store.read_message_now(qid),
                                    policy=email.policy.compat32)


def dmarc_results(srv) -> list[str]:
    return [str(r) for r in srv.recorder.seen[-1] if r.method == "dmarc"]


def test_spoofed_from_is_refused_at_data(dmarc_server):
    srv = dmarc_server()
    code, text = send(srv, message("CEO <ceo@victim.test>"))
    assert code == 550 and text.decode().startswith("5.7.1 ")
    assert "victim.test" in text.decode()
    assert srv.queue_items() == []
    assert dmarc_results(srv) == ["dmarc=fail (p=reject dis=reject) header.from=victim.test"]
    assert [(r.result, r.props) for r in srv.recorder.seen[-1] if r.method == "spf"] == \
        [("pass", (("smtp.mailfrom", "a@pass.test"),))]


def test_aligned_spf_passes(dmarc_server):
    srv = dmarc_server()
    code, _ = send(srv, message("ceo@victim.test"), sender="bounces@victim.test")
    assert code == 250
    assert dmarc_results(srv) == ["dmarc=pass (p=reject dis=none) header.from=victim.test"]


def test_aligned_dkim_passes_and_a_broken_signature_fails(dmarc_server):
    srv = dmarc_server()
    code, reply = send(srv, signed("news@signed.test"))
    assert code == 250
    assert [str(r) for r in srv.recorder.seen[-1] if r.method == "dkim"] == \
        ["dkim=pass header.d=signed.test"]
    assert dmarc_results(srv) == ["dmarc=pass (p=reject dis=none) header.from=signed.test"]
    assert queued(srv, reply)["X-Tampu-DMARC"] is None
    tampered = signed("news@signed.test").replace(b"Hello.", b"Pay me.")
    code, _ = send(srv, tampered)
    assert code == 550
    assert [str(r) for r in srv.recorder.seen[-1] if r.method == "dkim"] == \
        ["dkim=fail header.d=signed.test"]


def test_quarantined_message_is_accepted_with_the_mark(dmarc_server):
    srv = dmarc_server()
    code, reply = send(srv, message("someone@quar.test"))
    assert code == 250
    msg = queued(srv, reply)
    assert msg["X-Tampu-DMARC"] == "quarantine"
    assert dmarc_results(srv) == ["dmarc=fail (p=quarantine dis=quarantine) "
                                  "header.from=quar.test"]


def test_operator_downgrades_reject_to_quarantine_with_its_own_header(dmarc_server):
    srv = dmarc_server('on_reject = "quarantine"\nquarantine_header = "X-Spam-DMARC"')
    code, reply = send(srv, message("ceo@victim.test"))
    assert code == 250
    assert queued(srv, reply)["X-Spam-DMARC"] == "quarantine"
    assert dmarc_results(srv) == ["dmarc=fail (p=reject dis=quarantine) header.from=victim.test"]


def test_exempt_domain_is_accepted_and_recorded(dmarc_server):
    srv = dmarc_server('exempt = ["Exempt.test"]')
    code, reply = send(srv, message("boss@mail.exempt.test"))
    assert code == 250
    assert queued(srv, reply)["X-Tampu-DMARC"] is None
    assert dmarc_results(srv) == [
        "dmarc=fail (p=reject dis=none exempt) header.from=mail.exempt.test"]


def test_temperror_accepts_by_default_and_can_tempfail(dmarc_server):
    srv = dmarc_server()
    code, _ = send(srv, message("a@slow.test"))
    assert code == 250
    assert dmarc_results(srv)[0].startswith("dmarc=temperror reason=")
    srv = dmarc_server('on_temperror = "tempfail"')
    start = time.monotonic()
    code, text = send(srv, message("a@slow.test"))
    assert time.monotonic() - start < 4
    assert code == 451 and text.startswith(b"4.4.3 ")


def test_authenticated_sessions_are_not_checked(dmarc_server):
    srv = dmarc_server()
    with srv.smtp("submission") as c:
        c.ehlo()
        c.starttls(context=srv.client_tls())
        c.ehlo()
        c.login(USER, PASSWORD)
        assert c.mail(USER)[0] == 250
        assert c.rcpt(USER)[0] == 250
        code, _ = c.data(message("ceo@victim.test"))
    assert code == 250
    assert dmarc_results(srv) == []
