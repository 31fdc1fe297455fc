"""Least-recently-used bookkeeping for ``max_sessions`` and the per-tenant limits.

Shards report, once per batch, which sessions they used and which ended; the
capacity keeper answers with the victims to evict. Victims are evicted in
their own shard's turn by an ``Evict`` event that carries the
``last_used_at`` seen here (a session used in the meantime is kept) and the
reason: ``"capacity"`` (the store is past ``max_sessions``) or
``"tenant_limit"`` (a tenant is past ``max_sessions_per_tenant``: only its
own least recently used session goes, never another tenant's).

``admit`` is the per-tenant creation rate: a token bucket per tenant that
holds ``max_creations_per_tenant_per_minute`` tokens and refills at that
rate, so a tenant may open that many sessions in a burst and that many a
minute after. The tenant is read from the session id (engine/core/scope.py);
the ``""`` tenant (unscoped ids) is under ``max_sessions`` only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from operator import itemgetter
from typing import Any

from engine.core.scope import tenant_of
from engine.core.transitions import Outcome
from events import EngineError, SetSession
from events import records as record_names

__all__ = [
    "CAPACITY", "Capacity", "SessionRefused", "TENANT_LIMIT", "TENANT_RATE", "refusal", "refused_error",
]

#: Eviction reasons, as logged in ``session.evicted``.
CAPACITY = "capacity"
TENANT_LIMIT = "tenant_limit"
#: Refusal reason, as logged in ``session.refused``.
TENANT_RATE = "tenant_rate"

Victim = tuple[str, int, str]  # (session id, last_used_at seen here, reason)


class SessionRefused(EngineError):
    """A new session was refused: its tenant is past ``max_creations_per_tenant_per_minute``."""


def refusal(limit: int | None, result: Any = None) -> Outcome:
    """A creation its tenant's creation rate refused, on either backend: no session, one ``session.refused``
    record naming the reason and the configured ``max_creations_per_tenant_per_minute``."""
    return Outcome(None, result, ((record_names.SESSION_REFUSED, {"reason": TENANT_RATE, "limit": limit}),))


def refused_error(limit: int | None, detail: str = "") -> SessionRefused:
    """What the caller of a refused creation gets; ``detail`` adds the backend's own terms."""
    return SessionRefused(f"session not created: its tenant is past max_creations_per_tenant_per_minute "
                          f"({limit}{detail})")


class Capacity:
    def __init__(self, max_sessions: int | None, max_per_tenant: int | None = None,
                 creations_per_minute: int | None = None) -> None:
        self.max_sessions = max_sessions
        self.max_per_tenant = max_per_tenant
        self.creations_per_minute = creations_per_minute
        #: Every session, when ``max_sessions`` is set (else empty).
        self._lru: OrderedDict[str, int] = OrderedDict()
        #: Each tenant's sessions, least recently used first, when ``max_sessions_per_tenant`` is set.
        self._tenants: dict[str, OrderedDict[str, int]] = {}
        #: tenant -> (tokens left, ms they were counted at)
        self._buckets: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def note(self, used: Iterable[tuple[str, int]], ended: Iterable[str]) -> list[Victim]:
        """Record a batch; return each victim to evict."""
        lru, tenants, per_tenant = self._lru, self._tenants, self.max_per_tenant
        everyone = self.max_sessions is not None
        victims: list[Victim] = []
        with self._lock:
            for sid in ended:
                if everyone:
                    lru.pop(sid, None)
                if per_tenant is not None:
                    self._forget(sid)
            if per_tenant is None:
                if everyone:
                    for sid, last_used in used:
                        lru[sid] = last_used
                        lru.move_to_end(sid)
            else:
                for sid, last_used in used:
                    if everyone:
                        lru[sid] = last_used
                        lru.move_to_end(sid)
                    tenant = tenant_of(sid)
                    if not tenant:
                        continue
                    own = tenants.get(tenant)
                    if own is None:
                        own = tenants[tenant] = OrderedDict()
                    own[sid] = last_used
                    own.move_to_end(sid)
                    if len(own) > per_tenant:
                        victim, seen = own.popitem(last=False)
                        if everyone:
                            lru.pop(victim, None)
                        victims.append((victim, seen, TENANT_LIMIT))
            if everyone:
                while len(lru) > self.max_sessions:  # type: ignore[operator]
                    victim, seen = lru.popitem(last=False)
                    if per_tenant is not None:
                        self._forget(victim)
                    victims.append((victim, seen, CAPACITY))
        return victims

    def restore(self, entries: Iterable[tuple[str, int]]) -> list[Victim]:
        """Track restored sessions, by last use; return the victims of a limit lowered since."""
        everyone = self.max_sessions is not None
        if not everyone and self.max_per_tenant is None:
            return []
        # Only what a limit needs is sorted: on a single-tenant store without max_sessions, nothing.
        used = sorted((item for item in entries if everyone or tenant_of(item[0])), key=itemgetter(1))
        return self.note(used, ())

    def _forget(self, sid: str) -> None:
        tenant = tenant_of(sid)
        own = self._tenants.get(tenant) if tenant else None
        if own is not None:
            own.pop(sid, None)
            if not own:
                del self._tenants[tenant]

    def admit(self, event: Any, now: int) -> bool:
        """Whether the event, which would create its session, may (takes a token if so).

        Only a ``SetSession`` is limited: a cost report for an unknown session
        still gets its entry, so that no spend is lost (``max_sessions_per_tenant``
        bounds those).
        """
        rate = self.creations_per_minute
        if rate is None or type(event) is not SetSession:
            return True
        tenant = tenant_of(event.session_id)
        if not tenant:
            return True
        with self._lock:
            tokens, at = self._buckets.get(tenant, (float(rate), now))
            if now > at:
                tokens = min(float(rate), tokens + (now - at) * rate / 60_000)
            else:
                now = at  # a clock step back refills nothing
            if tokens < 1.0:
                return False  # nothing is written: the bucket refills from where it was counted
            self._buckets[tenant] = (tokens - 1.0, now)
            if len(self._buckets) > 4 * (len(self._tenants) + 1024):
                self._prune(now, rate)
        return True

    def refuse(self, reply: Any) -> Outcome:
        """The outcome of a refused creation (``refusal``); an asking caller gets ``SessionRefused``."""
        if reply is not None:
            reply.fail(refused_error(self.creations_per_minute))
        return refusal(self.creations_per_minute)

    def _prune(self, now: int, rate: int) -> None:
        """Drop the buckets that have refilled: they hold nothing a fresh bucket would not."""
        full = [t for t, (tokens, at) in self._buckets.items() if tokens + (now - at) * rate / 60_000 >= rate]
        for tenant in full:
            del self._buckets[tenant]

    def tenant_sessions(self, tenant: str) -> int:
        """How many live sessions this keeper counts for ``tenant`` (with ``max_sessions_per_tenant`` set)."""
        with self._lock:
            own = self._tenants.get(tenant)
            return len(own) if own is not None else 0

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._tenants.clear()

    def __len__(self) -> int:
        """Sessions tracked: every one with ``max_sessions``, else the scoped ones."""
        return len(self._lru) if self.max_sessions is not None else sum(map(len, self._tenants.values()))
