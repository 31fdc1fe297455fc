"""The typed events: one frozen, slotted dataclass per store operation.

Every event validates its fields when it is constructed, so a bad event never
reaches an actor: the caller gets ``InvalidEvent`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from events._errors import InvalidEvent
from events._tier import Tier, parse_tier
from events._validate import (
    MAX_MICROS,
    check_bool,
    check_micros,
    check_session_id,
    check_text,
)

__all__ = [
    "BUDGET_MODES", "Clear", "ClearAll", "Cost", "Decision", "Escalate", "Event", "Evict", "Expire", "GetCost",
    "GetSession", "GetStats", "Hash", "IsCacheSticky", "MAX_STALL_WINDOW", "Release", "Route", "RouteRules",
    "SESSION_EVENTS", "STALL_DETECTORS", "STORE_EVENTS", "STRATEGIES", "SessionEvent", "SetCacheSticky",
    "SetDeployment", "SetSession", "Tick", "Touch", "check_stall_detector", "check_stall_window",
]


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
    """Record a request hash; result: the strike count.

    ``stall``: the request shows another stall signal (the same tool call
    failing ``STALL_ERRORS`` times in a row, docs/policy.md): a strike even
    when the hash is new.
    """

    session_id: str
    hash: str
    stall: bool = False

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.hash, "hash", 128)
        check_bool(self.stall, "stall")


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
    """Add spend in micro-USD; creates a cost-only entry when absent; result None.

    ``reservation_id``: the budget reservation this cost settles (its estimate
    is replaced by ``micros``, not added to); "" or a reservation no longer
    open (lapsed) just adds ``micros``. ``prompt_tokens``/``completion_tokens``
    (0: unknown) are logged with it.
    """

    session_id: str
    micros: int
    reservation_id: str = ""
    #: Token counts of the response, when the caller knows them (logged with the cost, for audits).
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_micros(self.micros)
        check_text(self.reservation_id, "reservation_id", 64)
        if self.prompt_tokens or self.completion_tokens:
            check_micros(self.prompt_tokens, "prompt_tokens")
            check_micros(self.completion_tokens, "completion_tokens")


@dataclass(frozen=True, slots=True)
class Release(SessionEvent):
    """Give back a budget reservation whose call failed (no cost); result: whether it was open."""

    session_id: str
    reservation_id: str

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.reservation_id, "reservation_id", 64)


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
    """Remember which deployment (provider + key or base URL) served the session.

    Without ``model``: the pinned model's deployment (``Entry.deployment``). With ``model`` (and
    ``tier``): the deployment of that model group and tier when it served the session without
    moving the pin (a SIMPLE bypass, a budget downgrade, strategy none), kept in ``Entry.deployments``.
    """

    session_id: str
    deployment: str
    model: str = ""
    tier: Tier | str | None = None

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.deployment, "deployment", 256)
        check_text(self.model, "model", 256)
        object.__setattr__(self, "tier", parse_tier(self.tier))


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


STRATEGIES = ("sticky", "adaptive", "none")
BUDGET_MODES = ("graceful", "strict")
#: "window": the stall detector of docs/policy.md (tool calls signed by name, arguments and result in a
#: window anchored on the newest call; identical requests in a row); "strikes": the seed's cumulative
#: strikes (tool-call names in the hash; logs without a stall_detector field read as this).
STALL_DETECTORS = ("window", "strikes")
#: The longest tool-call window the detector reads.
MAX_STALL_WINDOW = 64


def check_stall_detector(value: object) -> None:
    if value not in STALL_DETECTORS:
        raise InvalidEvent("stall_detector", "must be window or strikes")


def check_stall_window(value: object) -> None:
    if type(value) is not int or not 1 <= value <= MAX_STALL_WINDOW:
        raise InvalidEvent("stall_window", f"must be an int from 1 to {MAX_STALL_WINDOW}")


@dataclass(frozen=True, slots=True)
class RouteRules:
    """What the routing rules read besides the request and the session: the policy's options and its
    tier -> models table, as frozen data (``engine.policy.Options`` builds one once per policy).

    Carried by every ``Route`` event, so the transition stays a pure function of (state, event, now,
    config) whichever host runs it (a shard, replay, another backend).
    """

    #: tier name -> models in order of preference, lowest tier first.
    models: tuple[tuple[str, tuple[str, ...]], ...] = ()
    strategy: str = "adaptive"
    simple_bypass: bool = True
    warmup_turns: int = 0
    escalate_on_strikes: bool = True
    #: 0: the store's ``config.strike_limit``.
    strike_limit: int = 0
    cache_sticky: bool = True
    #: Budget cap in micro-USD; -1: no cap.
    max_cost_micros: int = -1
    budget_mode: str = "graceful"
    #: How long an unsettled budget reservation holds before it lapses.
    reservation_ttl_ms: int = 600_000
    #: The stall detector (``STALL_DETECTORS``), the tool calls its window holds, and whether a stall
    #: escalation lifts once the agent moves on (False: it latches for the session, as the seed's does).
    stall_detector: str = "window"
    stall_window: int = 6
    stall_lift: bool = False
    #: Read only with ``affinity_by_record`` false (logs decided by key names): deployment candidates whose
    #: key names another provider than the decided model's are not used (False: every candidate, as logs
    #: without this field were decided).
    candidates_by_provider: bool = True
    #: Deployment affinity reads what the session recorded (which deployment served the pin's model),
    #: never a deployment key's provider prefix (False: by the prefix, as logs without this field
    #: were decided; ``candidates_by_provider`` then applies).
    affinity_by_record: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidEvent("strategy", "must be one of sticky, adaptive, none")
        if self.budget_mode not in BUDGET_MODES:
            raise InvalidEvent("budget_mode", "must be graceful or strict")
        check_stall_detector(self.stall_detector)
        for name in ("simple_bypass", "escalate_on_strikes", "cache_sticky", "stall_lift", "candidates_by_provider",
                     "affinity_by_record"):
            check_bool(getattr(self, name), name)
        for name, low in (("warmup_turns", 0), ("strike_limit", 0), ("max_cost_micros", -1),
                          ("reservation_ttl_ms", 1)):
            value = getattr(self, name)
            if type(value) is not int or value < low or value > MAX_MICROS:
                raise InvalidEvent(name, f"must be an int >= {low}")
        check_stall_window(self.stall_window)
        if type(self.models) is not tuple:
            raise InvalidEvent("models", "must be a tuple of (tier, models) pairs")
        for pair in self.models:
            if type(pair) is not tuple or len(pair) != 2 or type(pair[1]) is not tuple:
                raise InvalidEvent("models", "must be a tuple of (tier, models) pairs")
            parse_tier(pair[0], "models")
            for model in pair[1]:
                check_text(model, "models")


@dataclass(frozen=True, slots=True)
class Route(SessionEvent):
    """Decide where a request goes, on the live session, and apply what the decision implies.

    The fields are what the rules read of the request, computed by the caller
    (``engine.policy``), never prompt text. Result: an ``engine.policy``
    ``Routed`` (kind, model, tier, reason, budget figures, reservation id).
    """

    session_id: str
    #: The router's own choice.
    model: str
    tier: Tier | str | None
    rules: RouteRules
    user_explicit: bool = False
    #: Three-strike hash of the request ("" when it has no messages).
    request_hash: str = ""
    #: A stall signal the caller read itself (see ``Hash.stall``): a strike. ``engine.policy`` sends the
    #: "strikes" detector's count in ``tool_errors`` instead, and the rules apply its threshold.
    stall: bool = False
    #: The request defines tools (never silently degraded by the budget).
    tools: bool = False
    #: The context is long enough for a provider prefix cache to matter.
    long_context: bool = False
    #: Deployment keys able to serve the request.
    candidates: tuple[str, ...] = ()
    #: Where the session id came from.
    source: str = ""
    #: model -> estimated micro-USD of this request; "" is the default for a model not listed.
    estimates: tuple[tuple[str, int], ...] = ()
    #: The id a budget reservation gets (required when ``rules`` has a cap).
    reservation_id: str = ""
    #: The escalation keyword the last user message contains ("" when none; docs/policy.md).
    keyword: str = ""
    #: The "window" stall detector's reading of the request's last ``rules.stall_window`` tool calls:
    #: how many repeat the newest (same name, arguments and result), and, when the newest errored, how
    #: many errored (in a row ending with it, or of the same call), whichever is more (docs/policy.md).
    #: Under the "strikes" detector ``tool_errors`` is how many times in a row the same tool call returned
    #: an error (``engine.policy.tool_error_run``): ``engine.core.rules.STALL_ERRORS`` of them are a strike.
    tool_repeats: int = 0
    tool_errors: int = 0

    def __post_init__(self) -> None:
        check_session_id(self.session_id)
        check_text(self.model, "model")
        object.__setattr__(self, "tier", parse_tier(self.tier))
        if type(self.rules) is not RouteRules:
            raise InvalidEvent("rules", "must be a RouteRules")
        check_bool(self.user_explicit, "user_explicit")
        check_text(self.request_hash, "request_hash", 128)
        check_bool(self.stall, "stall")
        check_bool(self.tools, "tools")
        check_bool(self.long_context, "long_context")
        if type(self.candidates) is not tuple:
            raise InvalidEvent("candidates", "must be a tuple of str")
        for candidate in self.candidates:
            check_text(candidate, "candidates", 256)
        check_text(self.source, "source", 64)
        if type(self.estimates) is not tuple:
            raise InvalidEvent("estimates", "must be a tuple of (model, micros) pairs")
        for pair in self.estimates:
            if type(pair) is not tuple or len(pair) != 2:
                raise InvalidEvent("estimates", "must be a tuple of (model, micros) pairs")
            check_text(pair[0], "estimates")
            check_micros(pair[1], "estimates")
        check_text(self.reservation_id, "reservation_id", 64)
        if self.rules.max_cost_micros >= 0 and not self.reservation_id:
            raise InvalidEvent("reservation_id", "must be given when the rules set a budget cap")
        check_text(self.keyword, "keyword", 64)
        for name in ("tool_repeats", "tool_errors"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_STALL_WINDOW:
                raise InvalidEvent(name, f"must be an int from 0 to {MAX_STALL_WINDOW}")


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
    IsCacheSticky, SetDeployment, Decision, Expire, Clear, Evict, Route, Release,
)
STORE_EVENTS: tuple[type[Event], ...] = (ClearAll, GetStats, Tick)
