"""MTA-STS (RFC 8461): parsing, the policy cache, the HTTPS fetch and enforcement in delivery.

All real: a DNS server on loopback, an HTTPS policy server on loopback with a trustme
certificate, receiving SMTP servers on 127.0.0.x, tampu delivering to them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tampu.dns import Resolver
from tampu.plugins.delivery_smtp.mta_sts import (
    MAX_AGE_LIMIT,
    MtaSts,
    Policy,
    PolicyCache,
    PolicyError,
    PolicyFetcher,
    mx_matches,
    parse_policy,
    parse_txt,
)
from tampu.plugins.delivery_smtp.tls_policy import verified_context
from tampu.testing import wait_for
from tests.plugins.delivery_kit import Recorder
from tests.plugins.outbound_kit import PolicyServer, policy_text, start_dns
from tests.plugins.remote_kit import MXFarm, free_port, remote_conf, server_tls, submit, write_ca

# ---------------------------------------------------------------------------- parsing


def test_txt_record():
    assert parse_txt(["v=STSv1; id=20240101T000000"]) == "20240101T000000"
    assert parse_txt(["v=STSv1;id=abc;"]) == "abc"
    assert parse_txt(["v=spf1 -all", "v=STSv1; id=abc; ext=1"]) == "abc"  # others discarded
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # not exactly one
    assert parse_txt([]) is None
    assert parse_txt(["v=STSv1"]) is None  # no id
    assert parse_txt(["v=STSv1; id=has-dash"]) is None
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_txt(["v=STSv1; id=a; id=b"]) is None
    assert parse_txt(["v=STSv10; id=a"]) is None


def test_policy_text():
    text = "version: STSv1\r\nmode: enforce\r\nmx: mail.Example.com.\r\nmx: *.example.net\r\n" \
           "max_age: 604800\r\nfuture_key: whatever\r\n"
    assert parse_policy(text) == Policy("enforce", ("mail.example.com", "*.example.net"),
                                        604800)
    lf = "version: STSv1\nmode:testing\nmx: a.test\nmax_age:   86400  \n"
    assert parse_policy(lf) == Policy("testing", ("a.test",), 86400)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 1\n").mx == ()
    assert parse_policy(policy_text("enforce", "a.test", max_age=9_999_999_999)).max_age \
        == MAX_AGE_LIMIT
    for bad in ("", "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
                "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1\n",
                "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 12345678901\n",
                "version: STSv1\nmode: enforce\nmx: mx*.a.test\nmax_age: 1\n",
                "<html>version: STSv1</html>"):
        with pytest.raises(PolicyError):
            parse_policy(bad)


def test_mx_patterns():
    assert mx_matches("mail.example.com", "MAIL.example.com.")
    assert mx_matches("*.example.com", "mx1.example.com")
    assert not mx_matches("*.example.com", "example.com")
    assert not mx_matches("*.example.com", "a.b.example.com")
    assert not mx_matches("mail.example.com", "evil.mail.example.com")
    assert not mx_matches("*.example.com", "mx1.example.com.evil.test")
    assert mx_matches("xn--caf-dma.test", "café.test")  # IDNs compare in A-label form


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_host = st.lists(_label, min_size=2, max_size=4).map(".".join)


@given(mode=st.sampled_from(["enforce", "testing", "none"]),
       mx=st.lists(st.tuples(st.booleans(), _host), max_size=5),
       max_age=st.integers(0, 10**10 - 1), lf=st.booleans())
def test_policy_round_trip(mode, mx, max_age, lf):
    patterns = tuple(("*." if wild else "") + host for wild, host in mx)
    if mode != "none" and not patterns:
        patterns = ("mx.example.test",)
    text = policy_text(mode, *patterns, max_age=max_age)
    if lf:
        text = text.replace("\r\n", "\n")
    policy = parse_policy(text)
    assert policy == Policy(mode, patterns, min(max_age, MAX_AGE_LIMIT))
    assert parse_policy(policy.to_text()) == policy
    assert Policy.from_json(json.loads(json.dumps(policy.to_json()))) == policy


@given(st.text(max_size=300))
def test_policy_parser_never_crashes(text):
    try:
        policy = parse_policy(text)
    except PolicyError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert 0 <= policy.max_age <= MAX_AGE_LIMIT


@given(st.lists(st.one_of(st.text(max_size=60),
                          st.text(max_size=40).map(lambda t: "v=STSv1; " + t)), max_size=4))
def test_txt_parser_never_crashes(texts):
    found = parse_txt(texts)
    assert found is None or re.fullmatch(r"[A-Za-z0-9]{1,32}", found)


@given(label=_label, domain=_host)
def test_wildcard_is_one_label(label, domain):
    assert mx_matches(f"*.{domain}", f"{label}.{domain}")
    assert not mx_matches(f"*.{domain}", domain)
    assert not mx_matches(f"*.{domain}", f"x.{label}.{domain}")


# ---------------------------------------------------------------------------- fetch and cache

ZONE = {
    "_mta-sts.remote.test": {"TXT": ['"v=STSv1; id=one"']},
    "mta-sts.remote.test": {"A": ["127.0.0.1"]},
}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ca_file(tampu_ca, tmp_path):
    return write_ca(tampu_ca, tmp_path / "ca.pem")


@pytest.fixture
def policy_server(tampu_ca):
    with PolicyServer(tampu_ca, "mta-sts.remote.test", "mta-sts.far.test",
                      "mta-sts.one.test") as server:
        yield server


@pytest.fixture
def sts_dns():
    dns = start_dns(ZONE)
    yield dns
    dns.stop()


def lookups(dns, policy_server, ca_file, directory, clock, *steps):
    """Run ``MtaSts.policy`` once per step (a callable run before it); returns the results."""

    async def run():
        resolver = Resolver([("127.0.0.1", dns.port)], timeout=2)
        fetch = PolicyFetcher(resolver, tls=verified_context(ca_file), port=policy_server.port,
                              timeout=5)
        sts = MtaSts(resolver, PolicyCache(directory), fetch, clock=clock)
        out = []
        try:
            for step in steps:
                step()
                out.append(await sts.policy("remote.test"))
        finally:
            resolver.close()
        return out

    return asyncio.run(run())


def nothing():
    pass


def test_policy_is_cached_and_fetched_again_when_the_id_changes(sts_dns, policy_server,
                                                                ca_file, tmp_path):
    policy_server.serve("remote.test", policy_text("enforce", "mx1.remote.test"))
    clock = Clock()

    def new_id():
        sts_dns.set("_mta-sts.remote.test", "TXT", ['"v=STSv1; id=two"'])
        policy_server.serve("remote.test", policy_text("testing", "*.remote.test"))

    first, again, changed = lookups(sts_dns, policy_server, ca_file, tmp_path / "c", clock,
                                    nothing, nothing, new_id)
    assert first is not None and first.mode == "enforce" and first.id == "one"
    assert first.label == "MTA-STS policy for remote.test (enforce)"
    assert again == first
    assert changed is not None and (changed.mode, changed.id) == ("testing", "two")
    assert policy_server.fetches("remote.test") == 2  # not for the second lookup
    assert policy_server.sni == ["mta-sts.remote.test"] * 2
    cached = json.loads((tmp_path / "c" / "remote.test.json").read_text())
    assert cached["id"] == "two"
    assert cached["policy"] == {"version": "STSv1", "mode": "testing", "mx": ["*.remote.test"],
                                "max_age": 86400}
    assert cached["expires"] == cached["fetched"] + 86400


def test_cache_survives_a_restart_and_expires(sts_dns, policy_server, ca_file, tmp_path):
    policy_server.serve("remote.test", policy_text("enforce", "mx1.remote.test", max_age=600))
    clock = Clock()
    lookups(sts_dns, policy_server, ca_file, tmp_path / "c", clock, nothing)

    def later():
        clock.now += 299  # less than half of max_age: no refresh

    (again,) = lookups(sts_dns, policy_server, ca_file, tmp_path / "c", clock, later)
    assert again is not None and again.mode == "enforce"
    assert policy_server.fetches("remote.test") == 1  # a new MtaSts read it from disk

    def half_life():
        clock.now += 2  # past half of max_age: refreshed, same id

    def expired_and_gone():
        clock.now += 601
        sts_dns.set("_mta-sts.remote.test", "TXT", [])
        policy_server.policies.clear()

    refreshed, gone = lookups(sts_dns, policy_server, ca_file, tmp_path / "c", clock,
                              half_life, expired_and_gone)
    assert refreshed is not None and policy_server.fetches("remote.test") == 2
    assert gone is None  # expired, and no TXT record any more


def test_failed_fetch_keeps_the_cached_policy_and_waits_before_retrying(
        sts_dns, policy_server, ca_file, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "tampu.plugins.delivery_smtp")
    policy_server.serve("remote.test", policy_text("enforce", "mx1.remote.test"))
    clock = Clock()

    def broken_new_id():
        sts_dns.set("_mta-sts.remote.test", "TXT", ['"v=STSv1; id=two"'])
        policy_server.serve("remote.test", "oops", status=500)

    def soon():
        clock.now += 60

    def after_five_minutes():
        clock.now += 300
        policy_server.serve("remote.test", policy_text("testing", "mx1.remote.test"))

    results = lookups(sts_dns, policy_server, ca_file, tmp_path / "c", clock, nothing,
                      broken_new_id, soon, after_five_minutes)
    assert [r.mode if r else None for r in results] == ["enforce", "enforce", "enforce",
                                                        "testing"]
    assert [r.id for r in results if r] == ["one", "one", "one", "two"]
    assert policy_server.fetches("remote.test") == 3  # not again within five minutes
    assert any("HTTP 500" in r.getMessage() and "using the cached policy" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("served, why", [
    ({"status": 301, "headers": {"Location": "https://mta-sts.far.test/.well-known/"
                                 "mta-sts.txt"}}, "HTTP 301"),
    ({"content_type": "text/html"}, "not text/plain"),
    ({"body": "x" * (64 * 1024 + 1)}, "larger than"),
    ({"body": b"\xff\xfe"}, "not UTF-8"),
    ({"body": "version: STSv1\nmode: enforce\nmax_age: 5\n"}, "without mx"),
])
def test_a_bad_answer_is_no_policy(sts_dns, policy_server, ca_file, tmp_path, caplog,
                                   served, why):
    caplog.set_level(logging.WARNING, "tampu.plugins.delivery_smtp")
    served = {"body": policy_text("enforce", "mx1.remote.test"), **served}
    policy_server.serve("remote.test", **served)
    policy_server.serve("far.test", policy_text("enforce", "evil.test"))
    (result,) = lookups(sts_dns, policy_server, ca_file, tmp_path / "c", Clock(), nothing)
    assert result is None
    assert policy_server.fetches("far.test") == 0  # the redirect was not followed
    assert any(why in r.getMessage() and "as if the domain had no policy" in r.getMessage()
               for r in caplog.records)
    assert not (tmp_path / "c" / "remote.test.json").exists()


def test_policy_host_certificate_must_be_valid_for_its_name(tampu_ca, sts_dns, ca_file,
                                                            tmp_path, caplog):
    caplog.set_level(logging.WARNING, "tampu.plugins.delivery_smtp")
    with PolicyServer(tampu_ca, "www.remote.test") as wrong:
        wrong.serve("remote.test", policy_text("enforce", "mx1.remote.test"))
        (result,) = lookups(sts_dns, wrong, ca_file, tmp_path / "c", Clock(), nothing)
    assert result is None
    assert wrong.sni == ["mta-sts.remote.test"]
    assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() or
               "certificate verify failed" in r.getMessage() for r in caplog.records)


def test_mode_none_is_no_policy(sts_dns, policy_server, ca_file, tmp_path):
    policy_server.serve("remote.test", "version: STSv1\nmode: none\nmax_age: 86400\n")
    (result,) = lookups(sts_dns, policy_server, ca_file, tmp_path / "c", Clock(), nothing)
    assert result is None
    assert json.loads((tmp_path / "c" / "remote.test.json").read_text())["policy"]["mode"] \
        == "none"  # cached all the same: it replaces an earlier enforce policy


# ---------------------------------------------------------------------------- delivery

DELIVERY_ZONE = {
    **ZONE,
    "remote.test": {"MX": ["10 mx1.remote.test.", "20 mx2.remote.test."]},
    "mx1.remote.test": {"A": ["127.0.0.2"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "one.test": {"MX": ["10 mx1.remote.test."]},
    "_mta-sts.one.test": {"TXT": ['"v=STSv1; id=1"']},
    "mta-sts.one.test": {"A": ["127.0.0.1"]},
}


@pytest.fixture
def farm():
    farm = MXFarm(free_port())
    yield farm
    farm.stop_all()


@pytest.fixture
def remote(tampu_server, tampu_ca, farm, policy_server, tmp_path):
    """Start tampu delivering with MTA-STS against the zone, the farm and the policy server."""
    dns = start_dns(DELIVERY_ZONE)
    ca_file = write_ca(tampu_ca, tmp_path / "ca.pem")

    def start(extra: str = ""):
        recorder = Recorder()
        conf = remote_conf(dns.port, farm.port, ca_file=ca_file, smtp_extra=(
            f"mta_sts_port = {policy_server.port}\nmta_sts_timeout = 5\n{extra}"))
        srv = tampu_server(plugins=[recorder], **conf)
        return srv, recorder

    start.dns = dns
    yield start
    dns.stop()


def test_enforce_delivers_to_a_listed_mx_over_verified_tls(remote, farm, tampu_ca,
                                                           policy_server):
    policy_server.serve("remote.test", policy_text("enforce", "*.remote.test"))
    mx1 = farm.start("127.0.0.2", tls=server_tls(tampu_ca, "mx1.remote.test"))
    srv, rec = remote()
    submit(srv, ["bob@remote.test"])
    got = wait_for(lambda: mx1.received, what="delivery to mx1")
    assert got[0].tls
    assert rec.first("bob@remote.test").status == "sent"
    cache = srv.server.config.data_dir / "mta-sts" / "remote.test.json"
    assert json.loads(cache.read_text())["policy"]["mode"] == "enforce"


def test_enforce_skips_an_mx_the_policy_does_not_list(remote, farm, tampu_ca, policy_server):
    policy_server.serve("remote.test", policy_text("enforce", "mx2.remote.test"))
    mx1 = farm.start("127.0.0.2", tls=server_tls(tampu_ca, "mx1.remote.test"))
    mx2 = farm.start("127.0.0.3", tls=server_tls(tampu_ca, "mx2.remote.test"))
    srv, rec = remote()
    submit(srv, ["carol@remote.test"])
    got = wait_for(lambda: mx2.received, what="delivery to mx2")
    assert got[0].rcpt_tos == ["carol@remote.test"]
    assert mx1.rcpt_seen == []
    assert rec.first("carol@remote.test").remote == "mx2.remote.test [127.0.0.3]"


def test_enforce_refuses_when_no_mx_is_listed(remote, farm, tampu_ca, policy_server):
    policy_server.serve("remote.test", policy_text("enforce", "mx.elsewhere.test"))
    mx1 = farm.start("127.0.0.2", tls=server_tls(tampu_ca, "mx1.remote.test"))
    srv, rec = remote()
    submit(srv, ["dave@remote.test"])
    result = rec.first("dave@remote.test")
    assert result.status == "temporary"
    assert result.text == ("MTA-STS policy for remote.test (enforce) does not allow "
                           "mx2.remote.test (mx: mx.elsewhere.test)")
    assert result.enhanced == "4.7.5"
    assert mx1.rcpt_seen == []
    assert srv.queue_items()  # kept for a later attempt


def test_enforce_refuses_a_certificate_not_valid_for_the_mx(remote, farm, tampu_ca,
                                                            policy_server):
    policy_server.serve("one.test", policy_text("enforce", "mx1.remote.test"))
    mx1 = farm.start("127.0.0.2", tls=server_tls(tampu_ca, "other.test"))
    srv, rec = remote()
    submit(srv, ["erin@one.test"])
    result = rec.first("erin@one.test")
    assert result.status == "temporary"
    assert result.text.startswith("MTA-STS policy for one.test (enforce) requires TLS with a "
                                  "certificate valid for mx1.remote.test: TLS with "
                                  "mx1.remote.test failed:")
    assert "certificate verify failed" in result.text
    assert result.remote == "mx1.remote.test [127.0.0.2]"
    assert mx1.rcpt_seen == []  # no unverified or plaintext fallback


def test_enforce_refuses_an_mx_without_starttls(remote, farm, policy_server):
    policy_server.serve("one.test", policy_text("enforce", "mx1.remote.test"))
    mx1 = farm.start("127.0.0.2")  # no TLS at all
    srv, rec = remote()
    submit(srv, ["gus@one.test"])
    result = rec.first("gus@one.test")
    assert result.text == ("MTA-STS policy for one.test (enforce) requires TLS with a "
                           "certificate valid for mx1.remote.test, but mx1.remote.test does "
                           "not offer STARTTLS")
    assert mx1.rcpt_seen == []
    qid = wait_for(lambda: srv.queue_items(), what="the item in the queue")[0]
    assert srv.store.load_now(qid).recipients[0].last_error == result.text


def test_testing_mode_delivers_and_says_what_enforce_would_refuse(remote, farm, policy_server,
                                                                  caplog):
    caplog.set_level(logging.WARNING, "tampu.plugins.delivery_smtp")
    policy_server.serve("remote.test", policy_text("testing", "mx.elsewhere.test"))
    mx1 = farm.start("127.0.0.2")  # plain text, and not listed
    srv, rec = remote()
    submit(srv, ["hal@remote.test"])
    got = wait_for(lambda: mx1.received, what="delivery despite the testing policy")
    assert not got[0].tls
    result = rec.first("hal@remote.test")
    assert result.status == "sent"
    assert "MTA-STS policy for remote.test (testing): enforce would not allow " \
           "mx1.remote.test" in result.text
    assert "enforce would refuse mx1.remote.test: connection plain" in result.text
    messages = [r.getMessage() for r in caplog.records]
    assert any("enforce would not allow mx1.remote.test (delivering anyway)" in m
               for m in messages)


def test_mode_none_changes_nothing(remote, farm, policy_server):
    policy_server.serve("remote.test", "version: STSv1\nmode: none\nmax_age: 86400\n")
    mx1 = farm.start("127.0.0.2")
    srv, rec = remote()
    submit(srv, ["ivy@remote.test"])
    wait_for(lambda: mx1.received, what="plain delivery")
    assert rec.first("ivy@remote.test").text == "2.0.0 Stored"  # no note
    assert policy_server.fetches("remote.test") == 1


def test_disabled_mta_sts_fetches_nothing(remote, farm, policy_server):
    policy_server.serve("remote.test", policy_text("enforce", "mx.elsewhere.test"))
    mx1 = farm.start("127.0.0.2")
    srv, rec = remote(extra="mta_sts = false")
    submit(srv, ["jo@remote.test"])
    wait_for(lambda: mx1.received, what="delivery without MTA-STS")
    assert policy_server.fetches("remote.test") == 0


def test_a_new_policy_id_applies_to_later_mail(remote, farm, tampu_ca, policy_server):
    policy_server.serve("remote.test", policy_text("enforce", "*.remote.test"))
    mx1 = farm.start("127.0.0.2", tls=server_tls(tampu_ca, "mx1.remote.test"))
    mx2 = farm.start("127.0.0.3", tls=server_tls(tampu_ca, "mx2.remote.test"))
    srv, rec = remote()
    submit(srv, ["kim@remote.test"])
    wait_for(lambda: mx1.received, what="first delivery")
    submit(srv, ["lee@remote.test"])
    wait_for(lambda: len(mx1.received) == 2, what="second delivery, cached policy")
    assert policy_server.fetches("remote.test") == 1

    remote.dns.set("_mta-sts.remote.test", "TXT", ['"v=STSv1; id=two"'])
    policy_server.serve("remote.test", policy_text("enforce", "mx2.remote.test"))
    submit(srv, ["max@remote.test"])
    got = wait_for(lambda: mx2.received, what="delivery under the new policy")
    assert got[0].rcpt_tos == ["max@remote.test"]
    assert policy_server.fetches("remote.test") == 2
    assert "max@remote.test" not in mx1.rcpt_seen


def test_reload_reuses_the_dns_client(remote, farm, policy_server):
    policy_server.serve("remote.test", policy_text("testing", "*.remote.test"))
    mx1 = farm.start("127.0.0.2")
    srv, rec = remote()
    before = srv.server.registry.plugins["delivery_smtp"].obj
    submit(srv, ["nia@remote.test"])
    wait_for(lambda: mx1.received, what="a delivery (the DNS client has sockets now)")
    assert srv.call(srv.server.reload())
    after = srv.server.registry.plugins["delivery_smtp"].obj
    assert after is not before
    assert after.outbound.resolver is before.outbound.resolver  # not a second set of sockets
    submit(srv, ["oz@remote.test"])
    wait_for(lambda: len(mx1.received) == 2, what="a delivery after the reload")
