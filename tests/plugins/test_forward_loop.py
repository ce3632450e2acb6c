"""Two tampu servers whose aliases forward to each other: the loop ends (loop detection), the
rewritten sender never grows, and the original sender gets exactly one report."""

from __future__ import annotations

import time

from aiosmtpd.controller import Controller

from tampu.testing import server_toml, wait_for
from tests.helpers import free_ports
from tests.plugins.remote_kit import Sink

CONF = """
[plugins.aliases]
enabled = true
[plugins.loopdetect]
max_received = 8
[plugins.delivery_smtp]
enabled = true
port = {port}
connect_timeout = 3
command_timeout = 3
data_timeout = 3
[plugins.dsn]
enabled = true
"""


def base(domain: str, port: int, dns_port: int) -> str:
    text = server_toml(domains=(domain,), extra=f'dns_servers = ["127.0.0.1:{dns_port}"]')
    return text.replace('kind = "smtp"\naddresses = ["127.0.0.1:0"]',
                        f'kind = "smtp"\naddresses = ["127.0.0.1:{port}"]', 1)


def test_forwarding_loop_ends_with_one_report_to_the_original_sender(tampu_server, make_dns):
    port_a, port_b = free_ports(2)
    dns = make_dns({"a.test": {"MX": ["10 mx.a.test."]}, "mx.a.test": {"A": ["127.0.0.1"]},
                    "b.test": {"MX": ["10 mx.b.test."]}, "mx.b.test": {"A": ["127.0.0.1"]},
                    "orig.test": {"MX": ["10 mx.orig.test."]},
                    "mx.orig.test": {"A": ["127.0.0.2"]}})
    # A delivers to B's port and B to A's; the original sender's MX listens on 127.0.0.2 at
    # the port each of them uses, so a report reaches it from either.
    sinks = [Sink(), Sink()]
    controllers = [Controller(sinks[0], hostname="127.0.0.2", port=port_a),
                   Controller(sinks[1], hostname="127.0.0.2", port=port_b)]
    for controller in controllers:
        controller.start()
    try:
        a = tampu_server(base=base("a.test", port_a, dns.port), deliver=True,
                         conf={"30-x.toml": CONF.format(port=port_b)})
        b = tampu_server(base=base("b.test", port_b, dns.port), deliver=True,
                         conf={"30-x.toml": CONF.format(port=port_a)})
        (a.config_dir / "domains" / "a.test").mkdir(parents=True, exist_ok=True)
        (b.config_dir / "domains" / "b.test").mkdir(parents=True, exist_ok=True)
        (a.config_dir / "domains" / "a.test" / "aliases").write_text("x: y@b.test\n")
        (b.config_dir / "domains" / "b.test" / "aliases").write_text("y: x@a.test\n")
        with a.smtp() as c:  # from the outside: not authenticated, sender not local
            c.ehlo("orig.test")
            refused = c.sendmail("s@orig.test", ["x@a.test"],
                                 b"From: s@orig.test\r\nSubject: loop\r\n\r\nround and round\r\n")
            assert not refused
        got = wait_for(lambda: [r for s in sinks for r in s.received], timeout=60,
                       what="the report to the original sender")
        time.sleep(2)  # nothing else comes
        reports = [r for s in sinks for r in s.received]
        assert len(reports) == 1, [(r.mail_from, r.rcpt_tos) for r in reports]
        report = got[0]
        assert report.mail_from in ("", "<>") and report.rcpt_tos == ["s@orig.test"]
        assert b"Undelivered mail" in report.content and b"5.4.6" in report.content
        wait_for(lambda: not a.queue_items() and not b.queue_items(), timeout=20,
                 what="both queues to empty")
    finally:
        for controller in controllers:
            controller.stop()
