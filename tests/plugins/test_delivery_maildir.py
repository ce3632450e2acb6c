"""delivery_maildir end to end: SMTP in, a real Maildir out."""

from __future__ import annotations

import re
import stat

import pytest

from tampu import ConfigError, Recipient, Route, hookimpl
from tampu.testing import wait_for
from tests.plugins.delivery_kit import Recorder, load, recipient, send

CONF = {"40-delivery.toml": """
    [plugins.delivery_maildir]
    enabled = true
    """}
USERS = {"user@example.test": "secret", "jdoe@example.test": "secret"}
NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.([^,/]+),S=(\d+)$")


def maildir_files(srv, user="user", domain="example.test"):
    new = srv.server.config.data_dir / "mail" / domain / user / "new"
    return sorted(new.iterdir()) if new.is_dir() else []


def test_delivers_into_maildir_with_spec_names_and_modes(tampu_server):
    srv = tampu_server(conf=CONF, users=USERS, deliver=True)
    body = b"Subject: hi\r\n\r\nfirst line\r\n.dot line\r\n"
    qid1 = send(srv, "sender@example.org", ["User+tag@example.test"], body)
    qid2 = send(srv, "", ["user@example.test"], b"Subject: two\r\n\r\nsecond\r\n")
    files = wait_for(lambda: len(maildir_files(srv)) == 2 and maildir_files(srv),
                     what="two messages in the Maildir")
    wait_for(lambda: load(srv, qid1) is None and load(srv, qid2) is None, what="queue empty")

    maildir = files[0].parent.parent
    for sub in ("cur", "new", "tmp"):
        assert stat.S_IMODE((maildir / sub).stat().st_mode) == 0o700
    assert stat.S_IMODE(maildir.stat().st_mode) == 0o700
    assert list((maildir / "tmp").iterdir()) == []
    names = [NAME.match(f.name) for f in files]
    assert all(names), [f.name for f in files]
    assert len({f.name for f in files}) == 2
    for f, m in zip(files, names, strict=True):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
        assert int(m.group(6)) == f.stat().st_size

    contents = {f.read_bytes() for f in files}
    first = next(c for c in contents if b"first line" in c)
    assert first.startswith(b"Return-Path: <sender@example.org>\nDelivered-To: "
                            b"User+tag@example.test\n")
    assert b"\r" not in first
    assert first.endswith(b"first line\n.dot line\n")
    second = next(c for c in contents if b"second" in c)
    assert second.startswith(b"Return-Path: <>\n")


def test_blocked_mailbox_is_temporary_then_retried(tampu_server):
    recorder = Recorder()
    srv = tampu_server(conf=CONF, users=USERS, deliver=True, plugins=[recorder])
    domain_dir = srv.server.config.data_dir / "mail" / "example.test"
    domain_dir.mkdir(parents=True)
    (domain_dir / "jdoe").write_text("a file where the Maildir should be")

    qid = send(srv, "sender@example.org", ["j.doe@example.test"], b"Subject: x\r\n\r\nx\r\n")
    first = recorder.first("j.doe@example.test")
    assert first.status == "temporary"
    assert first.remote == "maildir"
    assert "cannot write to the mailbox" in first.text
    item = load(srv, qid)
    assert item is not None
    rcpt = recipient(item, "j.doe@example.test")
    assert rcpt.pending and "cannot write" in rcpt.last_error

    (domain_dir / "jdoe").unlink()  # the administrator fixes it; the next round delivers
    wait_for(lambda: maildir_files(srv, "jdoe"), what="delivery on retry")
    wait_for(lambda: load(srv, qid) is None, what="queue empty")
    assert recorder.for_address("j.doe@example.test")[-1].status == "sent"


class PipeRoute:
    name = "pipe-route"

    @hookimpl
    def queue_expand_recipient(self, envelope, item, recipient):
        if recipient.startswith("jdoe@"):
            return [Recipient(recipient, recipient, route=Route(pipe="cat >/dev/null"))]
        return None


def test_unclaimed_recipients(tampu_server):
    """Other domains listed in ``domains`` and pipe routes are left to other backends."""
    recorder = Recorder()
    conf = {"40-delivery.toml": """
        [plugins.delivery_maildir]
        enabled = true
        domains = ["Other.TEST"]
        """}
    srv = tampu_server(conf=conf, users=USERS, deliver=True, plugins=[recorder, PipeRoute()])
    send(srv, "sender@example.org", ["user@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("user@example.test")
    assert result.status == "permanent"
    assert "no delivery backend" in result.text
    assert not (srv.server.config.data_dir / "mail").exists()


def test_pipe_route_is_not_claimed(tampu_server):
    recorder = Recorder()
    srv = tampu_server(conf=CONF, users=USERS, deliver=True, plugins=[recorder, PipeRoute()])
    send(srv, "sender@example.org", ["jdoe@example.test", "user@example.test"],
         b"Subject: x\r\n\r\nx\r\n")
    assert recorder.first("jdoe@example.test").status == "permanent"
    assert recorder.first("user@example.test").status == "sent"
    assert not maildir_files(srv, "jdoe")


def test_path_setting_and_validation(tampu_server, tmp_path):
    conf = {"40-delivery.toml": f"""
        [plugins.delivery_maildir]
        enabled = true
        path = "{tmp_path}/boxes/%domain%-%user%/Maildir"
        """}
    srv = tampu_server(conf=conf, users=USERS, deliver=True)
    send(srv, "sender@example.org", ["USER@example.test"], b"Subject: x\r\n\r\nx\r\n")
    new = tmp_path / "boxes" / "example.test-user" / "Maildir" / "new"
    wait_for(lambda: new.is_dir() and list(new.iterdir()), what="absolute path delivery")

    bad = {"40-delivery.toml": """
        [plugins.delivery_maildir]
        enabled = true
        path = "mail/%domain%/%login%"
        """}
    with pytest.raises(ConfigError, match="placeholder"):
        tampu_server(conf=bad, users=USERS)


def test_deferred_writes_run_on_the_event_loop_after_the_first(tampu_server):
    """Writes the queue makes durable (no fsync) run on the loop: a writer thread would wait
    for the GIL after each system call and delivery would fall behind reception. The first
    write to a Maildir goes to the thread (whether the store defers is learnt from it)."""
    from tampu.plugins.delivery_maildir import _WRITER_THREAD

    srv = tampu_server(conf=CONF, users=USERS, deliver=True)
    send(srv, "sender@example.org", ["user@example.test"], b"Subject: 1\r\n\r\none\r\n")
    wait_for(lambda: len(maildir_files(srv)) == 1, what="the first message delivered")
    before = _WRITER_THREAD.inline_batches
    for n in range(3):
        send(srv, "sender@example.org", ["user@example.test"], b"Subject: n\r\n\r\nmore\r\n")
        wait_for(lambda n=n: len(maildir_files(srv)) == n + 2, what="a message delivered")
    assert _WRITER_THREAD.inline_batches - before == 3
    plugin = srv.server.runtime.registry.pm.get_plugin("delivery_maildir")
    assert set(plugin._lazy.values()) == {True}
