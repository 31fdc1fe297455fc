"""Workload 9: the audit log's hash chain: what it costs the writer, and --verify speed against replay.

Both ratios are measured side by side in one process, alternating the
variants in every repetition, because these machines are shared and noisy.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from common import MODEL, barrier, median, session_ids
from w_log import _records, _row

from engine import Config, SessionStore, replay
from engine.log.verify import verify
from engine.log.writer import FileLog
from events import SetSession, Touch

MODES = ("off", "batch", "record")


def _tell_rate(path: Path, mode: str, sids: list[str], events: list[Touch]) -> tuple[float, float]:
    """Logged transitions/s (wall clock) and CPU µs per transition (every thread of the process): Touch
    events told in chunks of 2,000 through the actors, ending at a barrier. CPU time is the cost figure:
    on a shared machine the wall clock mostly measures the neighbours."""
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=path, audit_chain=mode, ask_timeout_s=300.0)) as store:
        store.tell_many([SetSession(sid, MODEL) for sid in sids])  # the sessions exist before timing
        barrier(store)
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(events), 2_000):
            store.tell_many(events[start:start + 2_000])
        barrier(store)
        return len(events) / (time.perf_counter() - started), (time.process_time() - cpu) / len(events) * 1e6


def chain(scale: float) -> list[dict[str, Any]]:
    n_tell = max(20_000, int(200_000 * scale))
    n_log = max(20_000, int(500_000 * scale))
    reps = 5 if scale >= 1 else 3
    sids = session_ids(5_000, prefix="c")
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    cpus: dict[str, list[float]] = {m: [] for m in MODES}
    times: dict[str, list[float]] = {"replay": [], "verify": [], "replay_cpu": [], "verify_cpu": []}
    with tempfile.TemporaryDirectory() as tmp:
        events = [Touch(sids[i % len(sids)]) for i in range(n_tell)]
        for rep in range(reps):
            for mode in MODES if rep % 2 == 0 else tuple(reversed(MODES)):
                path = Path(tmp) / f"tell-{mode}-{rep}.jsonl"
                rate, cpu = _tell_rate(path, mode, sids, events)
                rates[mode].append(rate)
                cpus[mode].append(cpu)
                path.unlink()
        # A chained log written by the engine's writer (batches of 512, as a busy shard writes them).
        log = Path(tmp) / "chained.jsonl"
        writer = FileLog(log, fsync="never", segment_bytes=1 << 40)
        batch: list[dict[str, Any]] = []
        for record in _records(n_log, max(1_000, n_log // 20), 3):
            batch.append(record)
            if len(batch) == 512:
                writer.append(batch)
                batch = []
        if batch:
            writer.append(batch)
        writer.close()
        size_mb = log.stat().st_size / 1e6
        report = verify(log)
        assert report.status == "verified", report.problem
        for _ in range(reps):
            for name, run in (("replay", replay), ("verify", verify)):
                started, cpu = time.perf_counter(), time.process_time()
                run(log)
                times[name].append(time.perf_counter() - started)
                times[f"{name}_cpu"].append(time.process_time() - cpu)
    off, on, per_record = (median(rates[m]) for m in MODES)
    cpu_off, cpu_batch, cpu_record = (median(cpus[m]) for m in MODES)
    cost_batch = cpu_batch / cpu_off - 1
    cost_record = cpu_record / cpu_off - 1
    ratio = median(times["replay"]) / median(times["verify"])
    ratio_cpu = median(times["replay_cpu"]) / median(times["verify_cpu"])
    return [{
        "id": 9, "title": "Audit-log hash chain",
        "setup": f"tell throughput: {n_tell:,} Touch events told in chunks of 2,000 over {len(sids):,} sessions, "
                 f"logged (fsync interval), with audit_chain off, batch (default) and record, alternating, "
                 f"{reps} repetitions (cost = extra CPU time per transition, all threads); "
                 f"verify: a {n_log:,}-record chained log ({size_mb:.0f} MB, written by "
                 f"FileLog in batches of 512) read by engine.replay and by audit --verify alternately",
        "rows": [
            _row("tell, chain off", off, "transitions/s"),
            _row("tell, chain per batch (default)", on, "transitions/s"),
            _row("tell, chain per record", per_record, "transitions/s"),
            _row("CPU per transition, chain off", cpu_off, "µs"),
            _row("CPU per transition, chain per batch", cpu_batch, "µs"),
            _row("CPU per transition, chain per record", cpu_record, "µs"),
            _row("cost of the chain per batch (CPU)", cost_batch * 100, "%", "≤ 5 %", cost_batch <= 0.05),
            _row("cost of the chain per record (CPU)", cost_record * 100, "%"),
            _row("replay of the chained log", n_log / median(times["replay"]), "records/s"),
            _row("audit --verify of the same log", n_log / median(times["verify"]), "records/s"),
            _row("verify speed / replay speed (wall clock)", ratio, "x"),
            _row("verify speed / replay speed (CPU time)", ratio_cpu, "x", "≥ 0.5", ratio_cpu >= 0.5),
        ],
        "raw": {**{k: [round(x) for x in v] for k, v in rates.items()},
                **{f"cpu_us_{k}": [round(x, 3) for x in v] for k, v in cpus.items()},
                **{k: [round(x, 3) for x in v] for k, v in times.items()}},
    }]
