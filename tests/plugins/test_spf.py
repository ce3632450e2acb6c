"""spf: real tampu, real DNS server serving SPF records, real SMTP clients."""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import Callable

import pytest

from tampu.plugins.spf.check import Evaluation, SpfChecker
from tampu.testing import server_toml

USER, PASSWORD = "user@example.test", "secret"

ZONE = {
    "pass.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
    "fail.test": {"TXT": ['"v=spf1 ip4:192.0.2.1 -all"']},
    "softfail.test": {"TXT": ['"v=spf1 ip4:192.0.2.1 ~all"']},
    "neutral.test": {"TXT": ['"v=spf1 ?all"']},
    "include.test": {"TXT": ['"v=spf1 include:_spf.include.test -all"']},
    "_spf.include.test": {"TXT": ['"v=spf1 ip4:127.0.0.0/8 -all"']},
    "redirect.test": {"TXT": ['"v=spf1 redirect=pass.test"']},
    "temp.test": {"TXT": ['"v=spf1 include:slow.test -all"']},
    "broken.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 bogus:x -all"']},
    "nospf.test": {"A": ["192.0.2.7"]},
    "helo-ok.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
    "helo-bad.test": {"TXT": ['"v=spf1 -all"']},
}


@pytest.fixture
def dns(make_dns):
    return make_dns(ZONE, timeout={"slow.test"})


@pytest.fixture
def spf_server(tampu_server, dns):
    def start(spf_conf: str = "", **kw):
        base = server_toml(extra=f'dns_servers = ["127.0.0.1:{dns.port}"]\ndns_timeout = 1')
        conf = {"30-spf.toml": f"[plugins.spf]\nenabled = true\n{spf_conf}\n"}
        return tampu_server(base=base, conf=conf, users={USER: PASSWORD}, **kw)
    return start


def send(srv, sender: str, *, helo: str = "client.test"):
    """MAIL FROM + RCPT + DATA over the smtp listener; returns (mail reply, data reply)."""
    with srv.smtp() as c:
        c.ehlo(helo)
        mail = c.mail(sender)
        if mail[0] != 250:
            return mail, None
        assert c.rcpt(USER)[0] == 250
        return mail, c.data(b"Subject: spf\r\n\r\nbody\r\n")


def queued_headers(srv, data_reply) -> email.message.Message:
    qid = data_reply[1].decode().rsplit(" ", 1)[-1]
    raw = srv.store.read_message_now(qid)
    return email.message_from_bytes(raw, policy=email.policy.compat32)


@pytest.mark.parametrize("sender", ["a@pass.test", "a@include.test", "a@redirect.test"])
def test_pass_is_accepted_and_recorded_in_headers(spf_server, sender):
    srv = spf_server()
    mail, data = send(srv, sender)
    assert mail[0] == 250 and data[0] == 250
    msg = queued_headers(srv, data)
    assert msg["Received-SPF"].lower().startswith("pass")
    assert "client-ip=127.0.0.1" in msg["Received-SPF"]
    assert "identity=mailfrom" in msg["Received-SPF"]
    ar = " ".join(msg["Authentication-Results"].split())
    assert ar.startswith("localhost; spf=pass")
    assert f"smtp.mailfrom={sender}" in ar


def test_fail_is_rejected_with_chasquid_reply(spf_server, dns):
    srv = spf_server()
    mail, data = send(srv, "a@fail.test")
    assert data is None
    assert mail[0] == 550
    assert mail[1].decode().startswith("5.7.23 SPF check failed: ")
    assert ("fail.test.", "TXT") in dns.queries  # our configured server was asked


@pytest.mark.parametrize("sender,result", [
    ("a@softfail.test", "softfail"), ("a@neutral.test", "neutral"), ("a@nospf.test", "none"),
    ("a@broken.test", "permerror"),
])
def test_other_results_are_accepted_by_default(spf_server, sender, result):
    srv = spf_server()
    mail, data = send(srv, sender)
    assert mail[0] == 250 and data[0] == 250
    msg = queued_headers(srv, data)
    assert msg["Received-SPF"].lower().startswith(result)
    assert f"spf={result}" in msg["Authentication-Results"]


def test_temperror_from_an_unanswered_include(spf_server):
    srv = spf_server()
    start = time.monotonic()
    mail, data = send(srv, "a@temp.test")
    assert time.monotonic() - start < 4  # bounded by dns_timeout = 1
    assert mail[0] == 250 and data[0] == 250
    msg = queued_headers(srv, data)
    assert msg["Received-SPF"].lower().startswith("temperror")


def test_actions_are_configurable(spf_server):
    srv = spf_server('on_softfail = "tempfail"\non_temperror = "reject"\non_fail = "accept"')
    mail, _ = send(srv, "a@softfail.test")
    assert mail[0] == 451 and mail[1].startswith(b"4.7.23 ")
    mail, _ = send(srv, "a@temp.test")
    assert mail[0] == 550 and mail[1].startswith(b"5.7.24 ")
    mail, data = send(srv, "a@fail.test")
    assert mail[0] == 250 and data[0] == 250
    assert queued_headers(srv, data)["Received-SPF"].lower().startswith("fail")


def test_null_sender_checks_the_helo_identity(spf_server):
    srv = spf_server()
    mail, data = send(srv, "<>", helo="helo-ok.test")
    assert mail[0] == 250 and data[0] == 250
    msg = queued_headers(srv, data)
    assert "identity=helo" in msg["Received-SPF"]
    assert "smtp.helo=helo-ok.test" in msg["Authentication-Results"]
    mail, _ = send(srv, "<>", helo="helo-bad.test")
    assert mail[0] == 550 and mail[1].startswith(b"5.7.23")


def test_authenticated_sessions_are_not_checked(spf_server, dns):
    srv = spf_server()
    with srv.smtp("submission") as c:
        c.ehlo()
        c.starttls(context=srv.client_tls())
        c.ehlo()
        c.login(USER, PASSWORD)
        assert c.mail("a@fail.test")[0] == 250
        assert c.rcpt(USER)[0] == 250
        data = c.data(b"Subject: x\r\n\r\nbody\r\n")
    assert data[0] == 250
    msg = queued_headers(srv, data)
    assert msg["Received-SPF"] is None and msg["Authentication-Results"] is None
    assert ("fail.test.", "TXT") not in dns.queries


def test_result_is_per_transaction(spf_server):
    srv = spf_server()
    with srv.smtp() as c:
        c.ehlo()
        assert c.mail("a@fail.test")[0] == 550
        assert c.mail("a@pass.test")[0] == 250
        assert c.rcpt(USER)[0] == 250
        data = c.data(b"Subject: x\r\n\r\nbody\r\n")
    assert queued_headers(srv, data)["Received-SPF"].lower().startswith("pass")


def test_checker_uses_only_the_configured_server(dns):
    checker = SpfChecker([f"127.0.0.1:{dns.port}"], 1.0, 5.0, "mx.test")
    ev = checker.check("127.0.0.1", "x@include.test", "h.test")
    assert (ev.result.result, ev.result.identity, ev.result.domain) == \
        ("pass", "x@include.test", "include.test")
    assert ev.result.passed and ev.scope == "mailfrom"
    assert ("_spf.include.test.", "TXT") in dns.queries
    ev = checker.check("::ffff:127.0.0.1", "x@fail.test", "h.test")  # mapped IPv4
    assert ev.result.result == "fail" and ev.result.explanation


def test_dns_answer_change_is_seen(spf_server, dns):
    srv = spf_server()
    dns.set("fail.test", "TXT", ['"v=spf1 ip4:127.0.0.1 -all"'])
    mail, data = send(srv, "a@fail.test")
    assert mail[0] == 250 and data[0] == 250


def _twice(checker: SpfChecker, change: Callable[[], None]) -> tuple[Evaluation, ...]:
    async def run() -> tuple[Evaluation, ...]:
        first = await checker.check_async("127.0.0.1", "x@include.test", "h.test")
        change()
        second = await checker.check_async("127.0.0.1", "x@include.test", "h.test")
        other_ip = await checker.check_async("192.0.2.9", "x@include.test", "h.test")
        checker.dns.close()
        return first, second, other_ip
    return asyncio.run(run())


def test_an_evaluation_is_kept_while_its_answers_are_cached(dns):
    checker = SpfChecker([f"127.0.0.1:{dns.port}"], 1.0, 5.0, "mx.test")
    asked = []

    def change() -> None:
        asked.append(len(dns.queries))
        dns.set("_spf.include.test", "TXT", ['"v=spf1 -all"'])

    first, second, other_ip = _twice(checker, change)
    assert first.result.result == "pass"
    assert second is first  # the same evaluation: its answers are still within their TTL
    assert other_ip.result.result == "fail"  # another client is evaluated (cached answers)
    assert len(dns.queries) == asked[0]  # no DNS query for either


def test_answers_with_ttl_0_keep_no_evaluation(make_dns):
    dns = make_dns(ZONE, ttl=0)
    checker = SpfChecker([f"127.0.0.1:{dns.port}"], 1.0, 5.0, "mx.test")
    first, second, _ = _twice(
        checker, lambda: dns.set("_spf.include.test", "TXT", ['"v=spf1 -all"']))
    assert (first.result.result, second.result.result) == ("pass", "fail")


@pytest.mark.parametrize(("sender", "helo", "asked"), [
    ("x@Pass.Test", "h.test", [("pass.test.", "TXT")]),  # asked in pyspf's spelling
    ("x@include.test", "h.test", [("include.test.", "TXT"), ("_spf.include.test.", "TXT")]),
    ("", "helo-ok.test", [("helo-ok.test.", "TXT")]),  # the null sender: the HELO's record
])
def test_each_name_is_asked_once_and_a_plain_record_runs_pyspf_once(make_dns, sender, helo,
                                                                      asked):
    """With TTL 0 nothing is cached: every evaluation asks DNS. The identity's TXT record is
    looked up before pyspf runs (it is always pyspf's first question, asked in pyspf's
    spelling), so a record that needs nothing more is evaluated in one run."""
    dns = make_dns(ZONE, ttl=0)
    checker = SpfChecker([f"127.0.0.1:{dns.port}"], 1.0, 5.0, "mx.test")
    runs: list[str] = []
    real_check = checker.check

    def counting_check(ip: str, s: str, h: str) -> Evaluation:
        runs.append(s)
        return real_check(ip, s, h)

    checker.check = counting_check

    async def run() -> Evaluation:
        try:
            return await checker.check_async("127.0.0.1", sender, helo)
        finally:
            checker.dns.close()

    before = len(dns.queries)
    evaluation = asyncio.run(run())
    assert evaluation.result.result == "pass"
    assert dns.queries[before:] == asked
    assert len(runs) == len(asked)  # one run, and one more per name looked up after it
