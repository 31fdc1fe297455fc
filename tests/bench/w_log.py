"""Workloads 6 and 7: durability (fsync policies, group commit) and recovery (replay, restart)."""

from __future__ import annotations

import random
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from common import MODEL, barrier, median, session_ids

from engine import Config, SessionStore, replay
from events import SetSession


def _row(metric: str, value: float, unit: str, target: str = "", met: bool | None = None) -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met}


def _acked_rate(path: Path, fsync: str, callers: int, seconds: float) -> float:
    """Acknowledged store calls per second (each writes one record) from ``callers`` threads."""
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=path, fsync=fsync)) as store:
        sids = [session_ids(50, prefix=f"c{n}") for n in range(callers)]
        store.tell_many([SetSession(sid, MODEL) for part in sids for sid in part])
        barrier(store)
        counts = [0] * callers
        stop = threading.Event()
        go = threading.Barrier(callers + 1)

        def caller(n: int) -> None:
            mine = sids[n]
            touch = store.touch_session
            go.wait()
            done = 0
            while not stop.is_set():
                touch(mine[done % 50])
                done += 1
            counts[n] = done

        workers = [threading.Thread(target=caller, args=(n,)) for n in range(callers)]
        for w in workers:
            w.start()
        go.wait()
        started = time.perf_counter()
        time.sleep(seconds)
        stop.set()
        for w in workers:
            w.join()
        return sum(counts) / (time.perf_counter() - started)


def durability(scale: float) -> list[dict[str, Any]]:
    """Workload 6: fsync="always" with 1 and 8 concurrent callers, and the default policy."""
    seconds = 1.0 if scale >= 1 else 0.3
    reps = 3 if scale >= 1 else 1
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(reps):
            for fsync in ("always", "interval"):
                for callers in (1, 8):
                    key = f"{fsync}-{callers}"
                    path = Path(tmp) / f"{key}-{rep}.jsonl"
                    rates.setdefault(key, []).append(_acked_rate(path, fsync, callers, seconds))
    group = [e / o for e, o in zip(rates["always-8"], rates["always-1"], strict=True)]
    gain = median(group)
    return [{
        "id": 6, "title": "Durability",
        "setup": f"callers loop touch_session (an ask: it returns once its record is written under the policy; "
                 f"one record each) on their own 50 sessions for {seconds:g} s; fsync=\"always\" acknowledges "
                 f"after fsync, shared by concurrent callers (group commit); {reps} repetitions, side by side",
        "rows": [
            _row('fsync="always", 1 caller', median(rates["always-1"]), "records/s"),
            _row('fsync="always", 8 callers', median(rates["always-8"]), "records/s"),
            _row("group commit gain, 8 callers / 1 caller", gain, "x", "several x (≥ 3x)", gain >= 3),
            _row('fsync="interval" (default), 1 caller', median(rates["interval-1"]), "records/s"),
            _row('fsync="interval" (default), 8 callers', median(rates["interval-8"]), "records/s"),
        ],
        "raw": {k: [round(x) for x in v] for k, v in rates.items()},
    }]


def synthetic_log(path: Path, n: int, sessions: int, seed: int = 3) -> int:
    """Write an ``n``-record log directly (no engine): creations, touches, hashes, costs, escalations, expiries.

    Timestamps end at the current time, so a store restarted on it finds live sessions.
    """
    with open(path, "wb", buffering=1 << 20) as f:
        chunk = []
        for record in _records(n, sessions, seed):
            chunk.append(orjson.dumps(record))
            if len(chunk) == 10_000:
                chunk.append(b"")
                f.write(b"\n".join(chunk))
                chunk = []
        chunk.append(b"")
        f.write(b"\n".join(chunk))
    return n


def _records(n: int, sessions: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    ids = [f"{i:016x}" for i in range(sessions)]
    live: dict[str, list[int]] = {}  # sid -> [request_count, cost, strikes]
    ts = int(time.time() * 1000) - n // 4
    hashes = [f"{i:032x}" for i in range(3)]
    for seq in range(1, n + 1):
        ts += rng.random() < 0.25
        sid = ids[rng.randrange(sessions)]
        s = live.get(sid)
        if s is None:
            live[sid] = [1, 0, 0]
            yield {"seq": seq, "ts": ts, "event": "session.created", "session_id": sid, "model": MODEL,
                   "tier": "SIMPLE", "created_at": ts, "last_used_at": ts, "request_count": 1, "recent_hashes": [],
                   "strikes": 0, "escalated": False, "user_explicit": False, "cache_sticky": False,
                   "cache_sticky_at": 0, "provider": "", "session_cost_micros": 0, "deployment": ""}
            continue
        roll = rng.random()
        if roll < 0.40:
            s[0] += 1
            yield {"seq": seq, "ts": ts, "event": "session.touched", "session_id": sid, "last_used_at": ts,
                   "request_count": s[0]}
        elif roll < 0.65:
            yield {"seq": seq, "ts": ts, "event": "hash.recorded", "session_id": sid,
                   "recent_hashes": hashes[: 1 + rng.randrange(3)], "strikes": s[2]}
        elif roll < 0.92:
            s[1] += 1_200
            yield {"seq": seq, "ts": ts, "event": "cost.added", "session_id": sid, "micros": 1_200,
                   "session_cost_micros": s[1]}
        elif roll < 0.97:
            yield {"seq": seq, "ts": ts, "event": "session.escalated", "session_id": sid, "tier": "MEDIUM",
                   "escalated": True, "reason": "strikes", "from_tier": "SIMPLE"}
        else:
            del live[sid]
            yield {"seq": seq, "ts": ts, "event": "session.expired", "session_id": sid, "reason": "idle",
                   "idle_ms": 1_800_001}


def _restart(event_log: Path) -> tuple[float, int]:
    """Seconds until a store opened on the log is ready to serve, and the sessions it restored."""
    started = time.perf_counter()
    store = SessionStore(Config(enabled=True, tick_ms=0, event_log=event_log, fsync="never"))
    elapsed = time.perf_counter() - started
    try:
        return elapsed, store.get_stats().count
    finally:
        store.close()


def recovery(scale: float) -> list[dict[str, Any]]:
    """Workload 7: replay and restart on a 1M-record log, then on a segment directory with a snapshot."""
    n = max(20_000, int(1_000_000 * scale))
    sessions = max(1_000, n // 20)
    reps = 3 if scale >= 1 else 1
    out: dict[str, list[float]] = {"replay": [], "restart": [], "replay_snap": [], "restart_snap": []}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        started = time.perf_counter()
        synthetic_log(log, n, sessions)
        build_s = time.perf_counter() - started
        size_mb = log.stat().st_size / 1e6
        live = 0
        for _ in range(reps):
            started = time.perf_counter()
            live = len(replay(log))
            out["replay"].append(time.perf_counter() - started)
            out["restart"].append(_restart(log)[0])
        # The same history as segment 1 of a directory; a store opened on it with a tiny segment
        # size rotates at its first write, so segment 2 opens with a snapshot of every live session.
        seg = Path(tmp) / "segments"
        seg.mkdir()
        log.rename(seg / f"{1:020d}.jsonl")
        with SessionStore(Config(enabled=True, tick_ms=0, event_log=seg, fsync="never", segment_bytes=4096)) as s:
            s.set_session("after-snapshot", MODEL)
        segments = sorted(p.name for p in seg.iterdir())
        for _ in range(reps):
            started = time.perf_counter()
            live_snap = len(replay(seg))
            out["replay_snap"].append(time.perf_counter() - started)
            out["restart_snap"].append(_restart(seg)[0])
    rate = n / median(out["replay"])
    return [{
        "id": 7, "title": "Recovery and replay",
        "setup": f"a log of {n:,} records ({size_mb:.0f} MB, {sessions:,} session ids, {live:,} live at the end; "
                 f"written directly in {build_s:.1f} s) replayed with engine.replay(path), and a store opened "
                 f"on it (time until the constructor returns, state restored); then the same history as the "
                 f"first segment of a directory whose newest segment starts with a snapshot "
                 f"({len(segments)} segments); {reps} repetitions",
        "rows": [
            _row("replay, single file", rate, "records/s", "≥ 500,000", rate >= 500_000),
            _row("replay, single file: time", median(out["replay"]), "s"),
            _row(f"restart from {n:,} records, no snapshot", median(out["restart"]), "s"),
            _row("restart rate, no snapshot", n / median(out["restart"]), "records/s"),
            _row("replay, from the snapshot segment", median(out["replay_snap"]), "s"),
            _row("restart, from the snapshot segment", median(out["restart_snap"]), "s"),
            _row("sessions restored from the snapshot", live_snap, "sessions"),
        ],
        "raw": {k: [round(x, 4) for x in v] for k, v in out.items()},
    }]
