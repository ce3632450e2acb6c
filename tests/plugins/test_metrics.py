"""metrics: real tampu, real SMTP traffic, scraped over HTTP with urllib and parsed."""

from __future__ import annotations

import smtplib
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tampu import hookimpl
from tampu.testing import server_toml

USER, PASSWORD = "user@example.test", "secret"
ZONE = {
    "pass.test": {"TXT": ['"v=spf1 ip4:127.0.0.1 -all"']},
    "fail.test": {"TXT": ['"v=spf1 ip4:192.0.2.1 -all"']},
}
METRICS = "[plugins.metrics]\nenabled = true\naddress = \"127.0.0.1:0\"\n"


class Boom:
    """A plugin that fails on HELO boom.test (to see failures counted and shown)."""

    name = "boom"

    @hookimpl
    def smtp_helo(self, hostname: str) -> None:
        if hostname == "boom.test":
            raise RuntimeError("boom on purpose")


def http(srv, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    port = srv.server.registry.plugins["metrics"].obj.port
    assert port > 0
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(srv) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, ctype, text = http(srv)
    assert status == 200 and ctype.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(metrics, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def metrics_server(tampu_server, make_dns):
    dns = make_dns(ZONE)
    base = server_toml(extra=f'dns_servers = ["127.0.0.1:{dns.port}"]\ndns_timeout = 1')
    conf = {
        "30-spf.toml": "[plugins.spf]\nenabled = true\n",
        "40-deliver.toml": "[plugins.delivery_maildir]\nenabled = true\n"
                           "[plugins.dsn]\nenabled = true\n",
        "60-metrics.toml": METRICS,
    }
    return tampu_server(base=base, conf=conf, users={USER: PASSWORD}, deliver=True,
                        plugins=[Boom()])


def test_counts_real_traffic(metrics_server):
    srv = metrics_server
    msg = b"Subject: m\r\n\r\nbody\r\n"
    with srv.smtp() as c:  # two transactions, one session, SPF pass each
        c.ehlo("client.test")
        c.sendmail("a@pass.test", [USER], msg)
        c.sendmail("b@pass.test", [USER], msg)
    with srv.smtp() as c:  # SPF fail: refused at MAIL, counted at disconnect
        c.ehlo("client.test")
        assert c.mail("a@fail.test")[0] == 550
    with srv.smtp() as c:  # refused at DATA (loop detection): a 5xx transaction
        c.ehlo("client.test")
        assert c.mail("a@pass.test")[0] == 250
        assert c.rcpt(USER)[0] == 250
        code, _ = c.data(b"Received: x\r\n" * 60 + msg)
        assert code == 554
    with srv.smtp("submission") as c:  # one AUTH failure, one success, one undeliverable
        c.starttls(context=srv.client_tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            c.login(USER, "wrong")
        c.login(USER, PASSWORD)
        c.sendmail(USER, ["x@remote.example"], msg)  # no remote backend: fails, DSN to USER
    with srv.smtp() as c:
        assert c.ehlo("boom.test")[0] == 451

    wait_for(lambda: not srv.queue_items()
             and get(scrape(srv), "tampu_delivery_attempts_total", backend="delivery_maildir",
                     result="sent") == 3)
    m = scrape(srv)
    assert get(m, "tampu_transactions_total", listener="smtp", reply="2xx") == 2
    assert get(m, "tampu_transactions_total", listener="smtp", reply="5xx") == 1
    assert get(m, "tampu_transactions_total", listener="submission", reply="2xx") == 1
    assert get(m, "tampu_spf_results_total", result="pass") == 3
    assert get(m, "tampu_spf_results_total", result="fail") == 1
    assert get(m, "tampu_auth_attempts_total", result="success") == 1
    # smtplib's login() tries PLAIN, then LOGIN: two failed attempts
    assert get(m, "tampu_auth_attempts_total", result="failure") == 2
    assert get(m, "tampu_messages_queued_total", origin="smtp") == 3
    assert get(m, "tampu_messages_queued_total", origin="dsn") == 1
    assert get(m, "tampu_dsn_sent_total") == 1
    # two to USER, one DSN to USER; the remote recipient found no backend
    assert get(m, "tampu_delivery_attempts_total", backend="core", result="permanent") == 1
    # refusals by stage, deciding plugin and code
    assert get(m, "tampu_refusals_total", stage="mail", plugin="spf", code="550") == 1
    assert get(m, "tampu_refusals_total", stage="data", plugin="loopdetect", code="554") == 1
    assert get(m, "tampu_refusals_total", stage="helo", plugin="boom", code="451") == 1
    assert get(m, "tampu_authentication_results_total", method="spf", result="pass") == 3
    assert get(m, "tampu_connections_total", listener="smtp") == 4
    assert get(m, "tampu_connections_total", listener="submission") == 1
    wait_for(lambda: get(scrape(srv), "tampu_connections_open", listener="smtp") == 0)
    assert get(m, "tampu_hook_duration_seconds_count", hook="smtp_rcpt_to",
               plugin="localusers") >= 1  # sampled: the first call, then 1 in 16
    assert get(m, "tampu_hook_failures_total", hook="smtp_helo", plugin="boom",
               outcome="error") == 1
    assert get(m, "tampu_queue_items") == 0


def test_queue_gauges_and_status_page(tampu_server):
    srv = tampu_server(conf={"60-metrics.toml": METRICS}, users={USER: PASSWORD},
                       plugins=[Boom()])
    with srv.smtp() as c:
        c.sendmail("a@example.org", [USER], b"Subject: q\r\n\r\nwaits\r\n")
        assert c.ehlo("boom.test")[0] == 451
    time.sleep(1.1)  # so that the oldest item is at least a second old
    m = scrape(srv)
    assert get(m, "tampu_queue_items") == 1
    assert 1.0 <= get(m, "tampu_queue_oldest_age_seconds") < 60

    status, ctype, page = http(srv, "/")
    assert status == 200 and ctype.startswith("text/html")
    assert "1 item(s)" in page
    for name in ("smtp", "submission", "submissions"):
        assert f"<td>{name}</td>" in page
    assert "smtp_rcpt_to" in page and "localusers → relay" in page
    assert "smtp_verdict" in page
    assert "plugin boom failed in smtp_helo" in page  # the recent error
    assert http(srv, "/nope")[0] == 404
    assert http(srv, "/metrics", method="POST")[0] == 405


def test_registry_per_server_and_kept_across_reload(tampu_server):
    one = tampu_server(conf={"60-metrics.toml": METRICS}, users={USER: PASSWORD})
    two = tampu_server(conf={"60-metrics.toml": METRICS}, users={USER: PASSWORD})
    with one.smtp() as c:
        c.sendmail("a@example.org", [USER], b"Subject: 1\r\n\r\nx\r\n")
    assert get(scrape(one), "tampu_transactions_total", listener="smtp", reply="2xx") == 1
    assert get(scrape(two), "tampu_transactions_total", listener="smtp", reply="2xx") == 0

    port = one.server.registry.plugins["metrics"].obj.port
    assert one.call(one.server.reload()) is True
    assert one.server.registry.plugins["metrics"].obj.port == port  # same listener
    with one.smtp() as c:
        c.sendmail("a@example.org", [USER], b"Subject: 2\r\n\r\nx\r\n")
    m = scrape(one)
    assert get(m, "tampu_transactions_total", listener="smtp", reply="2xx") == 2
    # hooks of the new configuration are observed too (each first call is timed)
    assert get(m, "tampu_hook_duration_seconds_count", hook="smtp_data", plugin="loopdetect") == 2
