"""Snapshot types handed to callers: frozen, never live references."""

from __future__ import annotations

from dataclasses import dataclass

from events import Tier


@dataclass(frozen=True, slots=True)
class Entry:
    """The state of one session at one moment (the seed's Entry, in snake_case).

    The engine's session state *is* this snapshot: a transition builds a new
    Entry, so handing one to a reader is safe without copying.
    """

    model: str
    tier: Tier | None
    created_at: int
    last_used_at: int
    request_count: int
    recent_hashes: tuple[str, ...] = ()
    strikes: int = 0
    escalated: bool = False
    user_explicit: bool = False
    cache_sticky: bool = False
    cache_sticky_at: int = 0
    provider: str = ""
    session_cost_micros: int = 0
    #: Deployment (provider + key or base URL) that last served the session; not in the seed.
    deployment: str = ""

    def __str__(self) -> str:
        tier = "" if self.tier is None else self.tier.value
        return (
            f"model={self.model} tier={tier} reqs={self.request_count} strikes={self.strikes} "
            f"explicit={'true' if self.user_explicit else 'false'} "
            f"cost=${self.session_cost_micros / 1_000_000:.6f}"
        )


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One line of Stats: id cut to 8 characters plus "..." when longer, age in seconds."""

    id: str
    model: str
    age: int


@dataclass(frozen=True, slots=True)
class Stats:
    count: int
    sessions: list[SessionInfo]


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """A minimal message for cache-sticky evaluation."""

    role: str
    content: str
