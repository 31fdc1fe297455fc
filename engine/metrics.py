"""Prometheus metrics for a SessionStore (prometheus-client).

``Metrics`` implements the runtime's ``Observer`` protocol: each shard calls
``on_batch`` after every batch it applied, with that batch's audit records,
so every number here is derived from what the engine actually did (the same
records the audit log holds), never from what a caller asked for.

Usage::

    metrics = Metrics()                      # its own CollectorRegistry
    store = SessionStore(config, observer=metrics)
    body, content_type = metrics.render()    # serve on /metrics

Each ``Metrics`` owns a dedicated ``CollectorRegistry`` unless one is passed,
so two stores (or two tests) never collide on metric names; pass
``prometheus_client.REGISTRY`` to publish on the process-wide default.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.core.scope import tenant_of
from engine.shell.runtime import Observer
from events import records as record_names

__all__ = [
    "Metrics",
]

log = logging.getLogger("engine.metrics")

#: Batches take microseconds to a few milliseconds; the tail (fsync, GC) reaches further.
LATENCY_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Label values come from the engine's own records, but a caller-chosen escalation
#: reason could still be anything: past this many distinct values they count as "other".
MAX_LABEL_VALUES = 32
#: Hex digits of the chain head in the ``log_head_seq`` label (64 bits: enough to tell heads apart).
HEAD_PREFIX = 16
ENDED = {record_names.SESSION_EXPIRED: "expired", record_names.SESSION_EVICTED: "evicted",
         record_names.SESSION_CLEARED: "cleared"}


class _Labels:
    """A bounded label-value cache for one labelled metric (``.labels()`` is slow and unbounded)."""

    __slots__ = ("_children", "_lock", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __call__(self, value: Any) -> Any:
        key = value if isinstance(value, str) and value else "unknown"
        child = self._children.get(key)
        if child is None:
            with self._lock:
                if key not in self._children and len(self._children) >= MAX_LABEL_VALUES:
                    key = "other"
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._metric.labels(key)
        return child


class Metrics(Observer):
    """The engine's Prometheus metrics; pass it as ``SessionStore(config, observer=metrics)``."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "session_engine") -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        ns, reg = namespace, self.registry
        self.live_sessions = Gauge(
            "live_sessions", "Sessions alive now: created minus ended (expired, evicted, cleared).",
            namespace=ns, registry=reg)
        self.events = Counter(
            "events", "Audit records written, by record name (docs/events.md).",
            ["event"], namespace=ns, registry=reg)
        self.applied = Counter(
            "applied_events", "Events applied by shards (reads included), by shard.",
            ["shard"], namespace=ns, registry=reg)
        self.escalations = Counter(
            "escalations", "Sessions escalated one tier, by reason (strikes, requested, ...).",
            ["reason"], namespace=ns, registry=reg)
        self.expiries = Counter(
            "expiries", "Sessions ended by idle expiry, by reason.",
            ["reason"], namespace=ns, registry=reg)
        self.evictions = Counter(
            "evictions", "Sessions evicted to stay within max_sessions (capacity) or max_sessions_per_tenant "
            "(tenant_limit), by reason.",
            ["reason"], namespace=ns, registry=reg)
        self.tenant_evictions = Counter(
            "tenant_evictions", "Sessions evicted because their tenant was at max_sessions_per_tenant, by tenant "
            f"(the first {MAX_LABEL_VALUES} tenants by name, then \"other\").",
            ["tenant"], namespace=ns, registry=reg)
        self.tenant_refusals = Counter(
            "tenant_refusals", "New sessions refused because their tenant was past "
            f"max_creations_per_tenant_per_minute, by tenant (the first {MAX_LABEL_VALUES}, then \"other\").",
            ["tenant"], namespace=ns, registry=reg)
        self.sessions_ended = Counter(
            "sessions_ended", "Sessions ended, by how (expired, evicted, cleared).",
            ["how"], namespace=ns, registry=reg)
        self.decisions = Counter(
            "decisions", "Routing decisions logged by the policy, by kind.",
            ["kind"], namespace=ns, registry=reg)
        self.unavailable = Counter(
            "policy_unavailable", "Requests routed on the router's own choice because the engine "
            "did not answer in time or failed, by reason.",
            ["reason"], namespace=ns, registry=reg)
        self.cost = Counter(
            "cost_usd", "Spend recorded on sessions, in USD (summed from micros).",
            namespace=ns, registry=reg)
        self.mailbox_depth = Gauge(
            "mailbox_depth", "Events waiting in a shard's mailbox after its last batch.",
            ["shard"], namespace=ns, registry=reg)
        self.apply_seconds = Histogram(
            "event_apply_seconds", "Time a shard took to apply one batch of events (the core's work, "
            "without the log's write and sync).",
            ["shard"], namespace=ns, registry=reg, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram(
            "batch_events", "Events applied per shard batch.",
            namespace=ns, registry=reg, buckets=BATCH_SIZE_BUCKETS)
        self.log_write_seconds = Histogram(
            "log_write_seconds", "Time a shard took to hand one batch of records to the audit log.",
            namespace=ns, registry=reg, buckets=LATENCY_BUCKETS)
        self.log_sync_seconds = Histogram(
            "log_sync_seconds", "Time of one group-commit fsync under fsync=\"always\".",
            namespace=ns, registry=reg, buckets=LATENCY_BUCKETS)
        self.hook_errors = Counter(
            "hook_errors", "Observer hooks (or clock passes, hook=\"clock\") that raised; the engine went on "
            "without them.", ["hook"], namespace=ns, registry=reg)
        self.log_failures = Counter(
            "log_write_failures", "Batches the audit log refused, by op: write or fsync (the OS call failed), "
            "removed (the log file was removed), refused (turned away while the log waits to retry).",
            ["op"], namespace=ns, registry=reg)
        self.log_writable = Gauge(
            "log_writable", "1 while the audit log takes records, 0 during a fault (docs/audit-log.md).",
            namespace=ns, registry=reg)
        self.log_writable.set(1)
        self.log_head = Gauge(
            "log_head_seq", "The seq of the audit log's hash-chain head last exported (at start, every segment "
            "rotation and close), labelled with the head's first 16 hex digits; one series at a time. Keep it "
            "off the machine and check it with `session-engine audit --verify --expect-head SEQ:HEX LOG`.",
            ["head"], namespace=ns, registry=reg)
        self.observer_errors = Counter(
            "observer_errors", "Batches the metrics observer failed to account for (see the log).",
            namespace=ns, registry=reg)
        self._events = _Labels(self.events)
        self._escalations = _Labels(self.escalations)
        self._expiries = _Labels(self.expiries)
        self._evictions = _Labels(self.evictions)
        self._ended = _Labels(self.sessions_ended)
        self._tenant_evictions = _Labels(self.tenant_evictions)
        self._tenant_refusals = _Labels(self.tenant_refusals)
        self._decisions = _Labels(self.decisions)
        self._unavailable = _Labels(self.unavailable)
        self._hook_errors = _Labels(self.hook_errors)
        self._log_failures = _Labels(self.log_failures)
        self._shards: dict[int, tuple[Any, Any, Any]] = {}
        self._head_lock = threading.Lock()

    # -- the Observer protocol ---------------------------------------------------------
    def on_batch(self, shard: int, n_events: int, records: list[dict[str, Any]],
                 apply_seconds: float, queue_depth: int) -> None:
        """Account for one shard batch. Never raises: a metrics bug must not fail a shard."""
        try:
            self._on_batch(shard, n_events, records, apply_seconds, queue_depth)
        except Exception:
            self.observer_errors.inc()
            log.exception("session-engine metrics: a batch could not be accounted for")

    def _on_batch(self, shard: int, n_events: int, records: list[dict[str, Any]],
                  apply_seconds: float, queue_depth: int) -> None:
        children = self._shards.get(shard)
        if children is None:
            key = str(shard)
            children = self._shards[shard] = (
                self.applied.labels(key), self.mailbox_depth.labels(key), self.apply_seconds.labels(key))
        applied, depth, latency = children
        applied.inc(n_events)
        depth.set(queue_depth)
        latency.observe(apply_seconds)
        self.batch_size.observe(n_events)
        self._account(records)

    def _account(self, records: list[dict[str, Any]]) -> None:
        """Count what the records say happened: every number here comes from the log's records."""
        live = 0
        micros = 0
        for record in records:
            name = record.get("event")
            self._events(name).inc()
            if name == record_names.SESSION_CREATED:
                live += 1
            elif name in ENDED:
                live -= 1
                self._ended(ENDED[name]).inc()
                if name == record_names.SESSION_EXPIRED:
                    self._expiries(record.get("reason")).inc()
                elif name == record_names.SESSION_EVICTED:
                    reason = record.get("reason")
                    self._evictions(reason).inc()
                    if reason == "tenant_limit":
                        self._tenant_evictions(tenant_of(record.get("session_id") or "")).inc()
            elif name == record_names.SESSION_ESCALATED:
                self._escalations(record.get("reason")).inc()
            elif name == record_names.COST_ADDED:
                value = record.get("micros")
                if type(value) is int and value > 0:
                    micros += value
            elif name == record_names.DECISION_MADE:
                self._decisions(record.get("kind")).inc()
            elif name == record_names.SESSION_REFUSED:
                self._tenant_refusals(tenant_of(record.get("session_id") or "")).inc()
        if live:
            self.live_sessions.inc(live)
        if micros:
            self.cost.inc(micros / 1_000_000)

    # -- what the policy reports directly ------------------------------------------------
    def count_unavailable(self, reason: str) -> None:
        """Count a request served on the router's own choice because the engine did not answer."""
        self._unavailable(reason).inc()

    def on_start(self, live_sessions: int) -> None:
        """Start the live-sessions gauge at what the store restored from its log."""
        if live_sessions:
            self.live_sessions.inc(live_sessions)

    def on_records(self, records: list[dict[str, Any]]) -> None:
        """Records no shard batch carries (rejected input, shard restarts, start-up evictions)."""
        try:
            self._account(records)
        except Exception:
            self.observer_errors.inc()
            log.exception("session-engine metrics: records could not be accounted for")

    def on_log_write(self, seconds: float) -> None:
        self.log_write_seconds.observe(seconds)

    def on_log_sync(self, seconds: float) -> None:
        self.log_sync_seconds.observe(seconds)

    def on_log_failure(self, op: str, error: BaseException) -> None:
        self._log_failures(op).inc()

    def on_log_writable(self, writable: bool) -> None:
        self.log_writable.set(1 if writable else 0)

    def on_hook_error(self, hook: str, error: BaseException) -> None:
        self._hook_errors(hook).inc()

    def on_log_head(self, seq: int, head: str) -> None:
        """Replace the exported head: the previous head's series goes, so the label never piles up."""
        with self._head_lock:
            self.log_head.clear()
            self.log_head.labels(head[:HEAD_PREFIX]).set(seq)

    # -- exposition ---------------------------------------------------------------------
    def render(self) -> tuple[bytes, str]:
        """The text exposition format and its content type, for a ``/metrics`` endpoint."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0.0 when absent): handy in tests and health checks."""
        got = self.registry.get_sample_value(name, labels or {})
        return 0.0 if got is None else got
