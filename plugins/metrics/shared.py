"""The counts of every process on the one endpoint (``[server] workers`` > 1).

Only the main process serves the metrics listener, but every process receives and delivers.
Each reception worker writes what it counted — its Prometheus samples, the console's
per-minute counters, verdict counts and recent errors — to
``<data_dir>/metrics/worker-<N>.json`` every :data:`SHARE_EVERY` seconds when something changed
(and once more when it stops); the main process adds the files to its own counts whenever it
answers ``/metrics`` or the console.

The files hold totals, not increments, so a late or lost write loses nothing: the next one
carries it. They are not synced (counters do not survive a crash, as in any process). A
worker that died keeps its counters counted (as prometheus_client's multiprocess mode does)
but not its gauges: its connections are not open any more. The main process empties the
folder when it starts, so each run counts from zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from tampu.files import TMP_PREFIX, write_durably

log = logging.getLogger("tampu.plugins.metrics")

SHARE_DIR: Final = "metrics"
SHARE_EVERY: Final = 1.0
"""Seconds between a worker's writes: how late ``/metrics`` may show a worker's counts."""

LabelKey = tuple[tuple[str, str], ...]


class Collecting(Protocol):
    def collect(self) -> Iterable[Metric]: ...


@dataclass
class Share:
    """What one worker counted (one file)."""

    pid: int
    alive: bool
    samples: dict[str, list[tuple[str, dict[str, str], float]]] = field(default_factory=dict)
    """Metric family -> its samples (name, labels, value)."""
    minutes: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    """The console's per-minute counters: (minute, series -> count)."""
    verdicts: list[tuple[str, str, int, int]] = field(default_factory=list)
    """The console's verdict counts: (plugin, stage, accepted, refused)."""
    errors: list[tuple[float, str, str]] = field(default_factory=list)
    """The worker's recent ERROR lines: (time, logger, message)."""


def encode(pid: int, families: Iterable[Metric], minutes: Sequence[tuple[int, dict[str, int]]],
           verdicts: dict[tuple[str, str], list[int]],
           errors: Iterable[tuple[float, str, str]] = ()) -> bytes:
    """One worker's file."""
    return json.dumps({
        "pid": pid,
        "samples": {f.name: [[s.name, s.labels, s.value] for s in f.samples] for f in families},
        "minutes": [[m, c] for m, c in minutes if m >= 0 and c],
        "verdicts": [[p, s, ok, no] for (p, s), (ok, no) in sorted(verdicts.items())],
        "errors": [list(e) for e in errors],
    }, separators=(",", ":")).encode()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_shares(directory: Path) -> list[Share]:
    """Every worker's file (one that cannot be read or parsed is skipped: it is rewritten)."""
    try:
        names = sorted(p for p in os.listdir(directory) if p.endswith(".json"))
    except OSError:
        return []
    shares = []
    for name in names:
        try:
            raw = json.loads((directory / name).read_bytes())
            pid = int(raw["pid"])
            shares.append(Share(
                pid, _alive(pid),
                {str(k): [(str(n), dict(labels), float(v)) for n, labels, v in samples]
                 for k, samples in raw["samples"].items()},
                [(int(m), {str(k): int(v) for k, v in c.items()}) for m, c in raw["minutes"]],
                [(str(p), str(s), int(ok), int(no)) for p, s, ok, no in raw["verdicts"]],
                [(float(t), str(n), str(m)) for t, n, m in raw.get("errors", ())]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("metrics: %s skipped: %s", name, exc)
    return shares


def merge(families: Iterable[Metric], shares: Sequence[Share]) -> list[Metric]:
    """This process's families with every share added: sums, except ``_created`` (the
    earliest) and the gauges of workers that are gone (left out)."""
    out = []
    for family in families:
        values: dict[tuple[str, LabelKey], list[Any]] = {}
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = [s.labels, s.value]
        for share in shares:
            if family.type == "gauge" and not share.alive:
                continue
            for name, labels, value in share.samples.get(family.name, ()):
                key = (name, tuple(sorted(labels.items())))
                found = values.get(key)
                if found is None:
                    values[key] = [labels, value]
                elif name.endswith("_created"):
                    found[1] = min(found[1], value)
                else:
                    found[1] += value
        merged = Metric(family.name, family.documentation, family.type, family.unit)
        for (name, _), (labels, value) in values.items():
            merged.add_sample(name, labels, value)
        out.append(merged)
    return out


class Merged(Collector):
    """``source``'s metrics (a registry or one metric) with the workers' shares added."""

    def __init__(self, source: Collecting, shares: Callable[[], list[Share]]) -> None:
        self.source = source
        self.shares = shares

    def collect(self) -> Iterable[Metric]:
        return merge(self.source.collect(), self.shares())


def exposed(registries: Sequence[Collecting], shares: Callable[[], list[Share]],
            ) -> CollectorRegistry:
    """The registry that ``/metrics`` serves: ``registries`` with the shares added."""
    out = CollectorRegistry(auto_describe=False)
    for registry in registries:
        out.register(Merged(registry, shares))
    return out


def merge_minutes(first: int, counts: list[dict[str, int]], shares: Sequence[Share],
                  ) -> list[dict[str, int]]:
    """A window of per-minute counters from ``first`` with the shares' counters added."""
    out = [dict(c) for c in counts]
    for share in shares:
        for minute, series in share.minutes:
            if first <= minute < first + len(out):
                slot = out[minute - first]
                for name, n in series.items():
                    slot[name] = slot.get(name, 0) + n
    return out


def merge_verdicts(verdicts: dict[tuple[str, str], list[int]], shares: Sequence[Share],
                   ) -> dict[tuple[str, str], list[int]]:
    out = {key: list(pair) for key, pair in verdicts.items()}
    for share in shares:
        for plugin, stage, ok, no in share.verdicts:
            pair = out.setdefault((plugin, stage), [0, 0])
            pair[0] += ok
            pair[1] += no
    return out


def clear(directory: Path) -> None:
    """Remove the files of an earlier run (the main process, at start)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.endswith(".json") or name.startswith(TMP_PREFIX):
            try:
                os.unlink(directory / name)
            except OSError as exc:
                log.warning("metrics: cannot remove %s: %s", directory / name, exc.strerror)


class Sharer:
    """A worker's side: writes its file every :data:`SHARE_EVERY` seconds when it changed
    (``moved``: a cheap fingerprint of the counts; the file is built only when it moves)."""

    def __init__(self, path: Path, build: Callable[[], bytes],
                 moved: Callable[[], object]) -> None:
        self.path = path
        self.build = build
        self.moved = moved
        self.seen: object = None
        self.failing = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SHARE_EVERY)
            try:
                self.write()
            except Exception:  # a bug here must not end the sharing for good
                log.exception("metrics: cannot share this worker's counts")

    def write(self) -> None:
        seen = self.moved()
        if seen == self.seen and self.path.exists():  # the main process may have cleared it
            return
        data = self.build()
        try:
            self.path.parent.mkdir(mode=0o700, exist_ok=True)
            write_durably(self.path, [data], fsync=False)  # a whole file, never synced
        except OSError as exc:
            if not self.failing:  # once, not every second
                log.warning("metrics: cannot write %s: %s; /metrics lacks this worker's "
                            "counts until it works again", self.path, exc.strerror)
            self.failing = True
            return
        self.seen, self.failing = seen, False

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        self.write()
