"""Where a told event's time goes: CPU per event in the caller and in the shards, and a cProfile of each.

Profiles use ``time.thread_time`` as the timer, so a thread waiting for the
GIL, a lock or the disk is not charged: the figures are CPU work.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import MODEL, barrier, mixed_ops, session_ids, tell_ops

import engine.shell.shard as shard_module
from engine import Config, SessionStore
from events import SetSession


def _top(stats: pstats.Stats, n: int, total: float, events: int) -> list[dict[str, Any]]:
    rows = []
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in entries[:n]:
        where = filename.split("/site-packages/")[-1].split("/work/main/")[-1]
        if where.startswith("~"):
            where = "builtin"
        rows.append({"function": f"{where}:{line}({name})" if line else name, "calls": calls,
                     "self_us_per_event": tottime / events * 1e6, "cum_us_per_event": cumtime / events * 1e6,
                     "self_share": tottime / total if total else 0.0})
    return rows


def _pass(ops: list[Any], sids: list[str], profiled: bool) -> tuple[float, float, Any, Any]:
    """Tell ``ops``; return caller CPU, shard CPU (seconds) and, when profiled, both profiles."""
    profiles: dict[int, cProfile.Profile] = {}
    shard_cpu = [0.0]
    lock = threading.Lock()
    original = shard_module.Shard.on_receive

    def on_receive(self: Any, message: Any) -> Any:
        ident = threading.get_ident()
        with lock:
            prof = profiles.setdefault(ident, cProfile.Profile(time.thread_time)) if profiled else None
        cpu0 = time.thread_time()
        if prof is not None:
            prof.enable()
        try:
            return original(self, message)
        finally:
            if prof is not None:
                prof.disable()
            with lock:
                shard_cpu[0] += time.thread_time() - cpu0

    shard_module.Shard.on_receive = on_receive  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = SessionStore(Config(enabled=True, tick_ms=0, event_log=Path(tmp) / "audit.jsonl"))
            try:
                store.tell_many([SetSession(sid, MODEL) for sid in sids])
                barrier(store)
                profiles.clear()
                shard_cpu[0] = 0.0
                caller = cProfile.Profile(time.thread_time)
                cpu0 = time.thread_time()
                if profiled:
                    caller.enable()
                tell_ops(store, ops)
                caller.disable()
                caller_cpu = time.thread_time() - cpu0
                barrier(store)
            finally:
                store.close()
    finally:
        shard_module.Shard.on_receive = original  # type: ignore[method-assign]
    shard_stats = None
    for prof in profiles.values():
        if shard_stats is None:
            shard_stats = pstats.Stats(prof, stream=io.StringIO())
        else:
            shard_stats.add(prof)
    caller_stats = pstats.Stats(caller, stream=io.StringIO()) if profiled else None
    return caller_cpu, shard_cpu[0], caller_stats, shard_stats


def profile(scale: float) -> list[dict[str, Any]]:
    n = max(5_000, int(100_000 * scale))
    sids = session_ids(10_000)
    ops = mixed_ops(n, sids, seed=99)
    caller_cpu, shard_cpu, _, _ = _pass(ops, sids, profiled=False)
    _, _, caller_stats, shard_stats = _pass(ops, sids, profiled=True)
    per_event = (caller_cpu + shard_cpu) / n
    return [{
        "id": "profile", "title": "Profile of told events (cProfile, CPU time per thread)",
        "setup": f"{n:,} mixed events told one by one over 10,000 sessions, audit log on (fsync=\"interval\"). "
                 f"CPU per event from time.thread_time of the caller and of every shard turn, unprofiled; then "
                 f"the same run under cProfile with time.thread_time as the timer (waiting for the GIL, a lock "
                 f"or the disk is not charged; profiling inflates each call, the shares are what matter)",
        "rows": [
            {"metric": "caller CPU per event (build the event + tell)", "value": caller_cpu / n * 1e6, "unit": "µs"},
            {"metric": "shard CPU per event (apply + records + log write)", "value": shard_cpu / n * 1e6,
             "unit": "µs"},
            {"metric": "ceiling under one GIL: 1 / (caller + shard CPU)", "value": 1 / per_event,
             "unit": "events/s"},
        ],
        "caller_top": _top(caller_stats, 8, caller_stats.total_tt, n),  # type: ignore[attr-defined]
        "shard_top": _top(shard_stats, 14, shard_stats.total_tt, n),  # type: ignore[attr-defined]
    }]
