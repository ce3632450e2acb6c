"""The verdict recorder: what each stage decided, by which plugin, with which reply — and
every hook call — for assertions in tests.

It is the core's decision recorder (:mod:`tampu.decisions`, what ``tampu why`` reads) writing
to memory instead of the journal, so a test sees exactly the records an administrator would,
plus each ``smtp_verdict`` as it happened and every hook call's plugin, time and outcome::

    srv = tampu_server(plugins=[Greylist], record=True)
    ...
    srv.verdicts.assert_refused("rcpt", "bob@example.test", code=451, plugin="greylist")
    srv.verdicts.wait_record("accepted")["qid"]

The server runs in another thread: verdicts are recorded before the client gets the reply,
decision records (``records``, ``wait_record``) when a transaction ends, which may be after
the client's QUIT; ``wait_*`` poll with a deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from tampu._markers import hookimpl
from tampu.context import ServerContext
from tampu.decisions import DecisionRecorder, Journal
from tampu.envelope import Envelope, Session, StashKey, Verdict
from tampu.item import DeliveryResult, QueueItem, Recipient
from tampu.reply import Reply

T = TypeVar("T")


def wait_for(predicate: Callable[[], T | None | Literal[False]], timeout: float = 10.0,
             what: str = "") -> T:
    """Poll ``predicate`` (every 20 ms, at most ``timeout`` seconds) until it returns something
    truthy, and return that; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for "
                                 f"{what or predicate}")
        time.sleep(0.02)


@dataclass(frozen=True, slots=True)
class RecordedVerdict:
    """One ``smtp_verdict``: a stage of a session, who decided and what the client was told."""

    session: int
    stage: str
    plugin: str
    """The deciding plugin, or ``core`` (syntax, limits, nobody accepted)."""
    address: str
    reply: Reply
    seconds: float

    @property
    def code(self) -> int:
        return self.reply.code

    @property
    def refused(self) -> bool:
        return not self.reply.is_positive

    def __str__(self) -> str:
        what = f" <{self.address}>" if self.address else ""
        return f"#{self.session} {self.stage}{what}: {self.plugin} -> " + \
            " / ".join(self.reply.lines())


@dataclass(frozen=True, slots=True)
class HookCall:
    """One call of one plugin's implementation of a hook."""

    hook: str
    plugin: str
    seconds: float
    outcome: str
    """``ok``, ``error`` or ``timeout``."""


class MemoryJournal(Journal):
    """A decision journal kept in a list (no thread, no files)."""

    def __init__(self) -> None:
        super().__init__(Path("/nonexistent"), 0, 0, "test")
        self.lock = threading.Lock()
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        record.setdefault("t", round(time.time(), 3))
        record["node"] = self.node
        with self.lock:
            self.records.append(record)

    def close(self) -> None:
        pass


class _CallObserver:
    """A hook observer that wants every call, not a sample (see ``tampu.context``)."""

    every_call = True

    def __init__(self, recorder: VerdictRecorder) -> None:
        self.recorder = recorder

    def __call__(self, hook: str, plugin: str, seconds: float, outcome: str) -> None:
        with self.recorder.lock:
            self.recorder.calls.append(HookCall(hook, plugin, seconds, outcome))


class VerdictRecorder(DecisionRecorder):
    """Records every verdict, decision record and hook call of the server it is given to
    (``tampu_server(record=True)`` makes one: ``srv.verdicts``; or ``plugins=[recorder]``)."""

    name = "verdicts"
    distribution = "tampu.testing"
    _current: StashKey[list[dict[str, Any]]] = StashKey()
    _in_session: StashKey[list[dict[str, Any]]] = StashKey()

    def __init__(self) -> None:
        self.memory = MemoryJournal()
        super().__init__(self.memory)
        self.lock = threading.Lock()
        self.verdicts: list[RecordedVerdict] = []
        self.calls: list[HookCall] = []
        self._observer = _CallObserver(self)

    # ---------------------------------------------------------------- hooks

    def _attach(self, context: ServerContext) -> None:
        if self._observer not in context.hook_observers:
            context.hook_observers.append(self._observer)

    @hookimpl
    def tampu_startup(self, context: ServerContext) -> None:
        self._attach(context)

    @hookimpl
    def tampu_reload(self, context: ServerContext) -> None:
        self._attach(context)

    @hookimpl
    def smtp_verdict(self, session: Session, envelope: Envelope | None,
                     verdict: Verdict) -> None:
        with self.lock:
            self.verdicts.append(RecordedVerdict(session.id, verdict.stage, verdict.plugin,
                                                 verdict.address, verdict.reply,
                                                 verdict.seconds))
        super().smtp_verdict(session, envelope, verdict)

    @hookimpl
    def delivery_attempted(self, item: QueueItem, recipient: Recipient,
                           result: DeliveryResult, backend: str) -> None:
        # the core's recorder keeps attempts in item.extra; this one only records them
        self.journal.write({"kind": "attempt", "qid": item.id, "to": recipient.address,
                            "orig": recipient.original, "attempt": recipient.attempts,
                            "status": result.status, "backend": backend,
                            "remote": result.remote, "code": result.code,
                            "enhanced": result.enhanced, "text": result.text[:300]})

    # ---------------------------------------------------------------- queries

    @property
    def records(self) -> list[dict[str, Any]]:
        """The decision records so far (kinds ``refused``, ``accepted``, ``queued``,
        ``attempt``, ``done``), as ``tampu why`` reads them from the journal."""
        with self.memory.lock:
            return list(self.memory.records)

    def of_stage(self, stage: str, address: str | None = None) -> list[RecordedVerdict]:
        """The verdicts of ``stage`` (``connect``, ``helo``, ``auth``, ``mail``, ``rcpt``,
        ``data``), about ``address`` if given (case-insensitive)."""
        with self.lock:
            return [v for v in self.verdicts if v.stage == stage and
                    (address is None or v.address.lower() == address.lower())]

    def last(self, stage: str, address: str | None = None) -> RecordedVerdict | None:
        found = self.of_stage(stage, address)
        return found[-1] if found else None

    def _expect(self, stage: str, address: str | None, refused: bool, code: int | None,
                plugin: str | None, timeout: float) -> RecordedVerdict:
        def check() -> RecordedVerdict | None:
            found = self.last(stage, address)
            return found if found is not None and found.refused == refused else None

        try:
            got = wait_for(check, timeout, f"a {'refusal' if refused else 'acceptance'} at "
                           f"{stage}")
        except AssertionError:
            raise AssertionError(f"no {'refusal' if refused else 'acceptance'} at {stage}"
                                 f"{f' of <{address}>' if address else ''}; verdicts:\n"
                                 f"{self.story()}") from None
        if code is not None and got.code != code:
            raise AssertionError(f"expected {code}, got: {got}")
        if plugin is not None and got.plugin != plugin:
            raise AssertionError(f"expected plugin {plugin} to decide, got: {got}")
        return got

    def assert_accepted(self, stage: str, address: str | None = None, *,
                        code: int | None = None, plugin: str | None = None,
                        timeout: float = 5) -> RecordedVerdict:
        """The last verdict of ``stage`` (about ``address``) accepted (by ``plugin``)."""
        return self._expect(stage, address, False, code, plugin, timeout)

    def assert_refused(self, stage: str, address: str | None = None, *,
                       code: int | None = None, plugin: str | None = None,
                       timeout: float = 5) -> RecordedVerdict:
        """The last verdict of ``stage`` (about ``address``) refused (with ``code``, by
        ``plugin``)."""
        return self._expect(stage, address, True, code, plugin, timeout)

    def wait_record(self, kind: str, *, qid: str | None = None,
                    where: Callable[[dict[str, Any]], bool] | None = None,
                    timeout: float = 10) -> dict[str, Any]:
        """The first decision record of ``kind`` (for queue item ``qid``, matching
        ``where``), waiting for it."""
        def find() -> dict[str, Any] | None:
            return next((r for r in self.records if r["kind"] == kind and
                         (qid is None or r.get("qid") == qid) and (where is None or where(r))),
                        None)

        return wait_for(find, timeout, f"a {kind!r} decision record"
                        f"{f' of {qid}' if qid else ''}")

    def attempts(self, qid: str | None = None, to: str | None = None) -> list[dict[str, Any]]:
        """The delivery attempts recorded (of ``qid``, to ``to``), oldest first."""
        return [r for r in self.records if r["kind"] == "attempt" and
                (qid is None or r["qid"] == qid) and (to is None or r["to"] == to)]

    def calls_of(self, hook: str, plugin: str | None = None) -> list[HookCall]:
        """Every call of ``hook`` (by ``plugin``) since the server started."""
        with self.lock:
            return [c for c in self.calls if c.hook == hook and
                    (plugin is None or c.plugin == plugin)]

    def story(self) -> str:
        """The verdicts, one line each (for assertion messages)."""
        with self.lock:
            return "\n".join(str(v) for v in self.verdicts) or "(none)"

    def clear(self) -> None:
        with self.lock, self.memory.lock:
            self.verdicts.clear()
            self.calls.clear()
            self.memory.records.clear()
