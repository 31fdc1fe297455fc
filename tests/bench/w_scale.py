"""Workloads 4 and 5: memory and threads at scale; mass expiry without stop-the-world."""

from __future__ import annotations

import gc
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from common import MODEL, ShiftedClock, barrier, median, os_threads, percentile, session_ids, settled_rss
from reference import ReferenceStore

from engine import Config, SessionStore
from events import SetSession


def _row(metric: str, value: float, unit: str, target: str = "", met: bool | None = None) -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met}


def _grow(store: SessionStore, sids: list[str]) -> None:
    for start in range(0, len(sids), 10_000):
        store.tell_many([SetSession(sid, MODEL) for sid in sids[start:start + 10_000]])
    barrier(store)


def memory(scale: float) -> list[dict[str, Any]]:
    """Workload 4: one store grown from 100 to 100k to 1M sessions; RSS deltas, then tracemalloc at 100k."""
    small, mid, large = 100, max(1_000, int(100_000 * scale)), max(10_000, int(1_000_000 * scale))
    sids = session_ids(large)
    # Default config: the clock thread is on, as in production; no log (its buffers are not session memory).
    store = SessionStore(Config(enabled=True))
    try:
        _grow(store, sids[:small])
        rss0, threads0 = settled_rss(), os_threads()
        started = time.perf_counter()
        _grow(store, sids[small:mid])
        rss1, threads1 = settled_rss(), os_threads()
        _grow(store, sids[mid:large])
        build_s = time.perf_counter() - started
        rss2, threads2 = settled_rss(), os_threads()
        live = store.get_stats().count
    finally:
        store.close()
    del store
    gc.collect()
    # tracemalloc counts live Python allocations only: the exact figure, without allocator slack.
    tracemalloc.start()
    store = SessionStore(Config(enabled=True))
    try:
        _grow(store, sids[:small])
        gc.collect()
        traced0 = tracemalloc.get_traced_memory()[0]
        _grow(store, sids[small:mid])
        gc.collect()
        traced1 = tracemalloc.get_traced_memory()[0]
    finally:
        store.close()
        tracemalloc.stop()
    per_mid = (rss1 - rss0) / (mid - small)
    per_large = (rss2 - rss0) / (large - small)
    traced = (traced1 - traced0) / (mid - small)
    return [{
        "id": 4, "title": "Memory and threads at scale",
        "setup": f"one store (default config: {Config().shards} shards, clock on, no log) grown from {small} to "
                 f"{mid:,} to "
                 f"{large:,} live sessions with tell_many(SetSession); RSS read from /proc after gc.collect(); "
                 f"then a fresh store grown to {mid:,} under tracemalloc; OS threads from /proc/self/status "
                 f"(the benchmark's main thread included). {large:,} sessions built in {build_s:.1f} s",
        "rows": [
            _row(f"bytes per session, RSS delta {small} → {mid:,}", per_mid, "B", "≤ 1,024 B", per_mid <= 1024),
            _row(f"bytes per session, RSS delta {small} → {large:,}", per_large, "B", "≤ 1,024 B",
                 per_large <= 1024),
            _row(f"bytes per session, tracemalloc {small} → {mid:,}", traced, "B", "≤ 1,024 B", traced <= 1024),
            _row(f"OS threads at {small} sessions", threads0, "threads"),
            _row(f"OS threads at {mid:,} sessions", threads1, "threads"),
            _row(f"OS threads at {large:,} sessions", threads2, "threads", "same as at 100",
                 threads2 == threads0),
            _row("live sessions at the end", live, "sessions"),
        ],
    }]


class _Asker(threading.Thread):
    """Keeps asking one session, timing every call, until stopped."""

    def __init__(self, ask: Any) -> None:
        super().__init__(daemon=True)
        self._ask = ask
        self.samples: list[tuple[float, float]] = []  # (started, latency)
        self.stop = threading.Event()

    def run(self) -> None:
        clock = time.perf_counter
        samples = self.samples
        ask = self._ask
        while not self.stop.is_set():
            t0 = clock()
            ask()
            samples.append((t0, clock() - t0))

    def window(self, start: float, end: float) -> list[float]:
        """Latencies of the asks that were in flight at some point in [start, end]."""
        return sorted(lat for t0, lat in self.samples if t0 <= end and t0 + lat >= start)


def mass_expiry(scale: float) -> list[dict[str, Any]]:
    """Workload 5: 100k sessions go idle together; one thread keeps asking a live session meanwhile."""
    n = max(2_000, int(100_000 * scale))
    reps = 3 if scale >= 1 else 1
    timeout_ms = 60_000
    res: dict[str, list[float]] = {"engine_worst": [], "engine_p99": [], "engine_s": [], "engine_base": [],
                                   "seed_worst": [], "seed_s": [], "expired": []}
    with tempfile.TemporaryDirectory() as tmp, ShiftedClock() as clock:
        for rep in range(reps):
            sids = session_ids(n, prefix=f"idle{rep}")
            # The engine: deadline heap, at most expiry_batch (1,000) sessions per shard turn.
            store = SessionStore(Config(enabled=True, tick_ms=0, timeout_ms=timeout_ms,
                                        event_log=Path(tmp) / f"audit-{rep}.jsonl"))
            try:
                _grow(store, sids)
                asker = _Asker(lambda s=store: s.set_session("live-session", MODEL))
                asker.start()
                time.sleep(0.3)  # baseline latency before the expiry
                base_end = time.perf_counter()
                clock.advance(timeout_ms / 1000 + 1)
                started = time.perf_counter()
                expired = store.tick()
                ended = time.perf_counter()
                asker.stop.set()
                asker.join()
                during = asker.window(started, ended)
                baseline = asker.window(0, base_end)
                res["engine_worst"].append(during[-1])
                res["engine_p99"].append(percentile(during, 99))
                res["engine_s"].append(ended - started)
                res["engine_base"].append(percentile(baseline, 99))
                res["expired"].append(expired)
            finally:
                store.close()
            # The seed: one sweep that scans every session under the store's single write lock.
            ref = ReferenceStore(timeout_ms=timeout_ms)
            for sid in sids:
                ref.set_session(sid, MODEL)
            asker = _Asker(lambda r=ref: r.set_session("live-session", MODEL))
            asker.start()
            time.sleep(0.3)
            clock.advance(timeout_ms / 1000 + 1)
            started = time.perf_counter()
            ref.cleanup()
            ended = time.perf_counter()
            time.sleep(0.01)
            asker.stop.set()
            asker.join()
            during = asker.window(started, ended)
            res["seed_worst"].append(during[-1] if during else ended - started)
            res["seed_s"].append(ended - started)
    worst = median(res["engine_worst"])
    seed = median(res["seed_worst"])
    return [{
        "id": 5, "title": "Mass expiry without stop-the-world",
        "setup": f"{n:,} sessions idle past timeout_ms at the same moment (the engine's clock is moved forward); "
                 f"store.tick() expires them (deadline heap, at most expiry_batch=1,000 per shard turn, each "
                 f"expiry logged to a file) while another thread keeps calling set_session on a live session. "
                 f"Seed emulation: the reference store's sweep scans every session under its one lock while "
                 f"the same asker runs. {reps} repetitions; worst = median of the per-repetition worst asks",
        "rows": [
            _row("engine: worst ask stall during expiry", worst * 1e3, "ms", "≤ 10 ms", worst <= 0.010),
            _row("engine: p99 ask during expiry", median(res["engine_p99"]) * 1e3, "ms"),
            _row("engine: p99 ask before expiry", median(res["engine_base"]) * 1e3, "ms"),
            _row("engine: time to expire all", median(res["engine_s"]), "s"),
            _row("engine: sessions expired by tick()", median(res["expired"]), "sessions"),
            _row("seed emulation: worst ask stall during sweep", seed * 1e3, "ms"),
            _row("seed emulation: sweep time", median(res["seed_s"]), "s"),
            _row("seed stall / engine stall", seed / worst if worst else float("inf"), "x"),
        ],
        "raw": {k: [round(x, 6) for x in v] for k, v in res.items()},
    }]
