"""Decision records: which plugin decided what, at every stage, for every transaction and
every queue item — what ``tampu why`` tells.

The recorder is the core's own observer of the hooks that fire *after* a verdict
(``smtp_verdict``, ``smtp_transaction_done``, ``smtp_disconnect``, ``queue_enqueued``,
``delivery_attempted``, ``queue_done``); it is registered with every configuration. Records
are compact JSON lines (no message bodies, no passwords) appended to a bounded journal in
``<data_dir>/journal/`` by a writer thread: one file per process, a new file at a tenth of
``[server] journal_max_size``, the oldest files removed past ``journal_max_size`` in all or
``journal_max_age``. While an item lives, its delivery attempts are also kept in its
``extra["decisions"]`` (saved with its state).

Record kinds: ``refused`` (a transaction or connection that queued nothing), ``accepted``
(a transaction that queued an item), ``queued`` (the item's final recipients, after
expansion), ``attempt`` (one delivery attempt), ``done`` (the item left the queue).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from tampu._markers import hookimpl
from tampu.authres import results
from tampu.envelope import Envelope, Session, StashKey, Verdict
from tampu.item import DeliveryResult, QueueItem, Recipient

log = logging.getLogger("tampu.decisions")

JOURNAL_DIR: Final = "journal"
FLUSH_INTERVAL: Final = 0.1
"""Seconds between the journal writer's rounds: how late ``tampu why`` may see a record."""
FLUSH_RECORDS: Final = 256
"""Records that make the writer go at once (and the most it encodes per write)."""
MAX_DECISIONS: Final = 200
"""Decisions kept per transaction (a client sending thousands of RCPTs gets a summary)."""

_ENCODE: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""``json.dumps`` with these arguments makes a new encoder per call."""

_CURRENT: StashKey[list[dict[str, Any]]] = StashKey()
_SESSION: StashKey[list[dict[str, Any]]] = StashKey()


def _reply(verdict: Verdict) -> str:
    return str(verdict.reply).replace("\r\n", " / ")


class Journal:
    """The bounded on-disk journal of one process.

    :meth:`write` only appends the record to a list; a writer thread takes the list every
    :data:`FLUSH_INTERVAL` (or sooner when it grows), encodes and writes it in one go. Waking
    a thread per record cost more than the records themselves (its GIL hand-off)."""

    def __init__(self, directory: Path, max_bytes: int, max_age: float, node: str) -> None:
        self.dir = directory
        self.max_bytes = max_bytes
        self.max_age = max_age
        self.node = node
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = False
        self.thread: threading.Thread | None = None
        self.failing = False
        self.files = 0

    def write(self, record: dict[str, Any]) -> None:
        """Queue a record (the event loop never waits for the disk)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="tampu-journal",
                                           daemon=True)
            self.thread.start()
        record.setdefault("t", round(time.time(), 3))
        record["node"] = self.node
        with self._lock:
            self._pending.append(record)
            many = len(self._pending) >= FLUSH_RECORDS
        if many:
            self._wake.set()

    def close(self) -> None:
        if self.thread is not None:
            self._closing = True
            self._wake.set()
            self.thread.join(10)
            self.thread = None
            self._closing = False

    def _take(self) -> list[dict[str, Any]]:
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    def _run(self) -> None:
        handle = None
        written = 0
        try:
            while True:
                self._wake.wait(FLUSH_INTERVAL)
                self._wake.clear()
                closing = self._closing
                try:
                    handle, written = self._write_batch(self._take(), handle, written)
                except Exception:  # a bug (a record JSON cannot encode): this batch only
                    log.exception("decision journal: records lost")
                if closing:
                    return
        finally:
            if handle is not None:
                handle.close()

    def _write_batch(self, batch: list[dict[str, Any]], handle: Any,  # noqa: ANN401 - a file
                     written: int) -> tuple[Any, int]:
        file_limit = max(1024, self.max_bytes // 10)
        chunk: list[bytes] = []
        size = 0
        for record in batch:  # one write per file: a file never passes its limit
            line = self._line(record)
            if chunk and written + size + len(line) > file_limit:
                handle, written = self._put(handle, written, chunk, file_limit)
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            handle, written = self._put(handle, written, chunk, file_limit)
        return handle, written

    def _put(self, handle: Any, written: int, chunk: list[bytes],  # noqa: ANN401 - a file
             file_limit: int) -> tuple[Any, int]:
        """Write ``chunk`` to the current file, or to a new one when it would not fit."""
        data = b"".join(chunk)
        try:
            if handle is None or written + len(data) > file_limit:
                if handle is not None:
                    handle.close()
                handle, written = self._open()
                self._prune()
            handle.write(data)
            handle.flush()
            self.failing = False
            return handle, written + len(data)
        except OSError as exc:
            if not self.failing:
                log.error("decision journal: cannot write to %s: %s; records are lost until "
                          "it works again", self.dir, exc.strerror or exc)
            self.failing = True
            if handle is not None:  # with the bytes it could not take; the next gets a new file
                with contextlib.suppress(OSError):
                    handle.close()
            return None, 0

    @staticmethod
    def _line(record: dict[str, Any]) -> bytes:
        return (_ENCODE(record) + "\n").encode("utf-8", "backslashreplace")

    def _open(self) -> tuple[Any, int]:
        self.dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        self.files += 1  # names sort in the order they were written (per process)
        path = self.dir / f"{stamp}-{os.getpid()}-{self.files:06d}.jsonl"
        return path.open("ab"), 0

    def _prune(self) -> None:
        """Oldest files first, until the journal is within its size and age."""
        files = sorted(self.dir.glob("*.jsonl"))
        now = time.time()
        sizes = {}
        for path in files:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            sizes[path] = st.st_size
            if self.max_age and now - st.st_mtime > self.max_age:
                path.unlink(missing_ok=True)
                sizes.pop(path)
        total = sum(sizes.values())
        for path in list(sizes)[:-1]:  # never the file being written
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= sizes[path]


def read_journal(directory: Path, since: float = 0.0) -> Iterator[dict[str, Any]]:
    """Every record of the journal (all processes), oldest file first."""
    for path in sorted(directory.glob("*.jsonl")) if directory.is_dir() else ():
        try:
            if path.stat().st_mtime < since:
                continue
            lines = path.read_bytes().splitlines()
        except OSError:
            continue
        yield from _records(lines, since)


def _records(lines: list[bytes], since: float = 0.0) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and record.get("t", 0) >= since:
            yield record


def journal_tail(directory: Path, max_bytes: int) -> tuple[list[bytes], bool]:
    """The newest lines of the journal, reading at most ``max_bytes`` (newest files first; of
    the file that crosses the limit, only its end), oldest file first; and whether that was
    the whole journal. What a page that must answer quickly reads."""
    files = sorted(directory.glob("*.jsonl"), reverse=True) if directory.is_dir() else []
    chunks: list[list[bytes]] = []
    budget = max_bytes
    complete = True
    for path in files:
        if budget <= 0:
            complete = False
            break
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                start = max(0, size - budget)
                fh.seek(start)
                data = fh.read(budget)
        except OSError:
            continue
        budget -= len(data)
        lines = data.splitlines()
        if start > 0:
            complete = False
            lines = lines[1:]  # the first one is cut
        chunks.append(lines)
    return [line for lines in reversed(chunks) for line in lines], complete


def parse_records(lines: list[bytes],
                  keep: Callable[[bytes], bool] | None = None) -> list[dict[str, Any]]:
    """The records of journal ``lines`` (only the lines ``keep`` accepts, if given: a cheap
    test on the raw line spares parsing the others), in time order."""
    records = list(_records([line for line in lines if keep(line)] if keep else lines))
    records.sort(key=lambda r: r.get("t", 0))  # files of several processes interleave
    return records


def read_journal_tail(directory: Path, max_bytes: int) -> tuple[list[dict[str, Any]], bool]:
    """:func:`journal_tail`, parsed."""
    lines, complete = journal_tail(directory, max_bytes)
    return parse_records(lines), complete


class DecisionRecorder:
    """Writes decision records; registered by the core with every configuration."""

    name = "decisions"
    distribution = "tampu (core)"
    priority = 1_000_000  # after every other observer: it sees their changes
    _current: StashKey[list[dict[str, Any]]] = _CURRENT
    _in_session: StashKey[list[dict[str, Any]]] = _SESSION
    """Where a transaction's and a session's decisions wait (a subclass has its own)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal

    # ---------------------------------------------------------------- reception

    @staticmethod
    def _session(session: Session) -> dict[str, Any]:
        return {"session": session.id, "peer": session.peer_host, "listener":
                session.listener.name, "helo": session.helo,
                "tls": session.tls.version if session.tls else None, "auth": session.auth_user}

    @hookimpl
    def smtp_verdict(self, session: Session, envelope: Envelope | None,
                     verdict: Verdict) -> None:
        entry: dict[str, Any] = {"t": round(time.time(), 3), "stage": verdict.stage,
                                 "plugin": verdict.plugin,
                 "addr": verdict.address, "reply": _reply(verdict),
                 "ms": round(verdict.seconds * 1000, 2)}
        if verdict.stage in ("connect", "helo", "auth"):
            session.stash.setdefault(self._in_session, []).append(entry)
            if verdict.refused and verdict.stage == "connect":
                self.journal.write({"kind": "refused", **self._session(session),
                                    "decisions": [entry]})
            return
        if verdict.stage == "mail":
            self._flush(session, None)  # a new transaction: the old one queued nothing
        current = session.stash.setdefault(self._current, [])
        if len(current) < MAX_DECISIONS:
            current.append(entry)
        if verdict.stage == "mail" and envelope is not None:
            spf = [str(r) for r in results(envelope, "spf")]
            if spf:
                entry["results"] = spf

    def _flush(self, session: Session, envelope: Envelope | None,
               reply: str | None = None, qid: str | None = None) -> None:
        current = session.stash.get(self._current, [])
        if not current:
            return
        session.stash[self._current] = []
        mail = next((d["addr"] for d in current if d["stage"] == "mail"), "")
        rcpts = [d["addr"] for d in current if d["stage"] == "rcpt" and
                 d["reply"][:1] == "2"]
        record: dict[str, Any] = {
            "kind": "accepted" if qid else "refused", **self._session(session),
            "from": mail, "to": rcpts,
            "decisions": session.stash.get(self._in_session, []) + current}
        if qid:
            record["qid"] = qid
        if envelope is not None:
            record["results"] = [str(r) for r in results(envelope)]
        if reply is not None:
            record["reply"] = reply
        self.journal.write(record)

    @hookimpl
    def smtp_transaction_done(self, session: Session, envelope: Envelope, reply: Any,
                              queue_id: str | None) -> None:
        self._flush(session, envelope, str(reply).replace("\r\n", " / "), queue_id)

    @hookimpl
    def smtp_disconnect(self, session: Session) -> None:
        self._flush(session, None)

    # ---------------------------------------------------------------- the queue

    @hookimpl
    def queue_enqueued(self, item: QueueItem) -> None:
        self.journal.write({
            "kind": "queued", "qid": item.id, "from": item.mail_from, "origin": item.origin,
            "size": item.size, "recipients": [
                {"to": r.address, "orig": r.original, "route": r.route.to_json()}
                for r in item.recipients]})

    @hookimpl
    def delivery_attempted(self, item: QueueItem, recipient: Recipient,
                           result: DeliveryResult, backend: str) -> None:
        entry = {"kind": "attempt", "qid": item.id, "to": recipient.address,
                 "orig": recipient.original, "attempt": recipient.attempts,
                 "status": result.status, "backend": backend, "remote": result.remote,
                 "code": result.code, "enhanced": result.enhanced, "text": result.text[:300]}
        self.journal.write(entry)
        kept = item.extra.setdefault("decisions", [])
        if isinstance(kept, list) and len(kept) < MAX_DECISIONS:
            kept.append({k: v for k, v in entry.items() if k not in ("kind", "qid")})

    @hookimpl
    def queue_done(self, item: QueueItem) -> None:
        self.journal.write({
            "kind": "done", "qid": item.id, "from": item.mail_from,
            "sent": [r.address for r in item.recipients if r.status.value == "sent"],
            "failed": [r.address for r in item.failed]})
