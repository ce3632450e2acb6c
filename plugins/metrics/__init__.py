"""``metrics``: Prometheus metrics and the admin console on their own HTTP listener.

``GET /metrics`` (Prometheus text format, from ``prometheus-client`` with a registry of this
server's own) and the read-only console (``GET /``, ``GET /why``: :mod:`.console`). Loopback by
default: the console shows addresses and configuration details, so keep it private.

State (the metrics, the HTTP listener) lives in the server stash, so a reload keeps the counters
and the listener; the new plugin instance takes them over in ``tampu_reload``. With
``[server] workers`` > 1 only the main process listens; the workers share what they count
through files that it adds to its own (:mod:`.shared`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from pydantic import Field, field_validator

from tampu import (
    DeliveryResult,
    Envelope,
    PluginContext,
    PluginSettings,
    QueueItem,
    Reply,
    ServerContext,
    Session,
    StashKey,
    hookimpl,
)
from tampu.authres import results
from tampu.backends import SharedQueueStore
from tampu.config import split_hostport
from tampu.envelope import Verdict
from tampu.plugins.metrics.console import Console
from tampu.plugins.metrics.http import HttpServer, Request, Response
from tampu.plugins.metrics.shared import (
    SHARE_DIR,
    Share,
    Sharer,
    clear,
    encode,
    exposed,
    read_shares,
)
from tampu.plugins.metrics.status import QueueSummary, RecentErrors
from tampu.workers import current_worker

log = logging.getLogger("tampu.plugins.metrics")

TIMING_SHARE_EVERY = 10.0
"""Seconds between a worker's shares of its hook timing (its counts: every second)."""
HOOK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)


class MetricsSettings(PluginSettings):
    priority: int = Field(default=0, description="Order on each hook: metrics only observes, "
                          "so it runs first and sees every connection and transaction.")
    address: str = Field(default="127.0.0.1:9125", description="host:port of the HTTP "
                         "listener for /metrics and the status page; keep it on loopback or a "
                         "private network. Port 0 picks a free port (tests).")
    recent_errors: int = Field(default=20, ge=0, le=1000, description="How many recent "
                               "ERROR log lines the status page shows.")

    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        split_hostport(value)
        return value


_COUNTED: StashKey[bool] = StashKey()
_REPLY_CLASS = {n: f"{n}xx" for n in range(10)}


class _QueueCollector(Collector):
    def __init__(self, state: MetricsState) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        summary = self.state.queue_summary()
        yield GaugeMetricFamily("tampu_queue_items", "Items in the queue.", value=summary.items)
        yield GaugeMetricFamily("tampu_queue_oldest_age_seconds",
                                "Age of the oldest queue item (0 when empty).",
                                value=summary.oldest_age)
        store = self.state.context.store
        if isinstance(store, SharedQueueStore):  # a shared queue: this node's health and lag
            for name, (text, value) in store.gauges().items():
                if name not in ("tampu_queue_items", "tampu_queue_oldest_age_seconds"):
                    family = GaugeMetricFamily(name, text, labels=["node"])
                    family.add_metric([store.node], value)
                    yield family


class MetricsState:
    """The metrics and the HTTP listener of one server; survives reloads (server stash)."""

    def __init__(self, context: ServerContext, errors: int) -> None:
        self.context = context
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Counter("tampu_connections", "SMTP connections accepted.",
                                   ["listener"], registry=r)
        self.open = Gauge("tampu_connections_open", "SMTP connections open now.",
                          ["listener"], registry=r)
        self.transactions = Counter("tampu_transactions", "SMTP transactions that reached "
                                    "DATA, by the class of the final reply.",
                                    ["listener", "reply"], registry=r)
        self.spf = Counter("tampu_spf_results", "SPF results of incoming transactions.",
                           ["result"], registry=r)
        self.authres = Counter("tampu_authentication_results", "Results of the checks of "
                               "incoming transactions (spf, dkim, dmarc ...).",
                               ["method", "result"], registry=r)
        self.refusals = Counter("tampu_refusals", "Refusals, by the stage, the plugin that "
                                "decided (core: syntax, limits, nobody accepted) and the "
                                "reply code.", ["stage", "plugin", "code"], registry=r)
        self.auth = Counter("tampu_auth_attempts", "SMTP AUTH attempts.", ["result"],
                            registry=r)
        self.queued = Counter("tampu_messages_queued", "Messages queued, by origin (smtp, "
                              "dsn, forward).", ["origin"], registry=r)
        self.dsns = Counter("tampu_dsn_sent", "Delivery status notifications queued.",
                            registry=r)
        self.attempts = Counter("tampu_delivery_attempts", "Delivery attempts by backend "
                                "plugin and result.", ["backend", "result"], registry=r)
        self.timing_registry = CollectorRegistry(auto_describe=True)
        """The hook timing histogram alone: a worker shares it less often (it costs ms)."""
        self.hook_seconds = Histogram("tampu_hook_duration_seconds", "Time spent in each "
                                      "plugin's hook implementations.", ["hook", "plugin"],
                                      buckets=HOOK_BUCKETS, registry=self.timing_registry)
        self._hook_children: dict[tuple[str, str], Any] = {}
        self._bound: dict[tuple[object, tuple[str, ...]], Any] = {}
        """(metric, label values) -> its child: ``labels()`` once per combination."""
        self.hook_failures = Counter("tampu_hook_failures", "Hook implementations that "
                                     "raised or timed out.", ["hook", "plugin", "outcome"],
                                     registry=r)
        self.changes = 0
        """Bumped by every observation: a worker's share is built only when it moved."""
        self._timing: list[Any] = []
        self._timing_due = 0.0
        self.worker = current_worker()
        self.share_dir = context.data_dir / SHARE_DIR
        self.sharer: Sharer | None = None
        if self.worker:  # the queue gauges are the main process's
            self.sharer = Sharer(self.share_dir / f"worker-{self.worker}.json", self._share,
                                 self._moved)
        else:
            r.register(_QueueCollector(self))
            clear(self.share_dir)
        self.exposed = exposed([r, self.timing_registry], self.shares)
        self.errors = RecentErrors(errors)
        self.console = Console(self)
        self.http = HttpServer({"/metrics": self._metrics, **self.console.routes()})
        self.address = ""

    def shares(self) -> list[Share]:
        """What the reception workers counted (none in a worker)."""
        return [] if self.worker else read_shares(self.share_dir)

    def _moved(self) -> tuple[int, int, float]:
        records = self.errors.records
        return self.changes, len(records), records[-1].when if records else 0.0

    def _share(self) -> bytes:
        now = time.monotonic()
        if now >= self._timing_due:  # collecting the histogram costs ms: at most every 10 s
            self._timing = list(self.timing_registry.collect())
            self._timing_due = now + TIMING_SHARE_EVERY
        ring = self.console.ring
        return encode(os.getpid(), [*self.registry.collect(), *self._timing], ring.slots,
                      self.console.verdicts,
                      [(r.when, r.logger, r.message) for r in self.errors.records])

    # ------------------------------------------------------------------ lifecycle

    def attach(self, context: ServerContext) -> None:
        """Follow ``context`` (start-up or a reload): observe the timing of its hooks."""
        self.context = context
        if self.observe not in context.hook_observers:
            context.hook_observers.append(self.observe)

    async def listen(self, address: str) -> None:
        if self.sharer is not None:
            # With [server] workers > 1 only the main process serves the endpoint (no two
            # processes race for the address); a worker shares its counts with it.
            log.debug("metrics: reception worker %d does not serve %s", self.worker, address)
            self.sharer.start()
            return
        if address == self.address and self.http.server is not None:
            return
        await self.http.stop()
        host, port = split_hostport(address)
        try:
            await self.http.start(host, port)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            log.warning("metrics: %s is in use (another program?); metrics are not exported",
                        address)
            return
        self.address = address
        log.info("metrics: serving /metrics and / on %s:%d", *(self.http.bound or ("?", 0)))

    async def close(self) -> None:
        if self.sharer is not None:
            self._timing_due, self.changes = 0.0, self.changes + 1  # the last share: all new
            await self.sharer.stop()
        await self.http.stop()
        logging.getLogger("tampu").removeHandler(self.errors)

    # ------------------------------------------------------------------ observations

    def child(self, metric: Any, *labels: str) -> Any:  # noqa: ANN401 - prometheus types
        """``metric.labels(*labels)``, looked up once (label values are few: listeners,
        plugins, reply classes, results)."""
        self.changes += 1
        key = (metric, labels)
        found = self._bound.get(key)
        if found is None:
            found = self._bound[key] = metric.labels(*labels)
        return found

    def observe(self, hook: str, plugin: str, seconds: float, outcome: str) -> None:
        # Called for every hook call of every plugin: look each histogram child up once.
        self.changes += 1
        child = self._hook_children.get((hook, plugin))
        if child is None:
            child = self._hook_children[(hook, plugin)] = self.hook_seconds.labels(hook, plugin)
        child.observe(seconds)
        if outcome != "ok":
            self.child(self.hook_failures, hook, plugin, outcome).inc()

    def count_results(self, envelope: Envelope, stage: str) -> None:
        """Count authentication results: SPF's when MAIL FROM is decided (refused or not),
        the others (DKIM, DMARC ...) when DATA is."""
        for found in results(envelope):
            if (found.method == "spf") != (stage == "mail"):
                continue
            self.child(self.authres, found.method, found.result).inc()
            if found.method == "spf":
                self.child(self.spf, found.result).inc()

    def queue_summary(self) -> QueueSummary:
        store = self.context.store
        if isinstance(store, SharedQueueStore):  # as its heartbeat last measured it
            gauges = store.gauges()
            return QueueSummary(int(gauges.get("tampu_queue_items", ("", 0.0))[1]),
                                gauges.get("tampu_queue_oldest_age_seconds", ("", 0.0))[1])
        summary = getattr(store, "summary", None)  # the filesystem store's
        if summary is None:
            return QueueSummary(0, 0.0)
        n, oldest = summary()
        now = time.time()
        return QueueSummary(n, max(0.0, now - oldest) if oldest is not None else 0.0)

    # ------------------------------------------------------------------ HTTP

    async def _metrics(self, request: Request) -> Response:
        body = await asyncio.to_thread(generate_latest, self.exposed)
        return 200, CONTENT_TYPE_LATEST, body


METRICS_STATE: StashKey[MetricsState] = StashKey()


class MetricsPlugin:
    Settings = MetricsSettings

    def __init__(self, ctx: PluginContext[MetricsSettings]) -> None:
        self.ctx = ctx
        self.state: MetricsState | None = None

    @property
    def port(self) -> int:
        """The bound port of the HTTP listener (0 if not listening)."""
        bound = self.state.http.bound if self.state is not None else None
        return bound[1] if bound else 0

    # ---------------------------------------------------------------- lifecycle

    @hookimpl
    async def tampu_startup(self, context: ServerContext) -> None:
        state = MetricsState(context, self.ctx.settings.recent_errors)
        context.stash[METRICS_STATE] = state
        logging.getLogger("tampu").addHandler(state.errors)
        await self._take(state, context)

    @hookimpl
    async def tampu_reload(self, context: ServerContext) -> None:
        state = context.stash.get(METRICS_STATE, None)
        if state is None:  # enabled by this reload
            await self.tampu_startup(context)
            return
        state.errors.records = type(state.errors.records)(state.errors.records,
                                                          maxlen=self.ctx.settings.recent_errors)
        await self._take(state, context)

    async def _take(self, state: MetricsState, context: ServerContext) -> None:
        self.state = state
        state.attach(context)
        await state.listen(self.ctx.settings.address)

    @hookimpl
    async def tampu_shutdown(self, context: ServerContext) -> None:
        if self.state is not None:
            await self.state.close()
            if context.stash.get(METRICS_STATE, None) is self.state:
                del context.stash[METRICS_STATE]

    # ---------------------------------------------------------------- reception

    @hookimpl
    def smtp_connect(self, session: Session) -> None:
        if self.state is not None:
            session.stash[_COUNTED] = True
            state = self.state
            state.child(state.connections, session.listener.name).inc()
            state.child(state.open, session.listener.name).inc()

    @hookimpl
    def smtp_verdict(self, envelope: Envelope | None, verdict: Verdict) -> None:
        if self.state is None:
            return
        self.state.changes += 1
        self.state.console.verdict(verdict)
        if verdict.refused:
            self.state.child(self.state.refusals, verdict.stage, verdict.plugin,
                             str(verdict.reply.code)).inc()
        if envelope is not None and verdict.stage in ("mail", "data"):
            self.state.count_results(envelope, verdict.stage)

    @hookimpl
    def smtp_auth_result(self, success: bool) -> None:
        if self.state is not None:
            self.state.child(self.state.auth, "success" if success else "failure").inc()

    @hookimpl
    def smtp_transaction_done(self, session: Session, envelope: Envelope, reply: Reply) -> None:
        if self.state is not None:
            self.state.child(self.state.transactions, session.listener.name,
                             _REPLY_CLASS[reply.code // 100]).inc()

    @hookimpl
    def smtp_disconnect(self, session: Session) -> None:
        if self.state is not None:
            if session.stash.get(_COUNTED, False):
                self.state.child(self.state.open, session.listener.name).dec()

    # ---------------------------------------------------------------- queue

    @hookimpl
    def queue_enqueued(self, item: QueueItem) -> None:
        if self.state is not None:
            self.state.child(self.state.queued, item.origin).inc()
            if item.origin == "dsn":
                self.state.dsns.inc()

    @hookimpl
    def delivery_attempted(self, result: DeliveryResult, backend: str) -> None:
        if self.state is not None:
            self.state.child(self.state.attempts, backend, result.status).inc()
            self.state.console.attempt(result)
