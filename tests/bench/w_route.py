"""Workload 10: the routing turn against a snapshot route, side by side.

Per request a router routes and, after the (instant) upstream call, reports its cost:

- **route turn**: ``Policy.route`` (one ask carrying a ``Route`` event: the session's turn
  decides, applies the pin and, with a cap, reserves the estimate), then ``record_response`` (a tell
  that settles the reservation);
- **snapshot route**: ask ``GetSession``, run the same pure rules on the snapshot,
  tell the events they imply plus the ``Decision``, build the caller's ``RouteDecision``, then report
  the cost through ``record_response`` (the same calls the turn makes, bar the ask and the tell).

Both at 1 and 8 caller threads, without a cap and with one (large enough never to refuse), on one
store with the audit log on, interleaved repetition by repetition. Besides wall-clock throughput, the
process CPU time per route (every thread: callers, shards, log) is reported: on a loaded machine it
moves far less than the wall clock, so its ratio is the steadier reading of the work per request.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import barrier, median, percentile, session_ids

from engine import Config, SessionStore, Tier
from engine.core.rules import decide_route
from engine.policy import Options, Policy, Request, provider_from_model
from events import Decision as DecisionEvent
from events import GetSession

MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3"}
TIERS = (Tier.MEDIUM, Tier.MEDIUM, Tier.COMPLEX, Tier.SIMPLE)


def _row(metric: str, value: float, unit: str, target: str = "", met: bool | None = None) -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "target": target, "met": met}


def _requests(sids: list[str], n: int, offset: int) -> list[Request]:
    out = []
    for i in range(n):
        tier = TIERS[(i + offset) % len(TIERS)]
        out.append(Request(model=MODELS[tier], tier=tier, session_id=sids[(i * 7 + offset) % len(sids)],
                           messages=[{"role": "user", "content": f"step {i % 5}"}], estimate_usd=0.001))
    return out


def _turn(policy: Policy, request: Request) -> None:
    decision = policy.route(request)
    policy.record_response(request.session_id, cost_usd=0.0009, decision=decision)


def _snapshot(policy: Policy, request: Request) -> None:
    """A snapshot route through ``Policy``, with the same per-request steps as the
    turn (identify, the no-lookup check, the caller's ``RouteDecision``, the cost reported through
    ``record_response``): only the ask + tell differs. It reserves nothing, as no snapshot route does."""
    store = policy.store
    request = policy._identify(request)
    assert policy._without_lookup(request) is None
    state = store.ask(GetSession(request.session_id), timeout=5.0)
    event = policy._route_event(request)
    routed, events = decide_route(state, event, store.config)
    routed = replace(routed, reservation_id="")  # what engine.policy.decide does on a snapshot
    events.append(DecisionEvent(request.session_id, routed.kind, routed.model, routed.tier,
                                provider_from_model(routed.model), routed.reason, event.rules.strategy,
                                request.source, routed.deployment))
    store.tell_many(events)
    decision = policy._routed(request, routed)
    policy.record_response(request.session_id, cost_usd=0.0009, decision=decision)


def _run(fn: Any, policy: Policy, requests: list[Request], threads: int) -> tuple[float, float, list[float]]:
    """Wall time and process CPU time for all requests over ``threads`` callers, and each request's latency."""
    chunks = [requests[i::threads] for i in range(threads)]
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = threading.Barrier(threads + 1)

    def caller(index: int) -> None:
        mine, out = chunks[index], latencies[index]
        clock = time.perf_counter
        start.wait()
        for request in mine:
            t0 = clock()
            fn(policy, request)
            out.append(clock() - t0)

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    started, cpu = time.perf_counter(), time.process_time()
    for w in workers:
        w.join()
    barrier(policy.store)
    return (time.perf_counter() - started, time.process_time() - cpu,
            [x for chunk in latencies for x in chunk])


def route(scale: float) -> list[dict[str, Any]]:
    sessions = 1_000
    n = max(2_000, int(20_000 * scale))
    reps = 5 if scale >= 1 else 2
    sids = session_ids(sessions, "route")
    variants = {"turn": _turn, "snapshot": _snapshot}
    caps = {"no cap": None, "cap": 1_000_000.0}
    rates: dict[tuple[str, str, int], list[float]] = {}
    lats: dict[tuple[str, str, int], list[float]] = {}
    cpus: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=Path(tmp) / "audit.jsonl"))
        try:
            policies = {cap: Policy(store, MODELS, Options(max_cost_usd=limit, deadline_s=5.0))
                        for cap, limit in caps.items()}
            for rep in range(reps):
                for threads in (1, 8):
                    for cap, policy in policies.items():
                        # The two variants alternate which goes first (the log grows, the heap warms).
                        for name, fn in list(variants.items())[::1 if rep % 2 == 0 else -1]:
                            requests = _requests(sids, n, rep * 31 + threads)
                            elapsed, cpu, latencies = _run(fn, policy, requests, threads)
                            key = (name, cap, threads)
                            rates.setdefault(key, []).append(n / elapsed)
                            cpus.setdefault(key, []).append(cpu / n)
                            lats.setdefault(key, []).extend(latencies)
        finally:
            store.close()
    rows = []
    for threads in (1, 8):
        for cap in caps:
            for name in variants:
                key = (name, cap, threads)
                ordered = sorted(lats[key])
                label = f"{name}, {cap}, {threads} thread{'s' if threads > 1 else ''}"
                rows.append(_row(f"routes/s, {label}", median(rates[key]), "routes/s"))
                rows.append(_row(f"p50, {label}", percentile(ordered, 50) * 1e6, "µs"))
                rows.append(_row(f"p99, {label}", percentile(ordered, 99) * 1e6, "µs"))
                rows.append(_row(f"CPU per route, {label}", median(cpus[key]) * 1e6, "µs"))
            ratio = median(rates[("turn", cap, threads)]) / median(rates[("snapshot", cap, threads)])
            rows.append(_row(f"route turn / snapshot route throughput, {cap}, {threads} thread(s)", ratio, "x",
                             "≥ 1x", ratio >= 1))
            saving = median(cpus[("snapshot", cap, threads)]) / median(cpus[("turn", cap, threads)])
            rows.append(_row(f"snapshot route / route turn CPU per route, {cap}, {threads} thread(s)", saving,
                             "x", "≥ 1x", saving >= 1))
    return [{
        "id": 10, "title": "Routing turn vs snapshot route",
        "setup": f"{sessions:,} sessions, {n:,} requests per variant and repetition (route + cost report), "
                 f"tiers MEDIUM, MEDIUM, COMPLEX, SIMPLE in turn; audit log on; {reps} repetitions, "
                 "variants interleaved, each going first in every other repetition; cap: $1,000,000 (reserve and "
                 "settle, never refuses)",
        "rows": rows,
    }]
