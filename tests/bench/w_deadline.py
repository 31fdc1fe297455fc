"""How long ``Policy.route`` takes end to end, the figure ``Options.deadline_s`` is chosen from.

A route is one ask (``GetSession``) answered by a shard plus the decision and
its told events, so its tail is set by thread hand-offs and the GIL, not by
the rules. The default deadline must sit well above this tail: a route that
misses it serves the router's own choice (kind ``unavailable``, pin skipped).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import median, percentile, session_ids

from engine import Config, SessionStore, Tier
from engine.aio import AsyncSessionStore
from engine.policy import AsyncPolicy, Kind, Options, Policy, Request

MODELS = {Tier.SIMPLE: "cheap", Tier.MEDIUM: "mid", Tier.COMPLEX: "strong", Tier.REASONING: "deep"}
#: Large enough that no route in the run is cut short: the run measures the route, not the deadline.
MEASURING = Options(deadline_s=10.0)
TIERS = (Tier.MEDIUM, Tier.COMPLEX, Tier.MEDIUM, Tier.SIMPLE)


def _requests(sids: list[str], n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tier = TIERS[i % len(TIERS)]
        out.append(Request(model=MODELS[tier], tier=tier, session_id=rng.choice(sids),
                           messages=({"role": "user", "content": f"step {rng.randrange(50)}"},)))
    return out


def _sync_run(policy: Policy, requests: list[Request], threads: int) -> tuple[list[float], int]:
    """Route ``requests`` split across ``threads`` callers; return every latency and the unavailable count."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    unavailable = [0] * threads
    start = threading.Barrier(threads)

    def caller(k: int) -> None:
        own, lat = requests[k::threads], latencies[k]
        start.wait()
        for request in own:
            t0 = time.perf_counter()
            decision = policy.decide(request)
            lat.append(time.perf_counter() - t0)
            unavailable[k] += decision.kind is Kind.UNAVAILABLE
    workers = [threading.Thread(target=caller, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [x for lat in latencies for x in lat], sum(unavailable)


def _async_run(store: SessionStore, requests: list[Request], concurrency: int) -> tuple[list[float], int]:
    """The LiteLLM hook's path: ``AsyncPolicy.decide`` from ``concurrency`` tasks on one event loop."""
    async def main() -> tuple[list[float], int]:
        policy = AsyncPolicy(AsyncSessionStore(store), MODELS, MEASURING)
        latencies: list[float] = []
        unavailable = 0

        async def task(own: list[Request]) -> None:
            nonlocal unavailable
            for request in own:
                t0 = time.perf_counter()
                decision = await policy.decide(request)
                latencies.append(time.perf_counter() - t0)
                unavailable += decision.kind is Kind.UNAVAILABLE
        await asyncio.gather(*(task(requests[k::concurrency]) for k in range(concurrency)))
        return latencies, unavailable
    return asyncio.run(main())


def route_latency(scale: float) -> list[dict[str, Any]]:
    sessions = 10_000
    calls = max(2_000, int(20_000 * scale))  # per repetition and mode
    reps = 3 if scale >= 1 else 1
    sids = session_ids(sessions)
    modes = {"1 thread": ("sync", 1), "8 threads": ("sync", 8), "asyncio, 8 tasks": ("async", 8)}
    agg: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=str(Path(tmp) / "audit.jsonl")))
        try:
            policy = Policy(store, MODELS, MEASURING)
            for request in _requests(sids, sessions, 0):  # every session exists: routes are follow-ups
                policy.decide(request)
            for rep in range(reps):
                for mode, (kind, n) in modes.items():
                    requests = _requests(sids, calls, rep + 1)
                    lat, unavailable = (_sync_run(policy, requests, n) if kind == "sync"
                                        else _async_run(store, requests, n))
                    lat.sort()
                    a = agg[mode]
                    for key, value in (("p50", percentile(lat, 50)), ("p99", percentile(lat, 99)),
                                       ("p99.9", percentile(lat, 99.9)), ("max", lat[-1]),
                                       ("over 5 ms", sum(x > 0.005 for x in lat) / len(lat)),
                                       ("over default", sum(x > Options().deadline_s for x in lat) / len(lat)),
                                       ("unavailable", unavailable)):
                        a.setdefault(key, []).append(value)
        finally:
            store.close()
    rows = []
    for mode, a in agg.items():
        rows += [{"metric": f"{mode}: {key}", "value": median(a[key]) * (1e3 if key in ("p50", "p99", "p99.9", "max")
                                                                          else 100 if key.startswith("over") else 1),
                  "unit": "ms" if key in ("p50", "p99", "p99.9", "max") else "%" if key.startswith("over") else "",
                  "target": f"< default deadline {Options().deadline_s * 1e3:.0f} ms" if key == "p99.9" else "",
                  "met": median(a[key]) < Options().deadline_s if key == "p99.9" else None}
                 for key in ("p50", "p99", "p99.9", "max", "over 5 ms", "over default")]
    return [{
        "id": "deadline", "title": "Route latency and the default Options.deadline_s",
        "setup": f"Policy.decide / AsyncPolicy.decide on {sessions:,} live sessions (follow-ups), audit log on; "
                 f"{calls:,} routes per mode and repetition; medians of {reps} repetitions; measured with a 10 s "
                 f"deadline, so 'over' rows count the routes a deadline would have cut short",
        "rows": rows,
    }]
