"""The kit's fake remote MX: a real SMTP server answering as told, and tampu delivering to
it."""

from __future__ import annotations

import smtplib
import ssl

import pytest

from tampu.testing import FakeMX, MXHandler, write_ca

USER, PASSWORD = "user@example.test", "secret"


def client(mx: FakeMX) -> smtplib.SMTP:
    return smtplib.SMTP(mx.host, mx.port, local_hostname="client.test", timeout=10)


def test_answers_per_recipient_and_stage(fake_mx):
    mx = fake_mx()
    mx.answer("rcpt", "550 5.1.1 No such user", address="gone@remote.test")
    mx.answer("data", "451 4.3.0 Try later", times=1)
    mx.answer("mail", "553 5.7.1 Not you", address="spam@example.org")
    with client(mx) as c:
        c.ehlo()
        assert c.mail("spam@example.org")[0] == 553
        assert c.mail("a@example.org")[0] == 250
        assert c.rcpt("gone@remote.test")[0] == 550
        assert c.rcpt("ok@remote.test")[0] == 250
        assert c.data(b"Subject: one\r\n\r\nfirst\r\n")[0] == 451  # the first DATA only
        assert c.mail("a@example.org")[0] == 250
        assert c.rcpt("GONE@remote.test")[0] == 550  # addresses compare case-insensitively
        assert c.rcpt("ok@remote.test")[0] == 250
        assert c.data(b"Subject: two\r\n\r\nsecond\r\n")[0] == 250
    (got,) = mx.wait_received()
    assert got.mail_from == "a@example.org" and got.rcpt_tos == ["ok@remote.test"]
    assert got.helo == "client.test" and not got.tls and b"second" in got.content
    assert [r.reply for r in mx.handler.refused] == ["451 4.3.0 Try later"]
    assert mx.rcpt_seen == ["gone@remote.test", "ok@remote.test", "GONE@remote.test",
                            "ok@remote.test"]
    assert mx.handler.mail_seen == ["spam@example.org", "a@example.org", "a@example.org"]


def test_data_reply_for_a_transaction_with_an_address(fake_mx):
    mx = fake_mx()
    mx.answer("data", "554 5.6.0 Not for carol", address="carol@remote.test")
    with client(mx) as c:
        c.ehlo()
        c.mail("a@example.org")
        c.rcpt("bob@remote.test")
        assert c.data(b"Subject: x\r\n\r\nx\r\n")[0] == 250
        c.mail("a@example.org")
        c.rcpt("carol@remote.test")
        assert c.data(b"Subject: y\r\n\r\ny\r\n")[0] == 554
    assert [r.rcpt_tos for r in mx.received] == [["bob@remote.test"]]


def test_answer_checks_its_arguments():
    handler = MXHandler()
    with pytest.raises(ValueError, match="not an SMTP reply"):
        handler.answer("rcpt", "hello")
    with pytest.raises(ValueError, match="stage"):
        handler.answer("ehlo", "550 no")


def test_starttls_with_the_kit_ca(fake_mx, tampu_ca):
    mx = fake_mx(tls=True)  # a certificate for its address (and localhost)
    ctx = ssl.create_default_context()
    tampu_ca.configure_trust(ctx)
    with client(mx) as c:
        c.ehlo()
        assert c.has_extn("starttls")
        c.starttls(context=ctx)  # verifies the certificate against 127.0.0.1
        c.ehlo()
        assert not c.sendmail("a@example.org", ["b@remote.test"], b"Subject: t\r\n\r\nt\r\n")
    assert mx.wait_received()[0].tls


def test_tampu_delivers_to_the_fake_mx(tampu_server, make_dns, fake_mx, tampu_ca, tmp_path):
    dns = make_dns()
    mx = fake_mx("127.0.0.2", tls=True, names=("mx.remote.test",))
    assert mx.publish(dns, "remote.test") == "mx.remote.test"
    mx.answer("rcpt", "550 5.1.1 No such user here", address="gone@remote.test")
    ca_file = write_ca(tampu_ca, tmp_path / "ca.pem")
    srv = tampu_server(dns=dns, users={USER: PASSWORD}, record=True, deliver=True,
                       conf={"45-smtp.toml": mx.delivery_smtp_conf(ca_file)})
    qid = srv.send(USER, ["ok@remote.test", "gone@remote.test"],
                   login=(USER, PASSWORD)).assert_accepted().qid
    (got,) = mx.wait_received()
    assert got.rcpt_tos == ["ok@remote.test"] and got.tls and got.mail_from == USER
    gone = srv.verdicts.wait_record("attempt", qid=qid,
                                    where=lambda r: r["to"] == "gone@remote.test")
    assert (gone["status"], gone["code"], gone["backend"]) == ("permanent", 550,
                                                               "delivery_smtp")
    assert "mx.remote.test" in gone["remote"]
    ok = srv.verdicts.attempts(qid, "ok@remote.test")
    assert [a["status"] for a in ok] == ["sent"]
