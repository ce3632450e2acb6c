"""The decision journal's writer thread (tampu.decisions.Journal) when writing fails: one
error, records lost meanwhile, and writing again as soon as it works — also after a record
that cannot be encoded (a bug must not stop the journal for good)."""

from __future__ import annotations

import time
from pathlib import Path

from tampu.decisions import Journal, read_journal


def _wait(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_writing_resumes_when_the_folder_works_again(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "journal"
    folder.write_text("not a folder")  # every write fails until it is one
    journal = Journal(folder, 1 << 20, 0, "node")
    try:
        journal.write({"kind": "refused", "n": 1})
        _wait(lambda: journal.failing)
        journal.write({"kind": "refused", "n": 2})
        time.sleep(0.3)
        folder.unlink()
        deadline = time.monotonic() + 10
        n = 3
        while not any(r.get("n", 0) >= 3 for r in read_journal(folder)):
            assert time.monotonic() < deadline, "the journal did not write again"
            journal.write({"kind": "refused", "n": n})
            n += 1
            time.sleep(0.05)
    finally:
        journal.close()
    errors = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(errors) == 1
    numbers = [r["n"] for r in read_journal(folder)]
    assert 1 not in numbers and 2 not in numbers and numbers == sorted(numbers)


def test_a_record_that_cannot_be_encoded_loses_its_batch_only(tmp_path: Path,
                                                             caplog) -> None:
    journal = Journal(tmp_path / "journal", 1 << 20, 0, "node")
    try:
        journal.write({"kind": "refused", "bad": object()})
        _wait(lambda: any("records lost" in r.getMessage() for r in caplog.records))
        journal.write({"kind": "refused", "n": 5})
        _wait(lambda: [r.get("n") for r in read_journal(tmp_path / "journal")] == [5])
    finally:
        journal.close()
