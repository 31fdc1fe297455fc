"""Snapshot types handed to callers: frozen, never live references."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from events import Tier

__all__ = [
    "Entry", "MessageInfo", "SLOT_SETTERS", "SessionInfo", "Stats", "build_entry",
]


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
    #: Deployment (provider + key or base URL) that last served the pinned model; "" when none has yet (a
    #: turn that moves the pin to another model with no candidate for it clears it). Not in the seed.
    deployment: str = ""
    #: Open budget reservations, oldest first: (reservation id, micro-USD, first ms it counts as lapsed).
    reservations: tuple[tuple[str, int, int], ...] = ()
    #: Deployment pins per (model group, tier) that served the session without moving its pin (a SIMPLE
    #: bypass, a budget downgrade, strategy none), oldest first: (model, tier value or "", deployment).
    deployments: tuple[tuple[str, str, str], ...] = ()

    def group_deployment(self, model: str, tier: Tier | None) -> str:
        """The deployment pinned for ``model`` at ``tier`` ("" when none)."""
        key = tier.value if tier is not None else ""
        for m, t, dep in self.deployments:
            if m == model and t == key:
                return dep
        return ""

    @property
    def reserved_micros(self) -> int:
        """Budget held by open reservations (lapsed ones included until the session is settled)."""
        held = self.reservations
        if not held:  # the usual case on a routed turn: no generator to build
            return 0
        if len(held) == 1:
            return held[0][1]
        return sum(r[1] for r in held)

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


# Entry is frozen: its __init__ sets each slot through object.__setattr__. Writing the slots through
# their descriptors on a bare instance builds the same object in about half the time (0.8 vs 1.5 µs),
# which counts on the hot path (a transition builds one Entry) and when a restart builds thousands.
#: Each field's slot setter, by field name: only for an Entry nobody else has seen yet.
SLOT_SETTERS: dict[str, Any] = {name: Entry.__dict__[name].__set__ for name in Entry.__slots__}
(_put_model, _put_tier, _put_created_at, _put_last_used_at, _put_request_count, _put_recent_hashes, _put_strikes,
 _put_escalated, _put_user_explicit, _put_cache_sticky, _put_cache_sticky_at, _put_provider, _put_cost,
 _put_deployment, _put_reservations, _put_deployments) = SLOT_SETTERS.values()
_new = object.__new__


def build_entry(model: str, tier: Tier | None, created_at: int, last_used_at: int, request_count: int,
                recent_hashes: tuple[str, ...], strikes: int, escalated: bool, user_explicit: bool,
                cache_sticky: bool, cache_sticky_at: int, provider: str, session_cost_micros: int,
                deployment: str, reservations: tuple[tuple[str, int, int], ...] = (),
                deployments: tuple[tuple[str, str, str], ...] = ()) -> Entry:
    """``Entry(...)`` without the frozen ``__init__``'s cost; every field given, in order, unchecked."""
    e = _new(Entry)
    _put_model(e, model)
    _put_tier(e, tier)
    _put_created_at(e, created_at)
    _put_last_used_at(e, last_used_at)
    _put_request_count(e, request_count)
    _put_recent_hashes(e, recent_hashes)
    _put_strikes(e, strikes)
    _put_escalated(e, escalated)
    _put_user_explicit(e, user_explicit)
    _put_cache_sticky(e, cache_sticky)
    _put_cache_sticky_at(e, cache_sticky_at)
    _put_provider(e, provider)
    _put_cost(e, session_cost_micros)
    _put_deployment(e, deployment)
    _put_reservations(e, reservations)
    _put_deployments(e, deployments)
    return e


if tuple(SLOT_SETTERS) != tuple(build_entry.__code__.co_varnames[:len(SLOT_SETTERS)]):
    raise ImportError("engine.core.entry.build_entry must take every Entry field, in declaration order")
