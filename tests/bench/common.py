"""Helpers shared by the workloads: the mixed operation stream, statistics, process readings."""

from __future__ import annotations

import gc
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from engine import SessionStore
from events import Cost, Hash, SetSession, Touch

MODEL = "openai/gpt-4o-mini"
#: Operation kinds of the mixed stream (told as events, or called on the reference).
TOUCH, HASH, COST, SET = range(4)
#: Mix of a router's calls per request: touch, hash, cost, re-pin (same model: an update).
MIX = ((TOUCH, 0.30), (HASH, 0.30), (COST, 0.25), (SET, 0.15))


def session_ids(n: int, prefix: str = "sess") -> list[str]:
    return [f"{prefix}-{i:07d}" for i in range(n)]


def mixed_ops(n: int, sids: list[str], seed: int = 7) -> list[tuple[int, str, Any]]:
    """``n`` operations ``(kind, session_id, argument)`` over ``sids``, reproducible."""
    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    hashes = [f"{i:032x}" for i in range(4)]  # few distinct hashes: some repeats, some strikes
    out = []
    for kind in rng.choices(kinds, weights, k=n):
        sid = sids[rng.randrange(len(sids))]
        arg = hashes[rng.randrange(4)] if kind == HASH else 1_200 if kind == COST else MODEL
        out.append((kind, sid, arg))
    return out


def as_events(ops: list[tuple[int, str, Any]]) -> list[Any]:
    makers: list[Callable[..., Any]] = [lambda s, a: Touch(s), Hash, Cost, SetSession]
    return [makers[k](s, a) for k, s, a in ops]


def tell_ops(store: SessionStore, ops: list[tuple[int, str, Any]]) -> None:
    """What a router does per request: build the event, tell it (one call per event)."""
    tell = store.tell
    for kind, sid, arg in ops:
        if kind == TOUCH:
            tell(Touch(sid))
        elif kind == HASH:
            tell(Hash(sid, arg))
        elif kind == COST:
            tell(Cost(sid, arg))
        else:
            tell(SetSession(sid, arg))


def ref_ops(ref: Any, ops: list[tuple[int, str, Any]]) -> None:
    """The same stream as direct method calls on the reference store."""
    touch, rhash, cost, pin = ref.touch_session, ref.record_request_hash, ref.add_session_cost, ref.set_session
    for kind, sid, arg in ops:
        if kind == TOUCH:
            touch(sid)
        elif kind == HASH:
            rhash(sid, arg)
        elif kind == COST:
            cost(sid, arg)
        else:
            pin(sid, arg)


def barrier(store: SessionStore) -> None:
    """Return once every shard has applied (and logged) what was sent before: a broadcast ask."""
    store.tick()


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def os_threads() -> int:
    """Threads of this process as the OS counts them (not only Python's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return threading.active_count()


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


class ShiftedClock:
    """Moves the engine's clock forward without waiting: patches the one function it reads time through.

    ``engine._time.now_ms`` reaches ``time.time()`` via ``_read``; replacing
    ``_read`` shifts every clock read the engine makes (the same hook
    freezegun uses in the tests).
    """

    def __init__(self) -> None:
        import engine._time as clock

        self._module = clock
        self._original = clock._read
        self.offset = 0.0

    def __enter__(self) -> ShiftedClock:
        self._module._read = lambda: time.time() + self.offset  # type: ignore[attr-defined]
        return self

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __exit__(self, *exc: object) -> None:
        self._module._read = self._original  # type: ignore[attr-defined]
