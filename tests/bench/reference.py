"""The reference: the session semantics as a plain dict of entries behind one lock.

This is how the seed's Go store works (a map behind one RWMutex), written in
plain Python: mutable slotted entries updated in place, inputs validated with
the same checks the events use, expiry and lapsed cache pins settled on every
access, and a ``cleanup`` that scans every session under the lock (the seed's
five-minute sweep). It writes no log: it is the in-process limit the engine
is measured against, not a product.
"""

from __future__ import annotations

import threading

from engine.core.providers import cache_ttl_for_provider
from events import Tier, tier_above
from events._tier import parse_tier
from events._validate import check_bool, check_micros, check_session_id, check_text

HASH_WINDOW = 3


class RefEntry:
    __slots__ = ("cache_sticky", "cache_sticky_at", "created_at", "escalated", "last_used_at", "model",
                 "provider", "recent_hashes", "request_count", "session_cost_micros", "strikes", "tier",
                 "user_explicit")

    def __init__(self, model: str, tier: Tier | None, now: int, count: int, user_explicit: bool) -> None:
        self.model = model
        self.tier = tier
        self.created_at = now
        self.last_used_at = now
        self.request_count = count
        self.recent_hashes: list[str] = []
        self.strikes = 0
        self.escalated = False
        self.user_explicit = user_explicit
        self.cache_sticky = False
        self.cache_sticky_at = 0
        self.provider = ""
        self.session_cost_micros = 0


class ReferenceStore:
    """One lock, one dict; every method is one critical section."""

    def __init__(self, timeout_ms: int = 1_800_000, auto_escalate: bool = False, strike_limit: int = 2,
                 clock: object = None) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, RefEntry] = {}
        self._timeout = timeout_ms
        self._auto = auto_escalate
        self._limit = strike_limit
        from engine._time import now_ms  # the engine's clock, so both see the same time

        self._now = now_ms

    def __len__(self) -> int:
        return len(self._sessions)

    def _live(self, sid: str, now: int) -> RefEntry | None:
        """The entry settled at ``now`` (call with the lock held)."""
        e = self._sessions.get(sid)
        if e is None:
            return None
        idle = now - e.last_used_at
        if idle > self._timeout:
            del self._sessions[sid]
            return None
        if e.cache_sticky and idle > cache_ttl_for_provider(e.provider):
            e.cache_sticky = False
        return e

    def set_session(self, sid: str, model: str, tier: Tier | str | None = None, user_explicit: bool = False) -> None:
        check_session_id(sid)
        check_text(model, "model")
        tier = parse_tier(tier)
        check_bool(user_explicit, "user_explicit")
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            if e is None:
                self._sessions[sid] = RefEntry(model, tier, now, 1, user_explicit)
                return
            e.last_used_at = max(now, e.last_used_at)
            e.request_count += 1
            if model != e.model:
                e.model = model
                e.tier = tier
            if user_explicit:
                e.user_explicit = True

    def get_session(self, sid: str) -> tuple | None:
        check_session_id(sid)
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            # A snapshot, as the engine hands out (never the live entry).
            return None if e is None else (e.model, e.tier, e.request_count, e.strikes, e.session_cost_micros)

    def touch_session(self, sid: str) -> None:
        check_session_id(sid)
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            if e is not None:
                e.last_used_at = max(now, e.last_used_at)
                e.request_count += 1

    def record_request_hash(self, sid: str, request_hash: str) -> int:
        check_session_id(sid)
        check_text(request_hash, "hash", 128)
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            if e is None:
                return 0
            hashes = e.recent_hashes
            hashes.append(request_hash)
            if len(hashes) > HASH_WINDOW:
                del hashes[0]
            if len(hashes) >= 2 and hashes[-2] == request_hash:
                e.strikes += 1
            if self._auto and e.strikes >= self._limit and not e.escalated and not e.user_explicit:
                e.tier = tier_above(e.tier)
                e.escalated = True
            return e.strikes

    def escalate_session(self, sid: str) -> Tier | None:
        check_session_id(sid)
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            if e is None or e.user_explicit:
                return None if e is None else e.tier
            e.tier = tier_above(e.tier)
            e.escalated = True
            return e.tier

    def add_session_cost(self, sid: str, micros: int) -> None:
        check_session_id(sid)
        check_micros(micros)
        if micros == 0:
            return
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            if e is None:
                e = self._sessions[sid] = RefEntry("", None, now, 0, False)
            e.session_cost_micros += micros

    def get_session_cost_usd(self, sid: str) -> float:
        check_session_id(sid)
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            return 0.0 if e is None else e.session_cost_micros / 1_000_000

    def set_cache_sticky(self, sid: str, provider: str) -> None:
        check_session_id(sid)
        check_text(provider, "provider", 64)
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            if e is not None and not e.cache_sticky:
                e.cache_sticky = True
                e.cache_sticky_at = now
                e.provider = provider

    def is_cache_sticky(self, sid: str) -> bool:
        check_session_id(sid)
        now = self._now()
        with self._lock:
            e = self._live(sid, now)
            return e is not None and e.cache_sticky

    def clear_session(self, sid: str) -> None:
        check_session_id(sid)
        with self._lock:
            self._sessions.pop(sid, None)

    def cleanup(self) -> int:
        """The seed's sweep: scan every session under the one write lock, drop the idle ones."""
        now = self._now()
        timeout = self._timeout
        with self._lock:
            dead = [sid for sid, e in self._sessions.items() if now - e.last_used_at > timeout]
            for sid in dead:
                del self._sessions[sid]
            for e in self._sessions.values():
                if e.cache_sticky and now - e.last_used_at > cache_ttl_for_provider(e.provider):
                    e.cache_sticky = False
            return len(dead)
