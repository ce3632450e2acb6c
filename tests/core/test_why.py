"""Decision records and ``tampu why``: the story of messages and refusals, from real sessions."""

from __future__ import annotations

import json
import time

from tampu import DeliveryResult
from tampu.decisions import JOURNAL_DIR, Journal, read_journal
from tests.helpers import RawClient, run_tampu
from tests.recording import Recorder

USER, PASSWORD = "user@example.test", "secret"
MSG = b"Subject: why\r\n\r\nbody\r\n"
ALIASES = {"31-aliases.toml": "[plugins.aliases]\nenabled = true\n"}


def why(srv, *args: str):
    return run_tampu("why", "--config-dir", str(srv.config_dir), *args)


def wait_journal(srv, predicate, timeout: float = 10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = list(read_journal(srv.server.config.data_dir / JOURNAL_DIR))
        if predicate(records):
            return records
        time.sleep(0.05)
    raise AssertionError("the journal did not get the records")


def test_an_accepted_message_expanded_and_delivered(tampu_server):
    rec = Recorder(accept_rcpt=False)
    srv = tampu_server(plugins=[rec], deliver=True, users={USER: PASSWORD}, conf=ALIASES)
    (srv.config_dir / "domains" / "example.test" / "aliases").write_text("team: user\n")
    with srv.smtp() as c:
        c.ehlo("client.test")
        c.mail("a@example.org")
        c.rcpt("team@example.test")
        code, msg = c.data(MSG)
    qid = msg.decode().rpartition(" ")[2]
    rec.wait_done(qid)
    wait_journal(srv, lambda rs: any(r.get("kind") == "done" and r.get("qid") == qid
                                     for r in rs))
    out = why(srv, qid)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "from 127.0.0.1 (HELO client.test), not authenticated" in text
    assert "MAIL FROM <a@example.org>: the core accepted it (250 2.1.0" in text
    assert "RCPT <team@example.test>: aliases accepted it (250 2.1.5" in text
    assert f"queued as {qid}" in text
    assert "<team@example.test> expanded to <user@example.test>" in text
    assert "delivery attempt 1 to <user@example.test> (for <team@example.test>) by recorder" \
        in text
    assert "done: 1 delivered, 0 failed" in text
    as_json = [json.loads(line) for line in why(srv, qid, "--json").stdout.splitlines()]
    assert {r["kind"] for r in as_json} == {"accepted", "queued", "attempt", "done"}
    assert "body" not in why(srv, qid, "--json").stdout  # never the message


def test_refusals_at_each_stage(tampu_server):
    srv = tampu_server(users={USER: PASSWORD})
    with RawClient(srv.port("smtp")) as c:
        c.reply()
        c.cmd("EHLO client.test")
        assert c.cmd("MAIL FROM:<a@example.org>")[0] == 250
        assert c.cmd("RCPT TO:<bob@remote.example>")[0] == 550  # relay
        assert c.cmd("RCPT TO:<nobody@example.test>")[0] == 550  # nobody accepted it
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<bad")[0] == 501
        c.cmd("QUIT")
    wait_journal(srv, lambda rs: sum(r.get("kind") == "refused" for r in rs) >= 1)
    out = why(srv, "--from", "a@example.org", "--to", "bob@remote.example", "--since", "1h")
    assert out.returncode == 0, out.stderr
    assert "RCPT <bob@remote.example>: relay refused it (550 5.7.1 Relaying not permitted" \
        in out.stdout
    assert "RCPT <nobody@example.test>: the core refused it: no plugin accepted this " \
           "recipient (550 5.1.1" in out.stdout
    assert "nothing queued" in out.stdout
    session = json.loads(why(srv, "--from", "a@example.org", "--json").stdout
                         .splitlines()[0])["session"]
    by_session = why(srv, "--session", str(session))
    assert "MAIL FROM <bad: the core refused it (501 5.1.7" in by_session.stdout
    assert why(srv, "--from", "nobody@else.example").returncode == 1


def test_a_deferred_message_says_when_it_is_tried_again(tampu_server):
    rec = Recorder({"later@example.test": [DeliveryResult.temporary(
        "greylisted", code=451, enhanced="4.7.1", remote="mx.example.net [192.0.2.1]")]},
        retry_delay=3600)
    srv = tampu_server(plugins=[rec], deliver=True, users={USER: PASSWORD})
    with srv.smtp() as c:
        c.ehlo("client.test")
        c.sendmail("a@example.org", ["later@example.test"], MSG)
    rec.wait(lambda: len(rec.attempts) == 1, what="the first attempt")
    qid = rec.attempts[0][0]
    time.sleep(0.3)  # the state (next attempt) is written after the attempt's record
    out = why(srv, qid)
    assert "delivery attempt 1 to <later@example.test> by recorder via mx.example.net " \
           "[192.0.2.1]: not yet, will retry — 451 4.7.1 greylisted; next attempt" in out.stdout
    assert "still queued: 1 recipient(s) pending, next attempt" in out.stdout


def test_the_journal_stays_within_its_size(tmp_path):
    journal = Journal(tmp_path / "j", max_bytes=20_000, max_age=0, node="test")
    for i in range(2_000):  # ~200 kB of records
        journal.write({"kind": "refused", "session": i, "decisions": [{"x": "y" * 40}]})
    journal.close()
    total = sum(p.stat().st_size for p in (tmp_path / "j").glob("*.jsonl"))
    assert total <= 20_000 + 2_500  # at most one file past the limit, then it is pruned
    kept = list(read_journal(tmp_path / "j"))
    assert kept and kept[-1]["session"] == 1999  # the newest are kept


def test_an_old_journal_is_pruned_by_age(tmp_path):
    import os

    directory = tmp_path / "j"
    directory.mkdir()
    old = directory / "20000101-000000-1-000000.jsonl"
    old.write_text('{"kind":"refused","t":1}\n')
    os.utime(old, (time.time() - 10 * 86400, time.time() - 10 * 86400))
    journal = Journal(directory, max_bytes=10**6, max_age=86400, node="test")
    journal.write({"kind": "refused"})
    journal.close()
    assert not old.exists() and len(list(directory.glob("*.jsonl"))) == 1
