"""The SMTP dialogue of core/smtp.py: keywords, reply codes, sequencing, pipelining, verdicts.

Real server (``tampu_server``), real clients: smtplib, aiosmtplib, swaks and a raw socket.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import subprocess
import time
from typing import Any

import aiosmtplib
import pytest

from tampu import Reply, hookimpl
from tampu.testing import server_toml
from tests.conftest import require_tool
from tests.helpers import RawClient, only_queue_item

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")
MSG = b"From: a@example.org\r\nTo: user@example.test\r\nSubject: t\r\n\r\nhello\r\n"


def ehlo_keywords(lines: list[str]) -> list[str]:
    return lines[1:]  # the first line is the server's name


def test_ehlo_keywords_plain_listener(tampu_server):
    srv = tampu_server(conf={"50-size.toml": "[server]\nmax_message_size = 123456\n"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        code, lines = c.cmd("EHLO client.test")
    assert code == 250
    assert lines[0] == "localhost"
    keywords = ehlo_keywords(lines)
    for kw in ("PIPELINING", "8BITMIME", "SIZE 123456", "STARTTLS", "ENHANCEDSTATUSCODES",
               "SMTPUTF8"):
        assert kw in keywords, (kw, keywords)
    assert not [k for k in keywords if k.startswith("AUTH")], "AUTH offered before TLS"
    # RFC 2034: no enhanced code on EHLO lines
    assert not any(ENHANCED.match(line) for line in lines)


def test_ehlo_keywords_after_starttls_and_on_implicit_tls(tampu_server):
    srv = tampu_server()
    with srv.smtp("submission") as c:
        c.ehlo()
        assert c.has_extn("starttls") and not c.has_extn("auth")
        c.starttls(context=srv.client_tls())
        c.ehlo()
        assert not c.has_extn("starttls"), "STARTTLS offered twice"
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        for kw in ("pipelining", "8bitmime", "size", "enhancedstatuscodes", "smtputf8"):
            assert c.has_extn(kw), kw
    with srv.smtp("submissions") as c:
        c.ehlo()
        assert not c.has_extn("starttls")
        assert c.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]


def test_greeting_and_helo_carry_no_enhanced_code_but_other_replies_do(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        code, greeting = c.reply()
        assert code == 220 and greeting[0].startswith("localhost ")
        assert not ENHANCED.match(greeting[0])
        code, lines = c.cmd("HELO client.test")
        assert code == 250 and not ENHANCED.match(lines[0]), lines
        c.cmd("EHLO client.test")
        samples = [
            ("NOOP", 250),
            ("RSET", 250),
            ("RCPT TO:<user@example.test>", 503),  # bad sequence: no MAIL
            ("DATA", 503),
            ("MAIL FROM bad", 501),  # syntax
            ("EHLO", 501),
            ("MAIL FROM:<a@example.org> FOO=1", 555),
            ("MAIL FROM:<a@example.org> SIZE=999999999999", 552),
            ("FOOBAR", 500),
            ("VRFY user", 252),
            ("MAIL FROM:<a@example.org>", 250),
            ("MAIL FROM:<b@example.org>", 503),  # nested MAIL
            ("RCPT TO:<nobody@example.test>", 550),
            ("RCPT TO:<user@example.test>", 250),
            ("RCPT TO:<x@remote.example>", 550),
            ("RCPT TO:<>", 501),  # the null path is no recipient
            ("AUTH PLAIN", 538),
            ("STARTTLS now", 501),
        ]
        for command, expected in samples:
            code, lines = c.cmd(command)
            assert code == expected, (command, code, lines)
            assert all(ENHANCED.match(line) for line in lines), (command, lines)
        code, lines = c.cmd("QUIT")
        assert code == 221 and ENHANCED.match(lines[0]), lines


def test_commands_need_helo_first(tampu_server):
    srv = tampu_server()
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        code, lines = c.cmd("MAIL FROM:<a@example.org>")
        assert (code, lines[0][:6]) == (503, "5.5.1 "), lines
        code, lines = c.cmd("AUTH PLAIN")
        assert code == 503, lines


def test_relay_attempt_without_auth_refused(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with srv.smtp() as c:
        c.ehlo()
        assert c.mail("a@example.org")[0] == 250
        code, msg = c.rcpt("victim@remote.example")
        assert (code, msg[:5]) == (550, b"5.7.1"), msg
        # even when it looks like one of ours
        code, msg = c.rcpt("user@example.test.remote.example")
        assert code == 550, msg
    with srv.smtp("submission") as c:  # plain submission: no AUTH possible, no MAIL either
        c.ehlo()
        code, msg = c.mail("user@example.test")
        assert (code, msg[:5]) == (530, b"5.7.0"), msg
    assert srv.queue_items() == []


def test_relay_refused_with_swaks(tampu_server):
    swaks = require_tool("swaks")
    srv = tampu_server()
    done = subprocess.run(
        [swaks, "--server", "127.0.0.1", "--port", str(srv.port("smtp")), "--from",
         "a@example.org", "--to", "victim@remote.example", "--helo", "client.test",
         "--timeout", "10"], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "<** 550 5.7.1" in done.stdout, done.stdout
    assert srv.queue_items() == []


def test_unknown_local_user_550_and_known_user_accepted(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with srv.smtp() as c:
        c.ehlo()
        c.mail("a@example.org")
        code, msg = c.rcpt("nobody@example.test")
        assert (code, msg[:5]) == (550, b"5.1.1"), msg
        code, msg = c.rcpt("User+tag@Example.TEST")
        assert (code, msg[:5]) == (250, b"2.1.5"), msg
        code, msg = c.rcpt("postmaster@example.test")
        assert code == 250, msg
        code, msg = c.data(MSG)
        assert code == 250 and msg.startswith(b"2.0.0 Queued as "), msg
    assert len(srv.queue_items()) == 1


def test_null_sender_accepted(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<>")[0] == 250
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send_raw(MSG + b".\r\n")
        code, lines = c.reply()
        assert code == 250, lines
    _, header, _ = only_queue_item(srv)
    assert header["mail_from"] == ""


def test_rset_forgets_the_transaction(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<a@example.org>")
        c.cmd("RCPT TO:<user@example.test>")
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("DATA")[0] == 503
        assert c.cmd("RCPT TO:<user@example.test>")[0] == 503
        assert c.cmd("MAIL FROM:<b@example.org>")[0] == 250


def test_fail_closed_with_every_plugin_disabled(tampu_server):
    srv = tampu_server(base=server_toml(plugins=()),
                       conf={"30-off.toml": "[plugins.relay]\nenabled = false\n"})
    # only the core's own decision recorder, which decides nothing
    assert [i.name for i in srv.server.registry.plugins.values() if i.enabled] == ["decisions"]
    with srv.smtp() as c:
        c.ehlo()
        assert c.mail("a@example.org")[0] == 250
        for rcpt in ("postmaster@example.test", "user@example.test", "x@remote.example"):
            code, msg = c.rcpt(rcpt)
            assert (code, msg[:5]) == (550, b"5.1.1"), (rcpt, msg)
    assert srv.queue_items() == []


# ------------------------------------------------------------------------------ pipelining


def test_pipelined_commands_raw(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        c.send_raw(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n"
                   b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<postmaster@example.test>\r\n"
                   b"DATA\r\n")
        codes = [c.reply()[0] for _ in range(5)]
        assert codes == [250, 250, 550, 250, 354]
        c.send_raw(MSG + b".\r\nMAIL FROM:<b@example.org>\r\nQUIT\r\n")
        assert [c.reply()[0] for _ in range(3)] == [250, 250, 221]
    _, header, _ = only_queue_item(srv)
    assert [r["address"] for r in header["recipients"]] == ["user@example.test",
                                                            "postmaster@example.test"]


def test_pipelining_aiosmtplib(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})

    async def send() -> tuple[dict[str, Any], str]:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=srv.port("smtp"), timeout=10,
                                 start_tls=False)
        async with client:
            await client.ehlo()
            assert client.supports_extension("pipelining")
            return await client.sendmail("a@example.org",
                                         ["user@example.test", "nobody@example.test"], MSG)

    refused, reply = asyncio.run(send())
    assert set(refused) == {"nobody@example.test"}
    assert refused["nobody@example.test"][0] == 550
    assert "Queued as" in reply
    _, header, message = only_queue_item(srv)
    assert [r["address"] for r in header["recipients"]] == ["user@example.test"]
    assert message.endswith(MSG)


def test_pipelining_swaks(tampu_server):
    swaks = require_tool("swaks")
    srv = tampu_server(users={"user@example.test": "secret"})
    done = subprocess.run(
        [swaks, "--pipeline", "--server", "127.0.0.1", "--port", str(srv.port("smtp")),
         "--from", "a@example.org", "--to", "user@example.test,postmaster@example.test",
         "--helo", "client.test", "--timeout", "10"],
        capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    # swaks sends MAIL, both RCPTs and DATA in one write when PIPELINING is offered
    assert re.search(r"-> MAIL FROM:<a@example.org>\n -> RCPT TO:<user@example.test>\n"
                     r" -> RCPT TO:<postmaster@example.test>\n -> DATA", done.stdout), done.stdout
    assert "<-  250 2.0.0 Queued as" in done.stdout
    assert len(srv.queue_items()) == 1


# ------------------------------------------------------------------------------ plugin failures


class Raiser:
    """Raises in the hook it is built for; runs first (priority 1)."""

    priority = 1

    def __init__(self, hook: str) -> None:
        self.name = f"raiser-{hook}"
        self.hook = hook

    @hookimpl
    def smtp_mail_from(self, session, envelope, address, params):
        if self.hook == "mail":
            raise RuntimeError("boom in MAIL")

    @hookimpl
    def smtp_rcpt_to(self, session, envelope, address, params):
        if self.hook == "rcpt":
            raise RuntimeError("boom in RCPT")

    @hookimpl
    def smtp_data(self, session, envelope, message):
        if self.hook == "data":
            raise RuntimeError("boom in DATA")


@pytest.mark.parametrize("hook", ["mail", "rcpt", "data"])
def test_plugin_that_raises_gives_451(tampu_server, hook, caplog):
    srv = tampu_server(users={"user@example.test": "secret"}, plugins=[Raiser(hook)])
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        replies = [c.cmd("MAIL FROM:<a@example.org>")]
        if replies[-1][0] == 250:
            replies.append(c.cmd("RCPT TO:<user@example.test>"))
        if replies[-1][0] == 250:
            assert c.cmd("DATA")[0] == 354
            c.send_raw(MSG + b".\r\n")
            replies.append(c.reply())
    code, lines = replies[-1]
    assert code == 451 and lines[0].startswith("4.3.0"), replies
    assert all(r[0] == 250 for r in replies[:-1]), replies
    assert srv.queue_items() == []
    assert f"raiser-{hook}" in caplog.text and f"boom in {hook.upper()}" in caplog.text


class Hanger:
    name = "hanger"
    priority = 1

    @hookimpl
    async def smtp_rcpt_to(self, session, envelope, address, params):
        if address.startswith("slow@"):
            await asyncio.sleep(30)


def test_plugin_that_hangs_gives_4xx_within_plugin_timeout(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"}, plugins=[Hanger()],
                       conf={"50-timeout.toml": "[server]\nplugin_timeout = 1\n"})
    assert srv.server.config.server.plugin_timeout == 1
    with srv.smtp() as c:
        c.ehlo()
        c.mail("a@example.org")
        start = time.monotonic()
        code, msg = c.rcpt("slow@example.test")
        took = time.monotonic() - start
        assert 400 <= code < 500 and msg.startswith(b"4.3.0"), msg
        assert 0.9 <= took < 3, took
        # the session goes on: other recipients still work
        assert c.rcpt("user@example.test")[0] == 250


def test_smtplib_rejects_are_reported(tampu_server):
    srv = tampu_server()
    with srv.smtp() as c, pytest.raises(smtplib.SMTPRecipientsRefused) as info:
        c.sendmail("a@example.org", ["nobody@example.test"], MSG)
    assert info.value.recipients["nobody@example.test"][0] == 550


# ------------------------------------------------------------------------------ plugin verdicts


class Gatekeeper:
    """Verdicts at connect, HELO and RCPT, some multi-line or without an enhanced code."""

    name = "gatekeeper"
    priority = 1

    @hookimpl
    def smtp_connect(self, session):
        if session.listener.kind == "submission":
            return Reply(554, "5.7.1", "No service for you")
        return None

    @hookimpl
    async def smtp_helo(self, session, hostname):
        if hostname == "spammer.example":
            return Reply(550, "5.7.1", "Go away")
        if hostname == "crash.example":
            raise RuntimeError("helo crashed")
        return None

    @hookimpl
    def smtp_ehlo_capabilities(self, session):
        return ["X-GATEKEEPER"]

    @hookimpl
    def smtp_rcpt_to(self, session, envelope, address, params):
        if address.startswith("multi@"):
            return Reply(550, "5.7.1", "first line\nsecond line")
        if address.startswith("bare@"):
            return Reply(550, "", "no status given\nby the plugin")
        if address.startswith("odd@"):
            return Reply(556, "", "unusual code")
        return None


def test_plugin_verdicts_at_connect_helo_and_rcpt(tampu_server):
    srv = tampu_server(plugins=[Gatekeeper()])
    with RawClient(srv.port("submission")) as c:
        code, lines = c.reply()
        assert (code, lines) == (554, ["5.7.1 No service for you"])
        assert c.closed_by_server()
    with RawClient(srv.port("smtp")) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO spammer.example") == (550, ["5.7.1 Go away"])
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 503  # no HELO identity yet
        code, lines = c.cmd("EHLO crash.example")
        assert (code, lines[0][:6]) == (451, "4.3.0 "), lines
        code, lines = c.cmd("EHLO good.example")
        assert code == 250 and lines[-1] == "X-GATEKEEPER", lines
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<multi@example.test>") == (
            550, ["5.7.1 first line", "5.7.1 second line"])
        assert c.cmd("RCPT TO:<bare@example.test>") == (
            550, ["5.0.0 no status given", "5.0.0 by the plugin"])
        assert c.cmd("RCPT TO:<odd@example.test>") == (556, ["5.0.0 unusual code"])


class WrongType:
    name = "wrongtype"
    priority = 1

    @hookimpl
    def smtp_rcpt_to(self, session, envelope, address, params):
        return "250 OK"  # not a Reply: a bug in the plugin


def test_a_verdict_of_the_wrong_type_fails_closed(tampu_server):
    srv = tampu_server(plugins=[WrongType()])
    with srv.smtp() as c:
        c.ehlo()
        c.mail("a@example.org")
        code, msg = c.rcpt("x@remote.example")
        assert (code, msg[:5]) == (451, b"4.3.0"), msg
        assert c.noop()[0] == 250
