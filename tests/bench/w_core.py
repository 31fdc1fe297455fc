"""Workloads 1-3 and 8: the reference, told events with the log on, ask latency, asyncio."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    MODEL,
    as_events,
    barrier,
    median,
    mixed_ops,
    percentile,
    ref_ops,
    session_ids,
    tell_ops,
)
from reference import ReferenceStore

from engine import Config, SessionStore
from engine.aio import AsyncSessionStore
from events import SetSession


def _row(metric: str, value: float, unit: str, target: str = "", met: bool | None = None) -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met}


def _engine(path: Path | None, sids: list[str], **overrides: Any) -> SessionStore:
    settings: dict[str, Any] = {"enabled": True, "tick_ms": 0, "event_log": path}
    settings.update(overrides)
    store = SessionStore(Config(**settings))
    for start in range(0, len(sids), 1_000):
        store.tell_many([SetSession(sid, MODEL) for sid in sids[start:start + 1_000]])
    barrier(store)
    return store


def _reference(sids: list[str]) -> ReferenceStore:
    ref = ReferenceStore()
    for sid in sids:
        ref.set_session(sid, MODEL)
    return ref


def throughput(scale: float) -> list[dict[str, Any]]:
    """Workloads 1 and 2, side by side in every repetition: reference, tell, tell_many, tell without log."""
    sessions = 10_000
    n = max(2_000, int(100_000 * scale))
    reps = 5 if scale >= 1 else 2
    sids = session_ids(sessions)
    ops_per_rep = [mixed_ops(n, sids, seed=rep) for rep in range(reps)]
    times: dict[str, list[float]] = {"ref": [], "tell": [], "tell_many": [], "tell_nolog": []}
    records: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        ref = _reference(sids)
        logged = _engine(Path(tmp) / "audit.jsonl", sids)  # fsync="interval", the default
        unlogged = _engine(None, sids)
        try:
            log = logged._rt.log  # type: ignore[union-attr]
            for ops in ops_per_rep:
                started = time.perf_counter()
                ref_ops(ref, ops)
                times["ref"].append(time.perf_counter() - started)

                seq0 = log.seq
                started = time.perf_counter()
                tell_ops(logged, ops)
                barrier(logged)
                elapsed = time.perf_counter() - started
                times["tell"].append(elapsed)
                records.append((log.seq - seq0) / elapsed)

                started = time.perf_counter()
                for start in range(0, n, 256):
                    logged.tell_many(as_events(ops[start:start + 256]))
                barrier(logged)
                times["tell_many"].append(time.perf_counter() - started)

                started = time.perf_counter()
                tell_ops(unlogged, ops)
                barrier(unlogged)
                times["tell_nolog"].append(time.perf_counter() - started)
        finally:
            logged.close()
            unlogged.close()
    ratio = [t / r for t, r in zip(times["tell"], times["ref"], strict=True)]
    ratio_many = [t / r for t, r in zip(times["tell_many"], times["ref"], strict=True)]
    ref_us = median(times["ref"]) / n * 1e6
    tell_rate = median([n / t for t in times["tell"]])
    w1 = {
        "id": 1, "title": "Reference: a dict of entries behind one lock (in-process limit)",
        "setup": f"{sessions:,} sessions, {n:,} mixed operations per repetition (touch 30%, hash 30%, "
                 f"cost 25%, re-pin 15%), direct method calls, no log; {reps} repetitions",
        "rows": [
            _row("operations/s", median([n / t for t in times["ref"]]), "ops/s"),
            _row("time per operation", ref_us, "µs"),
        ],
    }
    w2 = {
        "id": 2, "title": "Told events, log on",
        "setup": f"{sessions:,} live sessions, the same {n:,} mixed operations per repetition, each built as an "
                 f"event and sent with tell(); audit log written to a file (fsync=\"interval\", the default); "
                 f"timed until every shard has applied and logged them; {reps} repetitions, side by side "
                 f"with the reference",
        "rows": [
            _row("transitions/s, tell()", tell_rate, "events/s", "≥ 100,000", tell_rate >= 100_000),
            _row("log records/s, tell()", median(records), "records/s"),
            _row("time per operation, tell()", median(times["tell"]) / n * 1e6, "µs"),
            _row("engine / reference time per op, tell()", median(ratio), "x", "≤ 10x", median(ratio) <= 10),
            _row("transitions/s, tell_many() (batches of 256)", median([n / t for t in times["tell_many"]]),
                 "events/s"),
            _row("engine / reference, tell_many()", median(ratio_many), "x"),
            _row("transitions/s, tell(), log off", median([n / t for t in times["tell_nolog"]]), "events/s"),
        ],
        "raw": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    return [w1, w2]


#: Shard counts compared side by side with the default in the ask-latency workload.
OTHER_SHARDS = tuple(n for n in (1, 2, 4) if n != Config().shards)


def ask_latency(scale: float) -> list[dict[str, Any]]:
    """Workload 3: store method calls timed one by one, 1 and 8 caller threads."""
    sessions = 10_000
    calls = max(1_000, int(40_000 * scale))  # per repetition, split across the callers
    reps = 3 if scale >= 1 else 1
    sids = session_ids(sessions)
    results: dict[int, dict[str, list[float]]] = {}
    by_shards: dict[int, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = _engine(Path(tmp) / "audit.jsonl", sids)
        # The same 8-thread run on stores with fewer shards, side by side: under one GIL,
        # shards beyond the cores add hand-offs, not parallelism.
        fewer = {n: _engine(Path(tmp) / f"audit-{n}.jsonl", sids, shards=n) for n in OTHER_SHARDS}
        try:
            for rep in range(reps):
                for threads in (1, 8):
                    _ask_sample(results.setdefault(threads, {}), store, sids, threads, calls, rep)
                for n, other in fewer.items():
                    _ask_sample(by_shards.setdefault(n, {}), other, sids, 8, calls, rep)
        finally:
            store.close()
            for other in fewer.values():
                other.close()
    rows = []
    for threads, agg in results.items():
        p99 = median(agg["p99"])
        rows += [
            _row(f"{threads} thread(s): p50", median(agg["p50"]) * 1e3, "ms"),
            _row(f"{threads} thread(s): p99", p99 * 1e3, "ms", "≤ 1 ms" if threads == 8 else "",
                 p99 <= 1e-3 if threads == 8 else None),
            _row(f"{threads} thread(s): max", median(agg["max"]) * 1e3, "ms"),
            _row(f"{threads} thread(s): asks/s", median(agg["rate"]), "asks/s"),
        ]
    for n, agg in by_shards.items():
        rows += [
            _row(f"8 threads, Config(shards={n}): p50", median(agg["p50"]) * 1e3, "ms"),
            _row(f"8 threads, Config(shards={n}): p99", median(agg["p99"]) * 1e3, "ms"),
            _row(f"8 threads, Config(shards={n}): asks/s", median(agg["rate"]), "asks/s"),
        ]
    return [{
        "id": 3, "title": "Ask latency",
        "setup": f"{sessions:,} live sessions, audit log on (fsync=\"interval\"); each caller loops over "
                 f"get_session, touch_session, record_request_hash, add_session_cost, get_session_cost_usd, "
                 f"is_cache_sticky on random sessions; {calls:,} calls per repetition; medians of {reps} "
                 f"repetitions (max: median of the per-repetition maxima). The default store has "
                 f"{Config().shards} shards; the last rows repeat the 8-thread run, interleaved, on stores with "
                 f"{' and '.join(map(str, OTHER_SHARDS))}",
        "rows": rows,
        "raw": {str(k): {m: [round(x, 6) for x in v] for m, v in agg.items()} for k, agg in results.items()},
    }]


def _ask_sample(agg: dict[str, list[float]], store: SessionStore, sids: list[str], threads: int, calls: int,
                seed: int) -> None:
    lat, elapsed = _ask_run(store, sids, threads, calls, seed)
    lat.sort()
    for key, value in (("p50", percentile(lat, 50)), ("p99", percentile(lat, 99)), ("max", lat[-1]),
                       ("rate", len(lat) / elapsed)):
        agg.setdefault(key, []).append(value)


def _ask_run(store: SessionStore, sids: list[str], threads: int, calls: int, seed: int) -> tuple[list[float], float]:
    per = calls // threads
    out: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def caller(index: int) -> None:
        import random

        rng = random.Random(seed * 100 + index)
        picks = [sids[rng.randrange(len(sids))] for _ in range(per)]
        methods = (store.get_session, store.touch_session, lambda s: store.record_request_hash(s, "ab" * 16),
                   lambda s: store.add_session_cost(s, 1_000), store.get_session_cost_usd, store.is_cache_sticky)
        lat = out[index]
        clock = time.perf_counter
        start.wait()
        for i, sid in enumerate(picks):
            call = methods[i % 6]
            t0 = clock()
            call(sid)
            lat.append(clock() - t0)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    return [x for part in out for x in part], elapsed


def asyncio_awaits(scale: float) -> list[dict[str, Any]]:
    """Workload 8: awaits per second from one event loop with 1,000 concurrent tasks."""
    tasks = 1_000
    per_task = max(5, int(40 * scale))
    reps = 3 if scale >= 1 else 1
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=Path(tmp) / "audit.jsonl"))
        astore = AsyncSessionStore(store)

        async def task(sid: str) -> None:
            await astore.set_session(sid, MODEL)
            for i in range(per_task - 1):
                if i % 2:
                    await astore.touch_session(sid)
                else:
                    await astore.get_session(sid)

        async def run(rep: int) -> float:
            started = time.perf_counter()
            await asyncio.gather(*(task(f"aio-{rep}-{i}") for i in range(tasks)))
            return time.perf_counter() - started

        try:
            for rep in range(reps):
                elapsed = asyncio.run(run(rep))
                rates.append(tasks * per_task / elapsed)
        finally:
            store.close()
    return [{
        "id": 8, "title": "asyncio",
        "setup": f"one event loop, {tasks:,} concurrent tasks, each awaiting set_session then "
                 f"{per_task - 1} get_session/touch_session calls on its own session through "
                 f"engine.aio.AsyncSessionStore (audit log on); {reps} repetitions",
        "rows": [_row("awaits/s", median(rates), "awaits/s")],
        "raw": {"rates": [round(r) for r in rates]},
    }]
