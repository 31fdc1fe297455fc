"""Tenancy: what the per-tenant limits cost on the hot path, side by side in one process.

Three stores with the log off (so the engine's own work is what differs) take
the same mixed operations over 10,000 live sessions each repetition:

- ``off``: ``max_sessions_per_tenant=None`` and no creation rate (no
  capacity keeper at all: the engine before tenancy);
- ``defaults, unscoped``: the default limits, with unscoped ids (the ``""``
  tenant: a single-tenant deployment pays for the bookkeeping only);
- ``defaults, scoped``: the default limits, with the ids scoped by 100
  tenants of 100 sessions (every event counted in its tenant's LRU).
"""

from __future__ import annotations

import time
from typing import Any

from common import barrier, median, mixed_ops, session_ids, tell_ops

from engine import Config, SessionStore
from engine.identity import Scope, scoped
from engine.shell.capacity import Capacity
from events import SetSession

SESSIONS = 10_000
TENANTS = 100


def _row(metric: str, value: float, unit: str) -> dict[str, Any]:
    return {"metric": metric, "value": value, "unit": unit, "target": "", "met": None}


def _store(sids: list[str], **overrides: Any) -> SessionStore:
    store = SessionStore(Config(enabled=True, tick_ms=0, **overrides))
    for start in range(0, len(sids), 1_000):
        store.tell_many([SetSession(sid, "m") for sid in sids[start:start + 1_000]])
    barrier(store)
    return store


def tenancy(scale: float) -> list[dict[str, Any]]:
    n = max(2_000, int(100_000 * scale))
    reps = 5 if scale >= 1 else 2
    plain = session_ids(SESSIONS)
    scope = Scope("bench-secret-0123456789abcdef")
    tenants = [scope.tenant(f"key:{i}") for i in range(TENANTS)]
    scoped_ids = [scoped(tenants[i % TENANTS], sid) for i, sid in enumerate(plain)]
    rename = dict(zip(plain, scoped_ids, strict=True))
    off = {"max_sessions_per_tenant": None, "max_creations_per_tenant_per_minute": None}
    stores = {"off": _store(plain, **off), "defaults, unscoped": _store(plain),
              "defaults, scoped": _store(scoped_ids)}
    times: dict[str, list[float]] = {name: [] for name in stores}
    try:
        for rep in range(reps):
            ops = mixed_ops(n, plain, seed=rep)
            scoped_ops = [(kind, rename[sid], arg) for kind, sid, arg in ops]
            for name, store in stores.items():
                stream = scoped_ops if name == "defaults, scoped" else ops
                started = time.perf_counter()
                tell_ops(store, stream)
                barrier(store)
                times[name].append(time.perf_counter() - started)
    finally:
        for store in stores.values():
            store.close()
    rows = [_row(f"transitions/s, {name}", median([n / t for t in ts]), "events/s") for name, ts in times.items()]
    rows += _keeper(plain, scoped_ids, n, reps)
    for name in ("defaults, unscoped", "defaults, scoped"):
        ratio = [t / o for t, o in zip(times[name], times["off"], strict=True)]
        rows.append(_row(f"time / limits off, {name}", median(ratio), "x"))
    return [{
        "id": "tenancy", "title": "Per-tenant limits on the hot path (log off)",
        "setup": f"{SESSIONS:,} live sessions ({TENANTS} tenants when scoped), {n:,} mixed operations per "
                 f"repetition sent with tell(), the three stores side by side; {reps} repetitions",
        "rows": rows, "raw": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }]


def _keeper(plain: list[str], scoped_ids: list[str], n: int, reps: int) -> list[dict[str, Any]]:
    """The capacity keeper alone: ``note`` over batches of 512 used sessions, per event."""
    out = []
    for name, sids, kwargs in (("max_sessions only", plain, {"max_sessions": 20_000}),
                               ("per tenant, unscoped ids", plain, {"max_per_tenant": 10_000}),
                               ("per tenant, scoped ids", scoped_ids, {"max_per_tenant": 10_000})):
        per_event = []
        for rep in range(reps):
            keeper = Capacity(kwargs.get("max_sessions"), kwargs.get("max_per_tenant"))
            used = [(sids[(i * 7919 + rep) % len(sids)], i) for i in range(n)]
            started = time.perf_counter()
            for start in range(0, n, 512):
                keeper.note(used[start:start + 512], ())
            per_event.append((time.perf_counter() - started) / n * 1e6)
        out.append(_row(f"capacity keeper per event, {name}", median(per_event), "µs"))
    return out

