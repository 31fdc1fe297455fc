"""Durability benchmarks for the audit log (not part of `make test`).

    .venv/bin/python tests/bench/bench_durability.py [--records 1000000]

Measures: raw log append throughput; replay and restart-recovery time of a
log of N records; store transitions/s with logging on (fsync interval);
fsync="always" acknowledged operations/s with 1 and with 8 concurrent callers.
The numbers depend on the disk: docs/audit-log.md quotes one run.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path

from engine import Config, SessionStore, replay
from engine.log.writer import FileLog
from events import SetSession, Touch


def synthetic_records(n: int, sessions: int, seed: int = 1):
    """A realistic mix: sessions created, touched, hashed, charged, escalated, some expiring."""
    rng = random.Random(seed)
    live: dict[str, int] = {}
    ts = 1_740_819_600_000
    made = 0
    counter = 0
    while made < n:
        ts += rng.randint(0, 5)
        sid = f"{rng.randrange(sessions):016x}"
        count = live.get(sid)
        if count is None:
            live[sid] = 1
            counter += 1
            yield {"seq": 0, "ts": ts, "event": "session.created", "session_id": sid, "model": "openai/gpt-4o-mini",
                   "tier": "SIMPLE", "created_at": ts, "last_used_at": ts, "request_count": 1, "recent_hashes": [],
                   "strikes": 0, "escalated": False, "user_explicit": False, "cache_sticky": False,
                   "cache_sticky_at": 0, "provider": "", "session_cost_micros": 0, "deployment": ""}
        else:
            roll = rng.random()
            if roll < 0.45:
                live[sid] = count + 1
                yield {"seq": 0, "ts": ts, "event": "session.touched", "session_id": sid, "last_used_at": ts,
                       "request_count": count + 1}
            elif roll < 0.7:
                yield {"seq": 0, "ts": ts, "event": "hash.recorded", "session_id": sid,
                       "recent_hashes": ["0f3a9c2e1b7d4a6f8e5c3b1a9d7f2e4c"], "strikes": 0}
            elif roll < 0.95:
                yield {"seq": 0, "ts": ts, "event": "cost.added", "session_id": sid, "micros": 1200,
                       "session_cost_micros": 1200 * count}
            elif roll < 0.98:
                yield {"seq": 0, "ts": ts, "event": "session.escalated", "session_id": sid, "tier": "MEDIUM",
                       "escalated": True, "reason": "strikes", "from_tier": "SIMPLE"}
            else:
                del live[sid]
                yield {"seq": 0, "ts": ts, "event": "session.expired", "session_id": sid, "reason": "idle",
                       "idle_ms": 1_800_001}
        made += 1


def bench_log(directory: Path, records: int, sessions: int) -> None:
    path = directory / "big.jsonl"
    # "interval": close() fsyncs, so the kernel is not writing the file back while replay is timed.
    log = FileLog(path, fsync="interval", segment_bytes=1 << 40)
    batch: list[dict] = []
    started = time.perf_counter()
    for record in synthetic_records(records, sessions):
        batch.append(record)
        if len(batch) == 512:
            log.append(batch)
            batch = []
    if batch:
        log.append(batch)
    log.close()
    del log
    elapsed = time.perf_counter() - started
    size = path.stat().st_size
    print(f"append (FileLog alone, batches of 512, incl. making the records): {records / elapsed:,.0f} records/s "
          f"({size / 1e6:.0f} MB, {records:,} records)")

    started = time.perf_counter()
    state = replay(path)
    elapsed = time.perf_counter() - started
    print(f"replay of {records:,} records: {elapsed:.2f} s = {records / elapsed:,.0f} records/s "
          f"({len(state):,} live sessions)")

    started = time.perf_counter()
    store = SessionStore(Config(enabled=True, tick_ms=0, event_log=path, timeout_ms=10**12))
    elapsed = time.perf_counter() - started
    restored = store.get_stats().count
    store.close()
    print(f"restart recovery of {records:,} records (store ready to serve): {elapsed:.2f} s, "
          f"{restored:,} sessions restored")


def bench_store(directory: Path, fsync: str, transitions: int = 200_000, sessions: int = 10_000) -> None:
    """Touch transitions told in batches through the actors, each one logged; ends at a barrier."""
    path = directory / f"store-{fsync}.jsonl"
    ids = [f"sess-{i}" for i in range(sessions)]
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=path, fsync=fsync)) as store:
        store.tell_many([SetSession(sid, "m") for sid in ids])
        store.get_stats()  # a broadcast ask: every shard has applied what was told before it
        events = [Touch(ids[i % sessions]) for i in range(transitions)]
        started = time.perf_counter()
        for start in range(0, transitions, 2_000):
            store.tell_many(events[start:start + 2_000])
        store.get_stats()
        elapsed = time.perf_counter() - started
    print(f"store, logging on (fsync={fsync}): {transitions / elapsed:,.0f} transitions/s")


def bench_always(directory: Path, callers: int, ops: int) -> None:
    path = directory / f"always-{callers}.jsonl"
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=path, fsync="always", shards=4)) as store:
        per = ops // callers

        def work(n: int) -> None:
            for i in range(per):
                store.set_session(f"c{n}-{i % 50}", "m")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(callers)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    print(f'fsync="always", {callers} concurrent caller(s): {per * callers / elapsed:,.0f} acknowledged ops/s')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=50_000)
    parser.add_argument("--always-ops", type=int, default=2_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        bench_log(directory, args.records, args.sessions)
        for fsync in ("never", "interval"):
            bench_store(directory, fsync)
        for callers in (1, 8):
            bench_always(directory, callers, args.always_ops)


if __name__ == "__main__":
    main()
