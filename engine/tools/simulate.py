"""``session-engine simulate``: a realistic LLM-router workload driven through a real SessionStore.

By default (``workload="policy"``) every request goes through the routing
policy's turn (``engine.policy.Policy.route``): per-session budgets with
reservations settled by ``record_response``, deployment candidates with one
deployment down for a stretch of the run, tool-using requests and failing tool
loops, explicit pins, cache stickiness. ``workload="seed"`` drives the store's
seed API directly, as the first version did.

The workload (engine/tools/workload.py; docs/simulate.md gives the numbers): a population of
conversations with Zipf-skewed popularity sends follow-up turns; some turns
are repeated verbatim (a user retrying, an agent stuck in a loop), which
strikes and, on the third identical request, auto-escalates the session; some
users pin a model explicitly; long contexts pin a provider's prefix cache;
every request is charged in micro-USD; idle conversations expire.

The clock. The engine reads time in exactly one place, ``engine._time._read``
(reached through ``now_ms``). The simulator replaces that one function, for
the duration of the run only, with a simulated clock: request number ``i``
happens at ``start + i * clock_speed`` simulated seconds, and the clock
value is thread-local, so each worker stamps its request with the request's
own time whatever the interleaving. This is a seam for the simulator only,
not an engine option: nothing is added to the engine, and the real store
code runs unchanged, it just sees a clock that moves at ``clock_speed``
simulated seconds per request instead of the wall clock. (freezegun would do
the same but is a test dependency; shortening the real timeout would make
the run depend on machine speed.)

Determinism. The background clock is off (``tick_ms=0``). The request
sequence is generated from ``seed`` in the main thread, one chunk of
``TICK_EVERY_S`` simulated seconds at a time. Within a chunk, each
conversation's requests are handed to one worker in order; different
conversations run concurrently. At the end of a chunk every request has
been applied (store methods wait for their result), and the main thread
runs one clock pass (``store.tick()``) at the chunk's end time. So every
session sees the same events at the same times for a given seed, and the
counts in the summary (requests, strikes, escalations, expiries, pins, cost,
records) repeat exactly; only the order of records in the log (their
``seq``) depends on thread interleaving. With ``max_sessions`` set,
evictions depend on that interleaving too.

The counts come from the engine: strikes from ``record_request_hash``'s
return values, everything else from the records the shards commit to the
audit log (an ``Observer``), and the log file is read back at the end to
check that ``seq`` runs 1..N without a gap.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import engine._time as engine_time
from engine.core.config import Config
from engine.core.entry import Entry
from engine.core.kinds import Kind
from engine.log.replay import LogCorrupt, archives, read_log, replay
from engine.policy import Policy
from engine.store import SessionStore
from engine.tools.promises import Promise, check_promises, format_promises
from engine.tools.simulation import (
    START_MS,
    RecordCounter,
    SimClock,
    SimulationError,
    SimulationResult,
    Workers,
    summary_table,
)
from engine.tools.workload import PolicyRouter, Router, Workload, model_table, policy_options
from events import InvalidEvent
from events import records as record_names

__all__ = [
    "SimulationConfig", "check_promises", "run_simulation",
]

#: Simulated seconds between two clock passes (``store.tick()``).
TICK_EVERY_S = 30.0
#: Fewest requests between two clock passes, so a slow clock still leaves work to run concurrently.
MIN_CHUNK = 64


WORKLOADS = ("policy", "seed")


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """Sizes and knobs of one run; the CLI options map one to one."""

    sessions: int = 2_000
    requests: int = 60_000
    concurrency: int = 8
    seed: int = 7
    log: Path | str = "session-engine-audit.jsonl"
    timeout_s: int = 600
    clock_speed: float = 0.05
    shards: int = 2
    max_sessions: int | None = None
    #: Router processes sharing one Redis started for the run (engine/tools/replicas.py); 1: this process.
    replicas: int = 1
    #: "policy": every request through ``Policy.route``; "seed": the store's seed API. None: policy, or
    #: seed with replicas (the replicated run drives the seed workload only).
    workload: str | None = None
    #: Policy workload: each session's budget in USD (None: no cap), and how long a route may wait.
    max_cost_usd: float | None = 2.0
    deadline_s: float = 2.0
    #: Check the engine's promises on the run's own log at the end (``engine.tools.promises``) and print them.
    check: bool = False

    def __post_init__(self) -> None:
        if self.workload is None:
            object.__setattr__(self, "workload", "seed" if self.replicas != 1 else "policy")
        if self.workload not in WORKLOADS:
            raise InvalidEvent("workload", "must be policy or seed")
        if self.workload == "policy" and self.replicas != 1:
            raise InvalidEvent("replicas", "runs the seed workload only (workload='seed')")
        if self.max_cost_usd is not None and (type(self.max_cost_usd) not in (int, float)
                                              or not 0 <= self.max_cost_usd < 1e9):
            raise InvalidEvent("max_cost_usd", "must be a number of USD >= 0, or None")
        if type(self.deadline_s) not in (int, float) or not self.deadline_s > 0:
            raise InvalidEvent("deadline_s", "must be a positive number of seconds")
        for name in ("sessions", "requests", "concurrency", "timeout_s", "shards", "replicas"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise InvalidEvent(name, "must be an int >= 1")
        if type(self.seed) is not int:
            raise InvalidEvent("seed", "must be an int")
        if type(self.clock_speed) not in (int, float) or not self.clock_speed > 0:
            raise InvalidEvent("clock_speed", "must be a positive number of simulated seconds")
        if self.max_sessions is not None and (type(self.max_sessions) is not int or self.max_sessions < 1):
            raise InvalidEvent("max_sessions", "must be an int >= 1 or None")
        if not isinstance(self.log, (str, Path)) or not str(self.log):
            raise InvalidEvent("log", "must be a file path")
        if type(self.check) is not bool:
            raise InvalidEvent("check", "must be a bool")
        if self.check and self.replicas != 1:
            raise InvalidEvent("check", "reads the run's file log: not with replicas (their log is Redis streams)")

    @property
    def chunk(self) -> int:
        """Requests between two clock passes."""
        return max(MIN_CHUNK, round(TICK_EVERY_S / self.clock_speed))


# -- the run -------------------------------------------------------------------------------------------
def prepare_log(path: Path) -> None:
    """Refuse a path we cannot write to; remove an earlier run's log and segments (the run replaces them)."""
    parent = path.parent
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise SimulationError(f"cannot write the audit log {path}: directory {parent} {what}")
    if path.is_dir():
        raise SimulationError(f"cannot write the audit log {path}: it is a directory")
    for old in [*archives(path), *([path] if path.exists() else [])]:
        old.unlink()
    if path.is_symlink():
        path.unlink()


def check_log(path: Path) -> tuple[int, bool]:
    """Read the log back through the engine's own reader, every segment: the number of records, and whether
    their seq runs 1..N (the reader refuses a gap, a repeat or a line that is not a record: ``LogCorrupt``)."""
    count = 0
    try:
        for count, record in enumerate(read_log(path, history=True), 1):
            if record["seq"] != count:
                return count, False
    except LogCorrupt:
        return count, False
    return count, True


def run_simulation(cfg: SimulationConfig, progress: bool = False, out: Console | None = None,
                   err: TextIO | None = None) -> SimulationResult:
    """Run the workload, print the summary to ``out`` (stdout by default), and return the counts.

    Raises ``EngineError`` (a bad option or log path, an engine failure) or ``OSError``.
    """
    if cfg.replicas > 1:
        from engine.tools.replicas import run_replicated

        return run_replicated(cfg, progress, out, err)
    log_path = Path(cfg.log)
    prepare_log(log_path)
    out = out or Console()
    err_console = Console(file=err or sys.stderr)
    show_progress = progress and err_console.is_terminal
    step_ms = cfg.clock_speed * 1000
    policy_mode = cfg.workload == "policy"
    # The policy's rules escalate on strikes themselves; the seed workload relies on the store's auto-escalation.
    config = Config(enabled=True, timeout_ms=cfg.timeout_s * 1000, event_log=log_path, tick_ms=0,
                    max_sessions=cfg.max_sessions, auto_escalate=not policy_mode, shards=cfg.shards)
    counter = RecordCounter(cfg.shards)
    workload = Workload(cfg.sessions, cfg.requests, cfg.seed, agent_loops=policy_mode)
    clock = SimClock(START_MS)
    by_clock = 0
    peak_threads = threading.active_count()
    done = 0
    started = time.perf_counter()
    with clock.installed():
        clock.set(START_MS)
        store = SessionStore(config, observer=counter)
        routers: list[Router] | list[PolicyRouter]
        policy = None
        if policy_mode:
            policy = Policy(store, model_table(), policy_options(cfg.max_cost_usd, cfg.deadline_s))
            routers = [PolicyRouter(policy, clock.set, START_MS, step_ms, cfg.requests) for _ in range(cfg.concurrency)]
        else:
            routers = [Router(store, clock.set, START_MS, step_ms) for _ in range(cfg.concurrency)]
        workers = None
        bar = Progress(TextColumn("[bold]simulate"), BarColumn(bar_width=24), MofNCompleteColumn(),
                       TextColumn("requests {task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       console=err_console, disable=not show_progress, transient=True)
        try:
            workers = Workers(routers)
            with bar:
                task = bar.add_task("simulate", total=cfg.requests, status="")
                while done < cfg.requests:
                    chunk = workload.chunk(cfg.chunk)
                    workers.run_chunk(chunk)
                    done += len(chunk)
                    peak_threads = max(peak_threads, threading.active_count())
                    # The clock pass at the chunk's end time, after every request of the chunk.
                    clock.set(START_MS + int(done * step_ms))
                    by_clock += store.tick()
                    bar.update(task, completed=done, status=(
                        f"escalations {counter.get(record_names.SESSION_ESCALATED):,}  "
                        f"expiries {counter.get(record_names.SESSION_EXPIRED):,}"))
            live = store.get_stats().count
            if cfg.check:
                live_state = _live_state(store, log_path, workload)
        finally:
            if workers is not None:
                workers.stop()
            store.close()
    wall = time.perf_counter() - started
    records, seq_ok = check_log(log_path)
    promises: tuple[Promise, ...] = ()
    if cfg.check:
        cap = None if not policy_mode or cfg.max_cost_usd is None else round(cfg.max_cost_usd * 1_000_000)
        promises = tuple(check_promises(log_path, live_state, sum(r.sent_micros for r in routers), cap_micros=cap))
    result = SimulationResult(
        requests=done,
        sessions_seen=len(workload.conversations),
        sessions_created=counter.created,
        ledger_continuations=counter.ledgers,
        live_sessions=live,
        strikes=counter.strikes if policy_mode else sum(r.strikes for r in routers),  # type: ignore[union-attr]
        escalations=counter.get(record_names.SESSION_ESCALATED),
        expiries=counter.get(record_names.SESSION_EXPIRED),
        expiries_by_clock=by_clock,
        resumed_after_expiry=sum(r.resumed for r in routers),
        evictions=counter.get(record_names.SESSION_EVICTED),
        cache_pins=counter.get(record_names.STICKY_PINNED),
        cache_pins_lapsed=counter.get(record_names.STICKY_EXPIRED),
        explicit_pins=counter.explicit,
        cost_micros=counter.cost,
        records=records,
        log_seq_ok=seq_ok,
        simulated_ms=int(done * step_ms),
        wall_s=wall,
        peak_threads=peak_threads,
        record_counts=counter.totals(),
        decisions=counter.kinds,
        refusals=counter.kinds.get(Kind.REFUSE, 0),
        downgrades=counter.downgrades,
        unavailable=policy.unavailable_count if policy is not None else 0,
        sessions_capped=counter.capped,
        max_session_cost_micros=counter.max_cost if policy_mode else 0,
        promises=promises,
    )
    out.print(summary_table(cfg, result, log_path))
    if promises:
        out.print("promise check (the run's own log, read by the engine's readers):")
        for line in format_promises(list(promises)):
            out.print("  " + line, highlight=False, markup=False, soft_wrap=True)
    return result


def _live_state(store: SessionStore, log_path: Path, workload: Workload) -> dict[str, Entry]:
    """What the live store serves, read through ``get_session`` for every id the log or the workload names
    (and checked against the store's own count, so a session neither names is caught too)."""
    ids = set(replay(log_path)) | {conv.session_id for conv in workload.conversations.values()}
    state = {sid: entry for sid in sorted(ids) if (entry := store.get_session(sid)) is not None}
    # get_stats counts the sessions in use (a budget ledger outliving its session's idle timeout is not one).
    now, timeout = engine_time.now_ms(), store.config.timeout_ms
    in_use = sum(1 for entry in state.values() if now - entry.last_used_at <= timeout)
    count = store.get_stats().count
    if count != in_use:
        raise SimulationError(f"the store holds {count:,} sessions in use, {in_use:,} found by id")
    return state


