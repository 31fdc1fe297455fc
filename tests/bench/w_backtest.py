"""Workload: `session-engine backtest` on a 1M-record log of routed turns, side by side with `replay`.

The recovery workload's synthetic log (w_log.synthetic_log) holds no decisions, so there would be
nothing to re-run. This log is written the way a shard writes one: a population of sessions sends
routed requests (``Route`` events through the pure core, ``engine.core.transitions.apply``, with a budget cap,
per-model estimates and a few repeated requests that escalate), each served request's cost
settles its reservation (``Cost``), and every record goes out as a JSON line with ``seq`` and ``ts``.
Then ``engine.replay`` and ``engine.tools.backtest.backtest`` (no change, and ``strike_limit`` raised)
read the same file, interleaved repetition by repetition. The backtest runs as the CLI runs it: one
process per CPU, each re-running its share of the sessions (docs/backtest.md "Speed"); the same
backtest in one process (``jobs=1``) is measured beside it.

The target's ratio ("backtest speed in decisions/s ... as a ratio to replay of the same log") compares the
two reads of the same log: replay's wall time over the backtest's (equally, the backtest's records/s over
replay's), i.e. how many times longer a backtest of a log takes than its replay. Decisions/s over records/s
is also reported, but it divides unlike units (a log of routed turns holds ~3.5 records per decision).
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from common import median
from w_log import _row

from engine import Config, Tier, replay
from engine.core.transitions import apply
from engine.policy import Options, route_rules
from events import Cost, Route

MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: ["anthropic/claude-sonnet-4.5", "openai/gpt-4.1"],
          Tier.COMPLEX: "anthropic/claude-opus-4.1", Tier.REASONING: "openai/o3"}
PRICE = {"openai/gpt-4o-mini": 300, "anthropic/claude-sonnet-4.5": 9_000, "openai/gpt-4.1": 6_000,
         "anthropic/claude-opus-4.1": 45_000, "openai/o3": 6_000}
TIERS = (Tier.SIMPLE, Tier.MEDIUM, Tier.MEDIUM, Tier.COMPLEX, Tier.REASONING)


def routed_log(path: Path, n: int, sessions: int, seed: int = 5) -> tuple[int, int]:
    """Write a log of at least ``n`` records of routed turns; returns (records, decisions)."""
    rng = random.Random(seed)
    config = Config(enabled=True, tick_ms=0, timeout_ms=1_800_000, strike_limit=2)
    rules = route_rules(MODELS, Options(max_cost_usd=2.0))
    ids = [f"{i:016x}" for i in range(sessions)]
    tiers = {sid: rng.choice(TIERS) for sid in ids}
    states: dict[str, Any] = {}
    estimates = tuple(PRICE.items())
    ts = 1_735_689_600_000
    seq = decisions = 0
    with open(path, "wb", buffering=1 << 20) as f:
        while seq < n:
            ts += rng.randrange(1, 50)
            sid = ids[min(int(rng.paretovariate(1.2)) - 1, sessions - 1) if rng.random() < 0.5
                      else rng.randrange(sessions)]
            tier = tiers[sid] if rng.random() < 0.9 else rng.choice(TIERS)
            model = MODELS[tier] if isinstance(MODELS[tier], str) else MODELS[tier][0]  # type: ignore[index]
            h = f"{rng.randrange(4 if rng.random() < 0.1 else 1 << 30):032x}"
            decisions += 1
            rid = f"r{decisions}"
            route = Route(sid, model, tier, rules, False, h, False, rng.random() < 0.2, rng.random() < 0.1,
                          ("a:east", "a:west"), "bench", estimates, rid)
            lines = []
            out = apply(states.get(sid), route, ts, config)
            state = out.state
            records = list(out.records)
            if out.result.kind != "refuse":
                served = out.result.model
                cost = apply(state, Cost(sid, PRICE[served] * rng.randrange(5, 15) // 10, rid, 2_000, 400), ts,
                             config)
                state = cost.state
                records += cost.records
            states[sid] = state
            for name, fields in records:
                seq += 1
                lines.append(orjson.dumps({"seq": seq, "ts": ts, "event": name, "session_id": sid, **fields}))
            lines.append(b"")
            f.write(b"\n".join(lines))
    return seq, decisions


def backtest(scale: float) -> list[dict[str, Any]]:
    from engine.tools.backtest import _cpus
    from engine.tools.backtest import backtest as run

    n = max(20_000, int(1_000_000 * scale))
    sessions = max(1_000, n // 50)
    reps = 3 if scale >= 1 else 1
    out: dict[str, list[float]] = {"replay": [], "backtest": [], "backtest_serial": [], "backtest_strikes": []}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        started = time.perf_counter()
        records, decisions = routed_log(log, n, sessions)
        build_s = time.perf_counter() - started
        size_mb = log.stat().st_size / 1e6
        changed = 0
        for _ in range(reps):  # interleaved, so that both see the same machine load
            started = time.perf_counter()
            replay(log)
            out["replay"].append(time.perf_counter() - started)
            started = time.perf_counter()
            same = run(log)
            out["backtest"].append(time.perf_counter() - started)
            assert same.decisions == decisions and same.decisions_changed == 0, same.to_json()
            started = time.perf_counter()
            serial = run(log, jobs=1)
            out["backtest_serial"].append(time.perf_counter() - started)
            assert serial.to_json() == same.to_json()
            started = time.perf_counter()
            changed = run(log, ["strike_limit=9"]).decisions_changed
            out["backtest_strikes"].append(time.perf_counter() - started)
    replay_rate = records / median(out["replay"])
    bt_rate = records / median(out["backtest"])
    ratio = bt_rate / replay_rate
    serial_ratio = median(out["replay"]) / median(out["backtest_serial"])
    jobs = _cpus()
    return [{
        "id": "backtest", "title": "What-if backtest (session-engine backtest)",
        "setup": f"a log of {records:,} records of routed turns ({decisions:,} decisions, {size_mb:.0f} MB, "
                 f"{sessions:,} session ids; written through the pure core in {build_s:.1f} s, as a shard writes "
                 f"it); engine.replay(path), then backtest with no change (every decision reproduced) and with "
                 f"strike_limit=9 ({changed:,} decisions changed), as the CLI runs it ({jobs} processes: one "
                 f"per CPU) and in one process (jobs=1); {reps} repetitions, interleaved",
        "rows": [
            _row("backtest, no change", decisions / median(out["backtest"]), "decisions/s"),
            _row(f"backtest speed / replay speed: replay's wall time / backtest's ({jobs} processes, the default "
                 "here), same log, same run", ratio, "x", "≥ 0.5", ratio >= 0.5),
            _row("the same, the backtest in one process (jobs=1)", serial_ratio, "x"),
            _row("backtest decisions/s / replay records/s (read literally: unlike units)",
                 decisions / median(out["backtest"]) / replay_rate, "x"),
            _row("backtest, no change, one process (jobs=1)", decisions / median(out["backtest_serial"]),
                 "decisions/s"),
            _row("backtest, strike_limit=9", decisions / median(out["backtest_strikes"]), "decisions/s"),
            _row("replay", replay_rate, "records/s"),
            _row("backtest, no change", bt_rate, "records/s"),
        ],
        "raw": {k: [round(x, 4) for x in v] for k, v in out.items()},
    }]
