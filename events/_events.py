"""The typed events: one frozen, slotted dataclass per store operation.

Every event validates its fields when it is constructed, so a bad event never
reaches an actor: the caller gets ``InvalidEvent`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from events._tier import Tier, parse_tier
from events._validate import (
    check_bool,
    check_micros,
    check_session_id,
    check_text,
)


class Event:
    """Base of every event; ``session_id`` is None for store-wide events."""

    __slots__ = ()


class SessionEvent(Event):
    """An event addressed to one session's mailbox."""

    __slots__ = ()

    def __post_init__(self) -> None:
        check_session_id(self.session_id)


@dataclass(frozen=True, slots=True)
class SetSession(SessionEvent):
    """Create or update a session; result None."""

    session_id: str
    model: str
    tier: Tier | str | None = None
    user_explicit: bool = False

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.model, "model")
        object.__setattr__(self, "tier", parse_tier(self.tier))
        check_bool(self.user_explicit, "user_explicit")


@dataclass(frozen=True, slots=True)
class GetSession(SessionEvent):
    """Read a snapshot; result Entry or None (expires an idle session)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Touch(SessionEvent):
    """Extend the session's idle timeout and count a request; result None."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Hash(SessionEvent):
    """Record a request hash; result: the strike count."""

    session_id: str
    hash: str

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.hash, "hash", 128)


@dataclass(frozen=True, slots=True)
class Escalate(SessionEvent):
    """Bump the tier one step; result: the tier after, or None."""

    session_id: str
    reason: str = "requested"

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.reason, "reason", 64)


@dataclass(frozen=True, slots=True)
class Cost(SessionEvent):
    """Add spend in micro-USD; creates a cost-only entry when absent; result None."""

    session_id: str
    micros: int

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_micros(self.micros)


@dataclass(frozen=True, slots=True)
class GetCost(SessionEvent):
    """Read the session's spend; result: USD as a float."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SetCacheSticky(SessionEvent):
    """Pin the session to a provider while its prefix cache is warm; result None."""

    session_id: str
    provider: str

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.provider, "provider", 64)


@dataclass(frozen=True, slots=True)
class IsCacheSticky(SessionEvent):
    """Whether the cache pin is still on; result bool (ends a stale pin)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SetDeployment(SessionEvent):
    """Remember which deployment (provider + key or base URL) served the session."""

    session_id: str
    deployment: str

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.deployment, "deployment", 256)


@dataclass(frozen=True, slots=True)
class Decision(SessionEvent):
    """A routing decision taken for the session; logged, changes no state."""

    session_id: str
    kind: str
    model: str = ""
    tier: Tier | str | None = None
    provider: str = ""
    reason: str = ""
    strategy: str = ""
    source: str = ""
    deployment: str = ""

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.kind, "kind", 32)
        check_text(self.model, "model")
        object.__setattr__(self, "tier", parse_tier(self.tier))
        check_text(self.provider, "provider", 64)
        check_text(self.reason, "reason", 256)
        check_text(self.strategy, "strategy", 32)
        check_text(self.source, "source", 64)
        check_text(self.deployment, "deployment", 256)


@dataclass(frozen=True, slots=True)
class Expire(SessionEvent):
    """End the session now if it is idle past its timeout; result: whether it ended."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Clear(SessionEvent):
    """Remove one session; result None."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Evict(SessionEvent):
    """Capacity eviction of a least-recently-used session (sent by the engine).

    ``last_used_at`` is the value the evictor saw: a session used since then
    is no longer the least recently used one and is kept. ``reason`` is
    logged: ``"capacity"`` (``max_sessions``) or ``"tenant_limit"``
    (``max_sessions_per_tenant``).
    """

    session_id: str
    last_used_at: int = -1
    reason: str = "capacity"

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.reason, "reason", 32)


@dataclass(frozen=True, slots=True)
class ClearAll(Event):
    """Remove every session; result None."""

    session_id = None


@dataclass(frozen=True, slots=True)
class GetStats(Event):
    """Read a summary of live sessions; result Stats."""

    session_id = None


@dataclass(frozen=True, slots=True)
class Tick(Event):
    """One clock pass: expire idle sessions and end stale cache pins; result: number expired."""

    session_id = None


SESSION_EVENTS: tuple[type[SessionEvent], ...] = (
    SetSession, GetSession, Touch, Hash, Escalate, Cost, GetCost, SetCacheSticky,
    IsCacheSticky, SetDeployment, Decision, Expire, Clear, Evict,
)
STORE_EVENTS: tuple[type[Event], ...] = (ClearAll, GetStats, Tick)
