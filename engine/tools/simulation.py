"""The parts of a simulated run that one process (engine/tools/simulate.py) and the replica processes
(engine/tools/replicas.py) share: the simulated clock, the record counter, the router worker pool, the result and
its summary table."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

import engine._time as engine_time
from engine.core.kinds import Kind
from engine.shell.runtime import Observer
from engine.tools.promises import Promise
from events import EngineError
from events import records as record_names

if TYPE_CHECKING:
    from engine.tools.simulate import SimulationConfig
    from engine.tools.workload import PolicyRouter, Request, Router

__all__ = [
    "START_MS", "RecordCounter", "SimClock", "SimulationError", "SimulationResult", "Workers", "summary_table",
]


class SimulationError(EngineError):
    """The simulation cannot run as asked (bad option or log path)."""


#: The simulated clock starts at 2025-01-01T00:00:00Z, so a seed gives the same timestamps on every run.
START_MS = 1_735_689_600_000
@dataclass(frozen=True, slots=True)
class SimulationResult:
    """What the run did; every count but ``strikes`` is read from the engine's own records."""

    requests: int
    sessions_seen: int
    sessions_created: int
    live_sessions: int
    strikes: int
    escalations: int
    expiries: int
    expiries_by_clock: int
    resumed_after_expiry: int
    evictions: int
    cache_pins: int
    cache_pins_lapsed: int
    explicit_pins: int
    cost_micros: int
    #: Records in the audit log, read back from the file.
    records: int
    log_seq_ok: bool
    simulated_ms: int
    wall_s: float
    peak_threads: int
    record_counts: dict[str, int] = field(default_factory=dict)
    #: Policy workload: decisions by kind, budget refusals and downgrades, engine-unavailable answers,
    #: session lives that hit their cap (a refusal or a downgrade), the costliest session life.
    decisions: dict[str, int] = field(default_factory=dict)
    refusals: int = 0
    downgrades: int = 0
    unavailable: int = 0
    sessions_capped: int = 0
    max_session_cost_micros: int = 0
    #: ``session.created`` records that continue a budget ledger past its session's idle expiry (not counted
    #: in ``sessions_created``: the same budget goes on).
    ledger_continuations: int = 0
    #: With ``check``: every promise and whether the run's log kept it (``engine.tools.promises``).
    promises: tuple[Promise, ...] = ()

    @property
    def promises_held(self) -> bool:
        return all(p.held for p in self.promises)

    @property
    def events_per_s(self) -> float:
        return self.records / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0


# -- the simulated clock ---------------------------------------------------------------------------
class SimClock:
    """A thread-local simulated clock, installed as the engine's clock source for one run."""

    def __init__(self, start_ms: int) -> None:
        self._local = threading.local()
        self._default = start_ms

    def set(self, ms: int) -> None:
        """The time this thread's next engine calls see."""
        self._local.ms = ms
        if ms > self._default:
            self._default = ms

    def read(self) -> float:
        # Threads that never set a time (the engine's own) see the latest time handed out.
        # The half millisecond keeps int(seconds * 1000) from rounding down a float error.
        return (getattr(self._local, "ms", self._default) + 0.5) / 1000

    @contextlib.contextmanager
    def installed(self) -> Iterator[SimClock]:
        """Route every clock read of the engine here until the block ends (simulator only)."""
        saved: Callable[[], float] = engine_time._read
        engine_time._read = self.read
        try:
            yield self
        finally:
            engine_time._read = saved


class RecordCounter(Observer):
    """Observer counting the records each shard commits (one Counter per shard: no shared writes)."""

    def __init__(self, shards: int) -> None:
        self._counts = [Counter[str]() for _ in range(shards)]
        self._explicit = [0] * shards
        self._cost = [0] * shards
        self._kinds = [Counter[str]() for _ in range(shards)]
        self._downgrades = [0] * shards
        self._strikes = [0] * shards
        self._last_strikes: list[dict[str, int]] = [{} for _ in range(shards)]
        self._capped: list[set[tuple[str, int]]] = [set() for _ in range(shards)]
        self._lives: list[dict[str, int]] = [{} for _ in range(shards)]
        self._max_cost = [0] * shards
        self._ledgers = [0] * shards

    def on_batch(self, shard: int, n_events: int, records: list[dict[str, Any]], apply_seconds: float,
                 queue_depth: int) -> None:
        counts = self._counts[shard]
        for record in records:
            name = record["event"]
            counts[name] += 1
            if name == record_names.COST_ADDED:
                self._cost[shard] += record["micros"]
                self._max_cost[shard] = max(self._max_cost[shard], record["session_cost_micros"])
            elif name == record_names.DECISION_MADE:
                kind = record["kind"]
                self._kinds[shard][kind] += 1
                downgrade = kind == Kind.BYPASS and record.get("downgrade", False)
                self._downgrades[shard] += downgrade
                if kind == Kind.REFUSE or downgrade:
                    sid = record["session_id"]
                    self._capped[shard].add((sid, self._lives[shard].get(sid, 0)))
            elif name == record_names.HASH_RECORDED:
                sid, strikes = record["session_id"], record["strikes"]
                last = self._last_strikes[shard]
                if strikes > last.get(sid, 0):
                    self._strikes[shard] += strikes - last.get(sid, 0)
                last[sid] = strikes
            if name == record_names.SESSION_CREATED:
                if record.get("cause") == "budget_ledger":  # the same budget goes on: not a new session life
                    self._ledgers[shard] += 1
                    continue
                if record.get("user_explicit") is True:
                    self._explicit[shard] += 1
                sid = record["session_id"]
                self._last_strikes[shard].pop(sid, None)
                self._lives[shard][sid] = self._lives[shard].get(sid, 0) + 1
            elif name == record_names.SESSION_UPDATED and record.get("user_explicit") is True:
                self._explicit[shard] += 1

    def get(self, name: str) -> int:
        return sum(c.get(name, 0) for c in self._counts)

    def totals(self) -> dict[str, int]:
        return _merged(self._counts)

    @property
    def explicit(self) -> int:
        return sum(self._explicit)

    @property
    def cost(self) -> int:
        return sum(self._cost)

    @property
    def kinds(self) -> dict[str, int]:
        return _merged(self._kinds)

    @property
    def downgrades(self) -> int:
        return sum(self._downgrades)

    @property
    def strikes(self) -> int:
        return sum(self._strikes)

    @property
    def capped(self) -> int:
        return sum(len(c) for c in self._capped)

    @property
    def max_cost(self) -> int:
        return max(self._max_cost)

    @property
    def created(self) -> int:
        """Sessions created: ``session.created`` records less the budget ledgers' continuations."""
        return self.get(record_names.SESSION_CREATED) - self.ledgers

    @property
    def ledgers(self) -> int:
        return sum(self._ledgers)


def _merged(per_shard: list[Counter[str]]) -> dict[str, int]:
    """The shards' counts summed, by name."""
    total: Counter[str] = Counter()
    for counts in per_shard:
        total.update(counts)
    return dict(sorted(total.items()))


class Workers:
    """``concurrency`` threads routing one conversation's requests at a time, in order."""

    def __init__(self, routers: list[Router] | list[PolicyRouter]) -> None:
        self.routers = routers
        self.queue: queue.Queue[list[Request] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, args=(r,), name=f"simulate-worker-{i}", daemon=True)
                        for i, r in enumerate(routers)]
        for thread in self.threads:
            thread.start()

    def _run(self, router: Router | PolicyRouter) -> None:
        while True:
            group = self.queue.get()
            try:
                if group is None:
                    return
                for req in group:
                    if self.error is not None:
                        break  # the run is failing or stopping: skip what is left
                    router.route(req)
            except BaseException as exc:  # handed to the main thread, which raises it
                if self.error is None:
                    self.error = exc
            finally:
                self.queue.task_done()

    def run_chunk(self, requests: list[Request]) -> None:
        groups: dict[int, list[Request]] = {}
        for req in requests:
            groups.setdefault(req.conversation.index, []).append(req)
        # Longest first, so the busiest conversation does not start last and hold up the clock pass.
        for group in sorted(groups.values(), key=len, reverse=True):
            self.queue.put(group)
        self.queue.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self.error is None:
            self.error = SimulationError("stopped")  # workers skip whatever is still queued
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join(timeout=30)


def _caps(cfg: SimulationConfig, r: SimulationResult) -> str:
    if cfg.max_cost_usd is None:
        return f"no cap; costliest session ${r.max_session_cost_micros / 1_000_000:,.2f}"
    return (f"cap ${cfg.max_cost_usd:,.2f}/session; costliest ${r.max_session_cost_micros / 1_000_000:,.2f}; "
            f"{r.sessions_capped:,} session lives reached it")


def _duration(ms: int) -> str:
    s = ms // 1000
    return f"{s // 3600}h{s // 60 % 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def summary_table(cfg: SimulationConfig, r: SimulationResult, log_path: Path) -> Table:
    """The readable end of a run: one row per count."""
    table = Table(title=f"session-engine simulate (seed {cfg.seed}, {cfg.workload} workload)", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    engine_threads = r.peak_threads - cfg.concurrency - 1
    rows = [
        ("requests routed", f"{r.requests:,}"),
        ("sessions seen (distinct conversations)", f"{r.sessions_seen:,} of {cfg.sessions:,}"),
        ("sessions created (incl. after expiry)", f"{r.sessions_created:,}"),
        *([("budget ledgers kept past idle expiry", f"{r.ledger_continuations:,}")] if r.ledger_continuations else []),
        ("live sessions at the end", f"{r.live_sessions:,}"),
        ("strikes (repeated identical requests)", f"{r.strikes:,}"),
        ("escalations", f"{r.escalations:,}"),
        ("idle expiries (by clock pass)", f"{r.expiries:,} ({r.expiries_by_clock:,})"),
        ("conversations resumed after expiry", f"{r.resumed_after_expiry:,}"),
    ]
    if cfg.max_sessions is not None or r.evictions:
        rows.append(("evictions (max sessions)", f"{r.evictions:,}"))
    rows += [
        ("provider cache pins (lapsed)", f"{r.cache_pins:,} ({r.cache_pins_lapsed:,})"),
        ("user-explicit pins", f"{r.explicit_pins:,}"),
        ("total cost", f"${r.cost_micros / 1_000_000:,.2f}"),
    ]
    if cfg.workload == "policy":
        decided = sum(r.decisions.values())
        rows += [
            ("decisions by kind", ", ".join(f"{k} {n:,}" for k, n in r.decisions.items())),
            ("budget refusals / downgrades", f"{r.refusals:,} / {r.downgrades:,}"),
            ("engine unavailable (rate)", f"{r.unavailable:,} ({r.unavailable / decided if decided else 0:.2%})"),
            ("spend against caps", _caps(cfg, r)),
        ]
    rows += [
        ("simulated time", _duration(r.simulated_ms)),
        ("audit log", str(log_path)),
        ("log records written", f"{r.records:,} ({'seq 1..N, no gaps' if r.log_seq_ok else 'SEQ CHECK FAILED'})"),
        ("wall time", f"{r.wall_s:.1f} s"),
        ("throughput", f"{r.requests_per_s:,.0f} requests/s, {r.events_per_s:,.0f} events/s"),
        ("threads (peak)", f"{r.peak_threads} ({cfg.concurrency} worker{'s' * (cfg.concurrency != 1)} + main"
                           f" + {engine_threads} engine)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
