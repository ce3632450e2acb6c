"""The delivery loop: retries, the schedule, give-up, DSNs, recovery of results on restart."""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from typing import Any

import pytest

from tampu import DeliveryResult, hookimpl
from tampu.delivery_outcome import DEFAULT_SCHEDULE, schedule_delay
from tampu.store_files import FilesystemStore
from tampu.testing import make_config_dir
from tests.recording import Recorder, send

DSN_CONF = {"50-dsn.toml": "[plugins.dsn]\nenabled = true\n"}


def _fast(**server: object) -> dict[str, str]:
    lines = "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in server.items())
    return {"10-fast.toml": f"[server]\n{lines}", **DSN_CONF}


# ------------------------------------------------------------------------- the schedule


def test_default_schedule_is_chasquids():
    from tampu.config import ServerSettings

    assert ServerSettings().retry_schedule == list(DEFAULT_SCHEDULE) == [60, 300, 600, 1200]
    assert ServerSettings().give_up_after == 20 * 3600
    for attempt, base in [(1, 60), (2, 300), (3, 600), (4, 1200), (9, 1200)]:
        delays = [schedule_delay([], attempt) for _ in range(200)]
        assert all(0.9 * base <= d <= 1.1 * base for d in delays)
        assert len(set(delays)) > 100  # jittered, so restarts do not retry in lock-step
        assert abs(statistics.mean(delays) - base) < 0.05 * base


def test_temporary_failure_then_success_on_retry(tampu_server):
    rec = Recorder({"flaky@example.test": [
        DeliveryResult.temporary("try later", code=451, enhanced="4.3.0"),
        DeliveryResult.sent()]})
    srv = tampu_server(plugins=[rec], deliver=True, conf=_fast(retry_schedule=[0.3]))
    qid = send(srv, "sender@example.org", ["flaky@example.test", "ok@example.test"])
    rec.wait_done(qid)
    assert rec.attempts_for("flaky@example.test") == ["temporary", "sent"]
    assert rec.attempts_for("ok@example.test") == ["sent"]  # not redone in the second round
    times = [t for _, a, _, t in rec.attempts if a == "flaky@example.test"]
    assert 0.25 <= times[1] - times[0] < 2  # [server] retry_schedule = [0.3], ±10%
    assert rec.dsns() == [] and rec.gave_up == []
    assert srv.queue_items() == []


def test_retry_delay_hook_overrides_schedule(tampu_server):
    rec = Recorder({"flaky@example.test": [DeliveryResult.temporary("busy")] * 2
                    + [DeliveryResult.sent()]}, retry_delay=0.05)
    srv = tampu_server(plugins=[rec], deliver=True, conf=_fast(retry_schedule=[30.0]))
    qid = send(srv, "sender@example.org", ["flaky@example.test"])
    rec.wait_done(qid, timeout=5)  # the 30 s schedule would never make it
    assert rec.attempts_for("flaky@example.test") == ["temporary", "temporary", "sent"]


def test_crashing_backend_counts_as_temporary(tampu_server):
    rec = Recorder({"boom@example.test": RuntimeError("backend bug")}, retry_delay=0.05)
    srv = tampu_server(plugins=[rec], deliver=True, conf=DSN_CONF)
    qid = send(srv, "sender@example.org", ["boom@example.test"])
    rec.wait(lambda: len([a for a in rec.attempts if a[2] == "crash"]) >= 2, 5, "2 attempts")
    item = srv.store.load_now(qid)
    assert item.recipients[0].pending
    assert "recorder failed" in item.recipients[0].last_error
    rec.outcomes["boom@example.test"] = "sent"
    rec.wait_done(qid)
    assert rec.dsns() == []


# ------------------------------------------------------------------------- DSNs


def _status_blocks(dsn: object) -> list[dict[str, str]]:
    parts = list(dsn.iter_parts())  # type: ignore[attr-defined]
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    return [dict(block.items()) for block in parts[1].get_payload()]


def test_permanent_failure_sends_dsn_to_sender(tampu_server):
    rec = Recorder({
        "bad@example.test": [DeliveryResult.permanent(
            "5.1.1 <bad@example.test>: user unknown", code=550, enhanced="5.1.1",
            remote="mx.example.test [192.0.2.7]")],
        "nobody@example.test": None,  # no backend claims it
    })
    srv = tampu_server(plugins=[rec], deliver=True, conf=DSN_CONF)
    qid = send(srv, "sender@example.org",
               ["bad@example.test", "nobody@example.test", "good@example.test"],
               subject="Quarterly report")
    dsn_delivery = rec.wait_delivered("sender@example.org", origin="dsn")
    assert dsn_delivery.mail_from == ""  # DSNs go out from <>
    assert rec.gave_up == [(qid, ["bad@example.test", "nobody@example.test"])]
    dsn = dsn_delivery.parsed()
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    assert dsn["To"].addresses[0].addr_spec == "sender@example.org"
    assert dsn["From"].addresses[0].addr_spec == "MAILER-DAEMON@localhost"
    assert dsn["Subject"] == "Undelivered mail: Quarterly report"
    assert dsn["Auto-Submitted"] == "auto-replied"
    blocks = _status_blocks(dsn)
    assert blocks[0]["Reporting-MTA"] == "dns; localhost"
    assert "Arrival-Date" in blocks[0]
    bad, nobody = blocks[1], blocks[2]
    assert bad["Final-Recipient"] == "rfc822; bad@example.test"
    assert bad["Original-Recipient"] == "rfc822; bad@example.test"
    assert bad["Action"] == "failed"
    assert bad["Status"] == "5.1.1"
    assert bad["Remote-MTA"] == "dns; mx.example.test"
    assert bad["Diagnostic-Code"] == "smtp; 550 5.1.1 <bad@example.test>: user unknown"
    assert nobody["Status"] == "5.0.0"
    assert "Diagnostic-Code" not in nobody and "Remote-MTA" not in nobody
    text = list(dsn.iter_parts())[0].get_content()
    assert "bad@example.test" in text and "user unknown" in text
    assert "no delivery backend accepts this recipient" in text
    assert "good@example.test" not in text
    headers = list(dsn.iter_parts())[2].get_payload()
    assert "Subject: Quarterly report" in headers and "hello" not in headers
    assert f"id {qid}" in headers  # our Received: header is part of the original headers


def test_give_up_sends_dsn_with_last_error(tampu_server):
    rec = Recorder({"slow@example.test": [DeliveryResult.temporary(
        "greylisted, come back later", code=451, remote="mx.slow.test [192.0.2.9]")]})
    srv = tampu_server(plugins=[rec], deliver=True,
                       conf=_fast(retry_schedule=[0.3], give_up_after=1.2))
    qid = send(srv, "sender@example.org", ["slow@example.test"], subject="later")
    dsn = rec.wait_delivered("sender@example.org", origin="dsn", timeout=8).parsed()
    rec.wait_done(qid)
    tries = rec.attempts_for("slow@example.test")
    assert 3 <= len(tries) <= 6 and set(tries) == {"temporary"}
    (block,) = _status_blocks(dsn)[1:]
    assert block["Status"] == "4.4.7"
    assert block["Action"] == "failed"
    assert block["Diagnostic-Code"] == "smtp; 451 greylisted, come back later"
    assert block["Remote-MTA"] == "dns; mx.slow.test"
    text = list(dsn.iter_parts())[0].get_content()
    assert "kept failing" in text and "greylisted" in text
    rec.wait(lambda: len(rec.done) == 2, 5, "the DSN item to leave the queue too")
    assert srv.queue_items() == []


def test_give_up_keeps_backend_enhanced_status(tampu_server):
    rec = Recorder({"full@example.test": [DeliveryResult.temporary(
        "mailbox full", code=452, enhanced="4.2.2")]}, retry_delay=0.1)
    srv = tampu_server(plugins=[rec], deliver=True, conf=_fast(give_up_after=0.5))
    send(srv, "sender@example.org", ["full@example.test"])
    dsn = rec.wait_delivered("sender@example.org", origin="dsn").parsed()
    assert _status_blocks(dsn)[1]["Status"] == "4.2.2"


def test_no_dsn_for_null_sender(tampu_server, caplog):
    caplog.set_level(logging.INFO, logger="tampu.delivery")
    rec = Recorder({"bad@example.test": [DeliveryResult.permanent("no such user", code=550)]})
    srv = tampu_server(plugins=[rec], deliver=True, conf=DSN_CONF)
    qid = send(srv, "", ["bad@example.test"])
    rec.wait_done(qid)
    assert rec.gave_up == [(qid, ["bad@example.test"])]  # the failure is known...
    assert [i.origin for i in rec.enqueued] == ["smtp"]  # ...but nothing was queued for it
    assert rec.dsns() == []
    assert "no DSN for the null sender" in caplog.text


def test_dsn_that_fails_does_not_bounce_again(tampu_server):
    """A DSN is sent from <>: if it cannot be delivered, it is dropped, not bounced."""
    rec = Recorder({"bad@example.test": [DeliveryResult.permanent("no such user", code=550)],
                    "gone@example.org": [DeliveryResult.permanent("sender gone", code=550)]})
    srv = tampu_server(plugins=[rec], deliver=True, conf=DSN_CONF)
    send(srv, "gone@example.org", ["bad@example.test"])
    rec.wait(lambda: len(rec.done) == 2, 10, "the item and its DSN to finish")
    assert [i.origin for i in rec.enqueued] == ["smtp", "dsn"]
    assert rec.enqueued[1].mail_from == ""
    assert srv.queue_items() == []


# ------------------------------------------------------------------------- restarts


def test_results_survive_restart(tampu_server, tmp_path, tampu_ca):
    cdir = make_config_dir(tmp_path / "conf", conf=DSN_CONF, ca=tampu_ca)
    first = Recorder({"later@example.test": [DeliveryResult.temporary("not now")]},
                     retry_delay=3600)
    srv = tampu_server(config_dir=cdir, plugins=[first], deliver=True)
    qid = send(srv, "sender@example.org", ["now@example.test", "later@example.test"])
    first.wait(lambda: len(first.attempts) == 2, 5, "both attempts")
    srv.stop()  # mid-way: one recipient sent, one waiting for an hour
    item = srv.store.load_now(qid)
    assert [r.status.value for r in item.recipients] == ["sent", "pending"]

    second = Recorder()
    srv2 = tampu_server(config_dir=cdir, plugins=[second], deliver=True)
    second.wait_done(qid)
    assert second.attempts_for("later@example.test") == ["sent"]
    assert second.attempts_for("now@example.test") == []  # written result: not redone
    assert srv2.queue_items() == []


def test_an_item_held_while_the_resumed_queue_reads_it_stays_held(tampu_server, tmp_path,
                                                                   tampu_ca, monkeypatch):
    """The feeder's copy, read before an operator's hold was saved, says "not held": it is
    read again, and the item waits until released."""
    cdir = make_config_dir(tmp_path / "conf", conf=DSN_CONF, ca=tampu_ca)
    first = Recorder({"later@example.test": [DeliveryResult.temporary("not now")]},
                     retry_delay=3600)
    srv = tampu_server(config_dir=cdir, plugins=[first], deliver=True)
    qid = send(srv, "sender@example.org", ["later@example.test"])
    first.wait(lambda: len(first.attempts) == 1, 5, "the first attempt")
    srv.stop()

    reading, gate = threading.Event(), threading.Event()
    load = FilesystemStore.load

    async def slow_first_load(self: FilesystemStore, item_id: str) -> Any:
        item = await load(self, item_id)
        if not reading.is_set():  # the feeder's, at start: returned after the hold
            reading.set()
            await asyncio.to_thread(gate.wait, 5)
        return item

    monkeypatch.setattr(FilesystemStore, "load", slow_first_load)
    second = Recorder()
    srv2 = tampu_server(config_dir=cdir, plugins=[second], deliver=True)
    second.wait(reading.is_set, 5, "the feeder to read the item")
    asyncio.run(srv2.store.request("hold", [qid]))
    srv2.loop.call_soon_threadsafe(srv2.server.handle_requests)
    second.wait(lambda: srv2.store.load_now(qid).held, 5, "the hold to be saved")
    gate.set()
    time.sleep(0.5)  # room for an attempt, if the stale copy were scheduled
    assert second.attempts_for("later@example.test") == []
    asyncio.run(srv2.store.request("release", [qid]))
    srv2.loop.call_soon_threadsafe(srv2.server.handle_requests)
    second.wait_done(qid)
    assert second.attempts_for("later@example.test") == ["sent"]


def test_operator_delete_ends_waiting_item(tampu_server):
    rec = Recorder({"later@example.test": [DeliveryResult.temporary("not now")]},
                   retry_delay=3600)
    srv = tampu_server(plugins=[rec], deliver=True, conf=DSN_CONF)
    qid = send(srv, "sender@example.org", ["later@example.test"])
    rec.wait(lambda: len(rec.attempts) == 1, 5, "the first attempt")
    runner = srv.server.runner
    rec.wait(lambda: qid in runner.wakeups, 5, "the item to wait")
    asyncio.run(srv.store.request("delete", [qid]))  # what `tampu queue delete` does
    srv.loop.call_soon_threadsafe(srv.server.handle_requests)  # ...and its SIGUSR1
    rec.wait(lambda: qid not in runner.tasks, 5, "the task to end")
    rec.wait(lambda: list(srv.queue_dir.glob(f"{qid}*")) == [], 5, "the files to go")
    assert rec.dsns() == [] and rec.done == []


class ListsEarly:
    """Lists the queue while each new item is still in the intake's hands, between its
    durable write and its hand-off to delivery (what the recovery at start or a rescan does
    when its listing sees an item just written), then gives the feeder time to deliver."""

    def __init__(self) -> None:
        self.runner: Any = None
        self.listed: list[int] = []

    @hookimpl
    async def queue_enqueued(self, item: Any) -> None:
        self.listed.append(await self.runner.rescan())
        await asyncio.sleep(0.3)


def test_an_item_listed_while_the_intake_holds_it_is_delivered_once(tampu_server):
    rec = Recorder()
    lister = ListsEarly()
    srv = tampu_server(plugins=[rec, lister], deliver=True)
    lister.runner = srv.server.runner
    qid = send(srv, "sender@example.org", ["once@example.test"])
    rec.wait_done(qid)
    time.sleep(0.3)  # room for a second delivery
    assert lister.listed == [0]  # the rescan left it to the intake
    assert rec.attempts_for("once@example.test") == ["sent"]
    assert rec.done == [qid]


@pytest.mark.parametrize("requested", ["all", "one"])
def test_retry_request_wakes_waiting_item(tampu_server, requested):
    rec = Recorder({"later@example.test": [DeliveryResult.temporary("not now"),
                                           DeliveryResult.sent()]}, retry_delay=3600)
    srv = tampu_server(plugins=[rec], deliver=True, conf=DSN_CONF)
    qid = send(srv, "sender@example.org", ["later@example.test"])
    rec.wait(lambda: qid in srv.server.runner.wakeups, 5, "the item to wait")
    asyncio.run(srv.store.request("retry", [] if requested == "all" else [qid]))
    srv.loop.call_soon_threadsafe(srv.server.handle_requests)
    rec.wait_done(qid, timeout=5)
    assert rec.attempts_for("later@example.test") == ["temporary", "sent"]
    assert list((srv.queue_dir / "requests").iterdir()) == []  # the request was taken


def test_retry_request_also_wakes_an_item_whose_attempt_is_in_flight(tampu_server):
    gate = threading.Event()
    rec = Recorder({"slow@example.test": [DeliveryResult.temporary("not now"),
                                          DeliveryResult.sent()]}, retry_delay=3600,
                   block=gate)
    srv = tampu_server(plugins=[rec], deliver=True, conf=DSN_CONF)
    qid = send(srv, "sender@example.org", ["slow@example.test"])
    rec.wait(lambda: rec.blocked, 5, "the attempt to start")
    asyncio.run(srv.store.request("retry", [qid]))  # asked while the attempt runs
    srv.loop.call_soon_threadsafe(srv.server.handle_requests)
    time.sleep(0.2)
    gate.set()  # the attempt fails temporarily; the retry must not wait an hour
    rec.wait_done(qid, timeout=5)
    assert rec.attempts_for("slow@example.test") == ["temporary", "sent"]
