"""The kit's server factory, SMTP client, verdict recorder and capture backend, on a real
tampu."""

from __future__ import annotations

import pytest
from pydantic import Field

from tampu import PluginSettings, Reply, hookimpl
from tampu.testing import CaptureBackend, VerdictRecorder, launch, wait_for

USER = "bob@example.test"


def test_send_reports_every_stage(tampu_server):
    srv = tampu_server(users={USER: "pw"})
    result = srv.send("alice@example.org", [USER, "nobody@example.test", "x@remote.example"])
    assert result.rcpt[USER][0] == 250 and result.accepted and result.qid
    assert result.qid in srv.queue_items()
    result.assert_refused(stage="rcpt", address="x@remote.example")
    result.assert_refused(stage="rcpt", address="nobody@example.test")
    with pytest.raises(AssertionError, match="not fully accepted"):
        result.assert_accepted()
    with pytest.raises(AssertionError, match="no refusal 599"):
        result.assert_refused(599)
    refused = srv.send("alice@example.org", "x@remote.example")  # no DATA without a recipient
    assert refused.data is None and not refused.accepted and refused.qid is None
    assert refused.refusals()[0][:2] == ("rcpt", "x@remote.example")


def test_send_with_login_relays(tampu_server):
    srv = tampu_server(users={USER: "pw"})
    srv.send(USER, ["x@remote.example"], "Subject: out\n\nlf only\n",
             login=(USER, "pw")).assert_accepted()
    (qid,) = srv.queue_items()
    message = srv.store.load_now(qid)
    assert message.mail_from == USER


def test_verdicts_name_the_deciding_plugin(tampu_server):
    srv = tampu_server(users={USER: "pw"}, record=True)
    qid = srv.send("alice@example.org", [USER, "x@remote.example"]).qid
    rcpt = srv.verdicts.assert_accepted("rcpt", USER, code=250)
    relay = srv.verdicts.assert_refused("rcpt", "x@remote.example", code=550, plugin="relay")
    assert rcpt.plugin == "localusers" and relay.reply.status == "5.7.1"
    assert str(relay) == (f"#{relay.session} rcpt <x@remote.example>: relay -> 550 5.7.1 "
                          "Relaying not permitted; authenticate first")
    assert srv.verdicts.assert_accepted("data").plugin == "core"
    with pytest.raises(AssertionError, match="no refusal at mail"):
        srv.verdicts.assert_refused("mail", timeout=0.1)
    with pytest.raises(AssertionError, match="expected plugin"):
        srv.verdicts.assert_accepted("rcpt", USER, plugin="greylist")
    accepted = srv.verdicts.wait_record("accepted", qid=qid)
    assert accepted["from"] == "alice@example.org" and accepted["to"] == [USER]
    stages = [d["stage"] for d in accepted["decisions"]]
    assert stages.count("rcpt") == 2 and stages.count("mail") == 1  # each decision once
    # the core's own recorder still writes the same story to the journal
    journal = wait_for(lambda: [r for r in srv.journal() if r.get("qid") == qid
                                and r["kind"] == "accepted"], 5, "the journal's record")
    assert [(d["stage"], d["plugin"]) for d in journal[0]["decisions"]] == [
        (d["stage"], d["plugin"]) for d in accepted["decisions"]]


def test_every_hook_call_is_recorded_not_a_sample(tampu_server):
    srv = tampu_server(users={USER: "pw"}, record=True)
    rcpts = [USER] * 20 + ["x@remote.example"]  # more than the caller's sampling period
    srv.send("alice@example.org", rcpts)
    calls = srv.verdicts.calls_of("smtp_rcpt_to", "localusers")
    assert len(calls) == 21 and all(c.outcome == "ok" for c in calls)
    assert len(srv.verdicts.calls_of("smtp_rcpt_to", "relay")) == 1
    assert len(srv.verdicts.of_stage("rcpt", USER)) == 20


class Broken:
    name = "broken"
    priority = 1

    @hookimpl
    def smtp_mail_from(self, session, envelope, address, params):
        if address.startswith("crash"):
            raise RuntimeError("boom")
        return Reply(550, "5.7.1", "Go away") if address.startswith("bad") else None


def test_refusal_at_mail_and_a_failing_plugin(tampu_server):
    srv = tampu_server(users={USER: "pw"}, plugins=[Broken()], record=True)
    srv.send("bad@example.org", [USER]).assert_refused(550, stage="mail")
    srv.verdicts.assert_refused("mail", "bad@example.org", code=550, plugin="broken")
    srv.send("crash@example.org", [USER]).assert_refused(451, stage="mail")
    assert [c.outcome for c in srv.verdicts.calls_of("smtp_mail_from", "broken")] == [
        "ok", "error"]
    refused = srv.verdicts.wait_record("refused", where=lambda r: r["from"] ==
                                       "bad@example.org")
    assert refused["decisions"][-1]["plugin"] == "broken"


def test_attributes_say_how_to_get_them(tampu_server):
    srv = tampu_server()
    with pytest.raises(AttributeError, match="record=True"):
        srv.verdicts
    with pytest.raises(AttributeError, match="capture=True"):
        srv.capture


def test_capture_defers_fails_and_delivers(tampu_server):
    capture = CaptureBackend(retry_delay=0.1)
    capture.defer("bob@example.test", times=2)
    capture.fail("carol@example.test")
    srv = tampu_server(users={USER: "pw", "carol@example.test": "pw"}, capture=capture,
                       record=True, conf={"50-dsn.toml": "[plugins.dsn]\nenabled = true\n"})
    assert srv.capture is capture
    qid = srv.send("alice@example.org", [USER, "carol@example.test"]).assert_accepted().qid
    capture.wait_done(qid)
    assert capture.attempts_for(USER) == ["temporary", "temporary", "sent"]
    assert capture.attempts_for("carol@example.test") == ["permanent"]
    assert capture.gave_up == [(qid, ["carol@example.test"])]
    got = capture.wait_delivered(USER)
    assert got.qid == qid and got.parsed()["Subject"] == "test"
    dsn = capture.wait_delivered("alice@example.org", origin="dsn")
    assert "carol@example.test" in dsn.message.decode()
    attempts = srv.verdicts.attempts(qid, USER)
    assert [(a["status"], a["backend"]) for a in attempts] == [
        ("temporary", "capture"), ("temporary", "capture"), ("sent", "capture")]
    assert attempts[0]["code"] == 451 and attempts[0]["enhanced"] == "4.4.1"


def test_capture_crash_is_a_temporary_failure(tampu_server):
    capture = CaptureBackend()
    capture.crash(USER)
    srv = tampu_server(users={USER: "pw"}, capture=capture)
    qid = srv.send("alice@example.org", [USER]).assert_accepted().qid
    capture.wait(lambda: bool(capture.attempts), what="an attempt")
    assert capture.attempts_for(USER)[0] == "crash"
    assert qid in srv.queue_items() and not capture.delivered


def test_capture_does_not_accept_recipients_unless_told(tampu_server):
    srv = tampu_server(users={USER: "pw"}, capture=True)
    srv.send("alice@example.org", ["nobody@example.test"]).assert_refused(stage="rcpt")
    catch_all = tampu_server(capture=CaptureBackend(accept_rcpt=True))
    catch_all.send("alice@example.org", ["nobody@example.test"]).assert_accepted()


def test_dns_option_points_the_server_at_the_kit_dns(tampu_server, dns_server):
    srv = tampu_server(dns=dns_server)
    assert srv.server.config.server.dns_servers == [dns_server.address]
    assert srv.dns is dns_server


def test_plugins_by_name_read_their_table(tampu_server):
    class GateSettings(PluginSettings):
        code: int = Field(default=550, description="The reply code.")

    class Gate:
        Settings = GateSettings

        def __init__(self, ctx):
            self.code = ctx.settings.code

        @hookimpl
        def smtp_rcpt_to(self, session, envelope, address, params):
            return Reply(self.code, f"{str(self.code)[0]}.7.1", "closed")

    srv = tampu_server(plugins={"gate": Gate}, conf={"30-gate.toml": "[plugins.gate]\n"
                                                     "code = 451\npriority = 1\n"},
                       record=True)
    srv.send("a@example.org", [USER]).assert_refused(451, stage="rcpt")
    srv.verdicts.assert_refused("rcpt", USER, plugin="gate")
    assert Gate.__dict__.get("name") is None  # the author's class is left as it was


def test_launch_without_pytest(tmp_path):
    recorder = VerdictRecorder()
    srv = launch(tmp_path / "t", record=recorder)
    try:
        srv.send("a@example.org", ["x@remote.example"]).assert_refused(stage="rcpt")
        assert recorder.last("rcpt").refused
    finally:
        srv.stop()
