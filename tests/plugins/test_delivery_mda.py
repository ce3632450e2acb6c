"""delivery_mda end to end: a real MDA program (a script written here) and pipe routes."""

from __future__ import annotations

import json
import os
import sys

import pytest

from tampu import ConfigError, Recipient, Route, hookimpl
from tampu.plugins.delivery_mda import build_argv, substitutions
from tampu.testing import wait_for
from tests.plugins.delivery_kit import Recorder, load, recipient, send

USERS = {f"{u}@example.test": "secret" for u in ("jdoe", "temp", "fail", "slow", "pipe")}

MDA = """\
#!{python}
# A test MDA: records argv, stdin and environment; some users make it fail.
import json, os, sys, time, uuid
out = {out!r}
user = sys.argv[-1]
if user == "temp":
    sys.stderr.write("mailbox locked, try later\\n")
    sys.exit(75)
if user == "fail":
    print("no such mailbox: " + "x" * 400)
    sys.exit(1)
if user == "slow":
    with open(os.path.join(out, "slow.pid"), "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(30)
data = sys.stdin.buffer.read()
env = {{k: os.environ.get(k) for k in ("SENDER", "RECIPIENT", "ORIGINAL_RECIPIENT", "LOCAL",
                                       "DOMAIN", "QUEUE_ID", "TAMPU_TEST_SECRET")}}
record = {{"argv": sys.argv[1:], "stdin": data.decode(), "env": env, "cwd": os.getcwd()}}
with open(os.path.join(out, uuid.uuid4().hex + ".json"), "w") as fh:
    json.dump(record, fh)
"""


@pytest.fixture
def mda(tmp_path):
    out = tmp_path / "mda-out"
    out.mkdir()
    script = tmp_path / "test-mda"
    script.write_text(MDA.format(python=sys.executable, out=str(out)))
    script.chmod(0o755)
    return script, out


def records(out):
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def conf(script, args='["-f", "%from%", "-d", "%to_user%"]', extra=""):
    return {"40-delivery.toml": f"""
        [plugins.delivery_mda]
        enabled = true
        command = "{script}"
        args = {args}
        {extra}
        """}


def test_mda_gets_chasquid_args_stdin_and_env(tampu_server, mda, monkeypatch):
    monkeypatch.setenv("TAMPU_TEST_SECRET", "not for the MDA")
    script, out = mda
    args = ('["-f", "%from%", "%from_user%", "%from_domain%", "%to%", "%to_domain%", "%user%", '
            '"%domain%", "--x=%to_user%", "-d", "%to_user%"]')
    srv = tampu_server(conf=conf(script, args), users=USERS, deliver=True)
    qid = send(srv, "Sender@Example.ORG", ["J.Doe+Tag@example.test"],
               b"Subject: hi\r\n\r\nline one\r\n.dotted\r\n")
    rec = wait_for(lambda: records(out), what="the MDA to run")[0]
    # the domain is in its canonical form from RCPT/MAIL on; the local part is kept as sent
    assert rec["argv"] == ["-f", "Sender@example.org", "Sender", "example.org",
                           "jdoe@example.test", "example.test", "jdoe", "example.test",
                           "--x=jdoe", "-d", "jdoe"]
    assert rec["stdin"].endswith("Subject: hi\n\nline one\n.dotted\n")
    assert "\r" not in rec["stdin"]
    assert rec["env"] == {"SENDER": "Sender@example.org", "RECIPIENT": "J.Doe+Tag@example.test",
                          "ORIGINAL_RECIPIENT": "J.Doe+Tag@example.test", "LOCAL": "jdoe",
                          "DOMAIN": "example.test", "QUEUE_ID": qid, "TAMPU_TEST_SECRET": None}
    assert rec["cwd"] == str(srv.server.config.data_dir)
    wait_for(lambda: load(srv, qid) is None, what="queue empty")


def test_exit_75_stays_queued_and_is_retried(tampu_server, mda):
    script, out = mda
    recorder = Recorder()
    srv = tampu_server(conf=conf(script), users=USERS, deliver=True, plugins=[recorder])
    qid = send(srv, "sender@example.org", ["temp@example.test"], b"Subject: x\r\n\r\nx\r\n")
    wait_for(lambda: len(recorder.for_address("temp@example.test")) >= 2, what="a retry")
    result = recorder.for_address("temp@example.test")[0]
    assert result.status == "temporary" and result.remote == "mda"
    assert "status 75" in result.text and "mailbox locked, try later" in result.text
    item = load(srv, qid)
    assert item is not None
    rcpt = recipient(item, "temp@example.test")
    assert rcpt.pending and rcpt.attempts >= 1
    assert "mailbox locked" in rcpt.last_error


def test_other_exit_status_is_permanent(tampu_server, mda):
    script, out = mda
    recorder = Recorder()
    srv = tampu_server(conf=conf(script), users=USERS, deliver=True, plugins=[recorder])
    qid = send(srv, "sender@example.org", ["fail@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("fail@example.test")
    assert result.status == "permanent"
    assert result.text.startswith("MDA test-mda exited with status 1: no such mailbox: xxx")
    assert result.text.endswith(" ...") and len(result.text) < 260  # the start of the output
    wait_for(lambda: load(srv, qid) is None, what="item removed after the failure")
    assert records(out) == []


def test_timeout_kills_the_mda_and_retries(tampu_server, mda):
    script, out = mda
    recorder = Recorder()
    srv = tampu_server(conf=conf(script, extra="timeout = 1"), users=USERS, deliver=True,
                       plugins=[recorder])
    qid = send(srv, "sender@example.org", ["slow@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("slow@example.test", timeout=8)
    assert result.status == "temporary"
    assert "timed out after 1s" in result.text
    pid = int((out / "slow.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    item = load(srv, qid)
    assert item is not None and recipient(item, "slow@example.test").pending


class PipeRoutes:
    """Stands in for the aliases plugin: ``pipe@`` goes to two pipe commands."""

    name = "pipe-routes"

    def __init__(self, out):
        self.out = out

    @hookimpl
    def queue_expand_recipient(self, envelope, item, recipient):
        if not recipient.startswith("pipe@"):
            return None
        good = (f"cat > {self.out}/piped.txt; "
                f'echo "$SENDER|$RECIPIENT|$ORIGINAL_RECIPIENT|$QUEUE_ID" > {self.out}/env.txt')
        bad = "echo 'quota exceeded' >&2; exit 3"
        return [Recipient("pipe@example.test", recipient, route=Route(pipe=good)),
                Recipient("pipe-fail@example.test", recipient, route=Route(pipe=bad))]


def test_pipe_routes_run_through_the_shell(tampu_server, mda):
    script, out = mda
    recorder = Recorder()
    srv = tampu_server(conf=conf(script), users=USERS, deliver=True,
                       plugins=[recorder, PipeRoutes(out)])
    qid = send(srv, "sender@example.org", ["pipe@example.test", "jdoe@example.test"],
               b"Subject: piped\r\n\r\nbody\r\n")
    ok = recorder.first("pipe@example.test")
    assert ok.status == "sent" and ok.remote == "pipe"
    assert (out / "piped.txt").read_text().endswith("Subject: piped\n\nbody\n")
    assert (out / "env.txt").read_text() == (
        f"sender@example.org|pipe@example.test|pipe@example.test|{qid}\n")
    failed = recorder.first("pipe-fail@example.test")
    assert failed.status == "permanent"
    assert failed.text == "pipe command exited with status 3: quota exceeded"
    assert recorder.first("jdoe@example.test").status == "sent"  # the MDA, not the pipe
    assert [r["argv"] for r in records(out)] == [["-f", "sender@example.org", "-d", "jdoe"]]


def test_option_like_values_are_refused(tampu_server, mda):
    script, out = mda
    recorder = Recorder()
    srv = tampu_server(conf=conf(script, args='["%from%", "%to_user%"]'), users=USERS,
                       deliver=True, plugins=[recorder])
    send(srv, "-oQ/tmp/x@example.org", ["jdoe@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("jdoe@example.test")
    assert result.status == "permanent"
    assert "would read as an option" in result.text
    assert records(out) == []


def test_substitutions_strip_shell_and_path_characters():
    values = substitutions("a;b$(x)@evil.example", "us/er", "example.test")
    assert values["from"] == "abx@evil.example"
    assert values["to_user"] == "user"
    argv = build_argv("mda", ["-f", "%from%", "%unknown%", "x%to%y"], values)
    assert argv == ["mda", "-f", "abx@evil.example", "%unknown%", "xuser@example.testy"]
    with pytest.raises(ValueError, match="option"):
        build_argv("mda", ["%from%"], substitutions("-x@evil.example", "u", "d"))


def test_missing_mda_is_temporary(tampu_server, tmp_path):
    recorder = Recorder()
    srv = tampu_server(conf=conf(tmp_path / "no-such-mda"), users=USERS, deliver=True,
                       plugins=[recorder])
    send(srv, "sender@example.org", ["jdoe@example.test"], b"Subject: x\r\n\r\nx\r\n")
    result = recorder.first("jdoe@example.test")
    assert result.status == "temporary"
    assert "cannot run" in result.text


def test_unknown_placeholder_is_a_config_error(tampu_server, mda):
    with pytest.raises(ConfigError, match="to_usr"):
        tampu_server(conf=conf(mda[0], args='["-d", "%to_usr%"]'), users=USERS)
