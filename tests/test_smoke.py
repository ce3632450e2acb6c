def test_accepts_local_user(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with srv.smtp() as c:
        c.ehlo()
        code, _ = c.mail("a@example.org")
        assert code == 250
        code, msg = c.rcpt("user@example.test")
        assert code == 250, msg
        code, msg = c.data(b"Subject: hi\r\n\r\nbody\r\n")
        assert code == 250 and b"Queued as" in msg
    assert len(srv.queue_items()) == 1


def test_auth_after_starttls(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with srv.smtp("submission") as c:
        c.ehlo()
        assert not c.has_extn("auth")
        c.starttls(context=srv.client_tls())
        c.ehlo()
        assert c.has_extn("auth")
        c.login("user@example.test", "secret")
        c.sendmail("user@example.test", ["x@remote.example"], b"Subject: x\r\n\r\nhi\r\n")


def test_auth_implicit_tls(tampu_server):
    srv = tampu_server(users={"user@example.test": "secret"})
    with srv.smtp("submissions") as c:
        c.ehlo()
        assert c.has_extn("auth")
        c.login("user@example.test", "secret")
