"""ratelimit: connection rate and concurrency, AUTH tarpit and lockout, recipients per hour.
Real tampu, real clients; 127.0.0.2 stands for a second client address."""

from __future__ import annotations

import base64
import logging
import smtplib
import time

import pytest

USER, PASSWORD = "user@example.test", "secret"
OTHER, OTHER_PASSWORD = "other@example.test", "other-secret"


def limits(**values) -> dict[str, str]:
    body = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in values.items())
    return {"62-ratelimit.toml": f"[plugins.ratelimit]\nenabled = true\n{body}"}


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def connect(srv, source: str = "127.0.0.1") -> tuple[smtplib.SMTP, int]:
    """(client, greeting code); a client that got no 220 is closed already."""
    c = smtplib.SMTP(timeout=10, local_hostname="client.test", source_address=(source, 0))
    code, _ = c.connect("127.0.0.1", srv.port())
    if code != 220:
        c.close()
    return c, code


def test_concurrent_connections_per_address(tampu_server):
    srv = tampu_server(conf=limits(max_concurrent=2, max_connections_per_minute=0))
    first, second = connect(srv), connect(srv)
    assert first[1] == second[1] == 220
    third, code = connect(srv)
    assert code == 421
    other, code = connect(srv, "127.0.0.2")  # another address has its own budget
    assert code == 220
    first[0].quit()
    # the slot frees when the server has seen the disconnect
    wait_for(lambda: (lambda c: (c[0].close(), c[1])[1])(connect(srv)) == 220)
    for c in (second[0], other):
        c.quit()


def test_connection_rate_per_address_and_exempt(tampu_server):
    srv = tampu_server(conf=limits(max_connections_per_minute=3, max_concurrent=0,
                                   exempt=["127.0.0.2/32"]))
    for _ in range(3):
        c, code = connect(srv)
        assert code == 220
        c.quit()
    c, code = connect(srv)
    assert code == 421
    for _ in range(5):  # exempt address: never limited
        c, code = connect(srv, "127.0.0.2")
        assert code == 220
        c.quit()


def auth(srv, login: str, password: str, source: str = "127.0.0.1") -> tuple[int, float]:
    """One AUTH PLAIN over STARTTLS on submission: (code, seconds until the answer)."""
    with smtplib.SMTP("127.0.0.1", srv.port("submission"), timeout=10,
                      source_address=(source, 0)) as c:
        c.starttls(context=srv.client_tls())
        c.ehlo("client.test")
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        start = time.monotonic()
        code, _ = c.docmd("AUTH", f"PLAIN {blob}")
        return code, time.monotonic() - start


def test_auth_failures_are_slowed_then_locked_out(tampu_server, caplog):
    caplog.set_level(logging.WARNING, "tampu.plugins.ratelimit")
    srv = tampu_server(conf=limits(auth_max_failures=3, auth_failure_delay=0.2,
                                   auth_max_delay=0.5, auth_lockout=1.5,
                                   auth_max_failures_per_user=0),
                       users={USER: PASSWORD, OTHER: OTHER_PASSWORD})
    times = []
    for _ in range(3):
        code, elapsed = auth(srv, USER, "bad")
        assert code == 535
        times.append(elapsed)
    assert times[0] >= 0.2 and times[2] >= 0.5  # the tarpit grows with the failures
    # locked out: even the right password (and another user) from this address gets 535
    assert auth(srv, USER, PASSWORD)[0] == 535
    assert auth(srv, OTHER, OTHER_PASSWORD)[0] == 535
    assert any("ip:127.0.0.1 locked out" in r.getMessage() for r in caplog.records)
    assert auth(srv, USER, PASSWORD, "127.0.0.2")[0] == 235  # other addresses are not
    time.sleep(1.5)  # the lockout ends
    assert auth(srv, USER, PASSWORD)[0] == 235


def test_auth_lockout_per_user(tampu_server):
    srv = tampu_server(conf=limits(auth_max_failures=0, auth_max_failures_per_user=2,
                                   auth_failure_delay=0, auth_lockout=60),
                       users={USER: PASSWORD, OTHER: OTHER_PASSWORD})
    assert auth(srv, USER, "bad")[0] == 535
    assert auth(srv, USER, "bad", "127.0.0.2")[0] == 535
    assert auth(srv, USER, PASSWORD, "127.0.0.2")[0] == 535  # the login is locked
    assert auth(srv, OTHER, OTHER_PASSWORD)[0] == 235        # other logins are not


def test_recipients_per_hour(tampu_server):
    srv = tampu_server(conf=limits(recipients_per_hour=3), users={USER: PASSWORD})
    with srv.smtp("submission") as c:
        c.starttls(context=srv.client_tls())
        c.login(USER, PASSWORD)
        c.sendmail(USER, ["a@remote.example", "b@remote.example"], b"Subject: 1\r\n\r\nx\r\n")
        assert c.mail(USER)[0] == 250
        assert c.rcpt("c@remote.example")[0] == 250
        code, msg = c.rcpt("d@remote.example")
        assert (code, msg[:5]) == (452, b"4.7.1")
        assert c.data(b"Subject: 2\r\n\r\nx\r\n")[0] == 250  # the accepted one goes
        assert c.mail(USER)[0] == 250
        assert c.rcpt("e@remote.example")[0] == 452  # 3 used in this hour
    with srv.smtp() as c:  # unauthenticated mail to local users is not counted
        c.sendmail("x@example.org", [USER], b"Subject: 3\r\n\r\nx\r\n")


@pytest.mark.parametrize("bad", ['exempt = ["not-a-net"]', "max_concurrent = -1"])
def test_bad_settings_name_the_key(tampu_server, bad):
    from tampu.errors import ConfigError

    with pytest.raises(ConfigError, match="plugins.ratelimit"):
        tampu_server(conf={"62-ratelimit.toml": f"[plugins.ratelimit]\nenabled = true\n{bad}"})
