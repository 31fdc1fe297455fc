"""The routing rules, pure: where one request goes, decided on the session's live state.

All that affects a routing decision lives in this file (as h11 keeps its
state machine in one). ``decide_route(state, route, config)`` runs the rules of
``RULES`` in order: the *choice* rules pick the model, and the first that
applies wins; the *adjusting* rules then run on that choice, every time. Each
rule is a small function over the request (a ``Route`` event, frozen), the
session's state before the turn, and the ``Draft`` decision it may change;
none reads a clock, a file or an actor, so each can be tested alone and the
same rules run in a shard's turn, in ``engine.policy.decide`` and on any
other backend. docs/policy.md is the table of these rules.

The result is the decision (``Routed``) and the session events it implies;
``engine.core.transitions`` applies those events in the same turn, then the budget
reservation, then logs ``decision.made``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from engine.core.affinity import SWITCHED, place, recorded, served_first, switches
from engine.core.config import Config
from engine.core.entry import Entry
from engine.core.kinds import Kind
from engine.core.providers import provider_from_model
from events import (
    Escalate,
    Hash,
    Route,
    RouteRules,
    SessionEvent,
    SetCacheSticky,
    SetDeployment,
    SetSession,
    Tier,
    Touch,
    tier_rank,
)

__all__ = [
    "DOWNGRADE", "Draft", "HASH_WINDOW", "LIFTING", "RULES", "Routed", "STALL_ERRORS", "budget", "count_strikes",
    "decide_route", "first_pin", "never_downgrade", "stall_reason",
]

HASH_WINDOW = 3
#: The "strikes" detector: the same tool call (same name and arguments) answered with an error this many
#: times in a row (``Route.tool_errors`` under this detector) is a stall signal: the request counts a strike
#: even when its hash is new (docs/policy.md).
STALL_ERRORS = 3
_TIERS = (Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX, Tier.REASONING)

#: How the reason of a lifting stall escalation (``stall_lift``, ``Routed.lift``) ends: text for people. Counters
#: read ``Routed.lift`` / ``decision.made``'s ``lift``; only ``engine.log.replay.upcast_decision`` reads this, for
#: logs without that field.
LIFTING = " for this request; pin kept, lifts on progress"
#: How the reason of a graceful budget downgrade ends (``budget``, ``Routed.downgrade``): text for people, read
#: only by ``engine.log.replay.upcast_decision`` (logs whose ``decision.made`` lacks ``downgrade``).
DOWNGRADE = "; cheapest tier"



@dataclass(frozen=True, slots=True)
class Routed:
    """A routing decision as the transition returns it (``engine.policy.RouteDecision`` wraps it)."""

    kind: Kind
    model: str
    tier: Tier | None
    reason: str
    #: The deployment to try first, and the candidates with it first.
    deployment: str = ""
    candidates: tuple[str, ...] = ()
    #: Budget figures in micro-USD: settled spend, open reservations before this request, this
    #: request's estimate, the cap (-1: none).
    spent_micros: int = 0
    reserved_micros: int = 0
    estimate_micros: int = 0
    limit_micros: int = -1
    #: The deployment that had served the session when the turn began ("" when none).
    served: str = ""
    #: The reservation this request holds ("" when none: no cap, a zero estimate, or a refusal).
    #: ``decide`` names it; the ``Route`` transition adds it to the session.
    reservation_id: str = ""
    #: The budget rule served the cheapest tier instead (a graceful downgrade, a bypass).
    downgrade: bool = False
    #: A stall served one configured tier up for this request only (``stall_lift``, a bypass).
    lift: bool = False


@dataclass(slots=True)
class Draft:
    """The decision while the rules build it (local to one ``decide_route`` call)."""

    kind: Kind = Kind.RETAIN  # every choice rule sets it
    model: str = ""
    tier: Tier | None = None
    reason: str = ""
    events: list[SessionEvent] = field(default_factory=list)
    #: The session's pin (None: a new or cost-only session) and the turn this request is.
    pinned: Entry | None = None
    turn: int = 1
    #: The provider a live cache pin holds ("" when none).
    cache_provider: str = ""
    estimate: int = 0
    deployment: str = ""
    candidates: tuple[str, ...] = ()
    refused: bool = False
    #: The deployment pinned for the decision's (model group, tier) when it is not the pin's (a bypass).
    served: str | None = None
    downgrade: bool = False
    lift: bool = False


# -- implied events, built unchecked ------------------------------------------------------------
# Their fields come from the Route event, validated when it was built (session id, model, tier,
# hash): building them through the slots skips a second validation on the session's turn, which
# is the shard's hot path (about a sixth of a routed turn's cost). SetCacheSticky and SetDeployment
# are rarer and keep their checks.
_new = object.__new__


def _slots(cls: type) -> tuple[Any, ...]:
    return tuple(cls.__dict__[name].__set__ for name in cls.__slots__)


_TOUCH, _HASH, _SET = _slots(Touch), _slots(Hash), _slots(SetSession)


def touch_event(sid: str) -> Touch:
    e = _new(Touch)
    _TOUCH[0](e, sid)
    return e


def hash_event(sid: str, h: str, stall: bool) -> Hash:
    e = _new(Hash)
    put_sid, put_hash, put_stall = _HASH
    put_sid(e, sid)
    put_hash(e, h)
    put_stall(e, stall)
    return e


def set_event(sid: str, model: str, tier: Tier | None, explicit: bool = False) -> SetSession:
    e = _new(SetSession)
    put_sid, put_model, put_tier, put_explicit = _SET
    put_sid(e, sid)
    put_model(e, model)
    put_tier(e, tier)
    put_explicit(e, explicit)
    return e


_ROUTED = _slots(Routed)


def routed_of(kind: Kind, model: str, tier: Tier | None, reason: str, deployment: str, candidates: tuple[str, ...],
              spent: int, reserved: int, estimate: int, limit: int, served: str, reservation_id: str,
              downgrade: bool, lift: bool) -> Routed:
    """``Routed(...)`` through its slots: every field given, in order (the frozen ``__init__`` sets each one
    through ``object.__setattr__``, about a tenth of ``decide_route``'s cost)."""
    e = _new(Routed)
    (put_kind, put_model, put_tier, put_reason, put_deployment, put_candidates, put_spent, put_reserved,
     put_estimate, put_limit, put_served, put_rid, put_downgrade, put_lift) = _ROUTED
    put_kind(e, kind)
    put_model(e, model)
    put_tier(e, tier)
    put_reason(e, reason)
    put_deployment(e, deployment)
    put_candidates(e, candidates)
    put_spent(e, spent)
    put_reserved(e, reserved)
    put_estimate(e, estimate)
    put_limit(e, limit)
    put_served(e, served)
    put_rid(e, reservation_id)
    put_downgrade(e, downgrade)
    put_lift(e, lift)
    return e


if Routed.__slots__ != ("kind", "model", "tier", "reason", "deployment", "candidates", "spent_micros",
                        "reserved_micros", "estimate_micros", "limit_micros", "served", "reservation_id",
                        "downgrade", "lift"):
    raise ImportError("engine.core.rules.routed_of builds Routed by its slots: update it")
if (Touch.__slots__, Hash.__slots__, SetSession.__slots__) != (
        ("session_id",), ("session_id", "hash", "stall"), ("session_id", "model", "tier", "user_explicit")):
    raise ImportError("engine.core.rules builds Touch, Hash and SetSession by their slots: update it")


# -- helpers the rules share --------------------------------------------------------------
def repeat_run(recent: tuple[str, ...], h: str) -> int:
    """How many times ``h`` ends the hash window once recorded after ``recent`` (1 to ``HASH_WINDOW``)."""
    run = 1
    for x in reversed(recent[1 - HASH_WINDOW:]):
        if x != h:
            break
        run += 1
    return run


def count_strikes(recent: tuple[str, ...], strikes: int, h: str, stall: bool) -> tuple[tuple[str, ...], int]:
    """The hash window and strike count after recording ``h``: a strike when the same hash ends a
    run of two or more in the window, or when the request shows another stall signal."""
    hashes = (*recent, h)[-HASH_WINDOW:]
    return hashes, strikes + 1 if stall or repeat_run(recent, h) >= 2 else strikes


def stall_reason(route: Route, recent: tuple[str, ...], limit: int) -> str:
    """The "window" stall detector (docs/policy.md "Stalls"): why this request reads as a stall, or "".

    With ``limit`` strikes, the ``limit + 1``-th repeat is a stall: of the newest tool call (same name,
    arguments and result) among the request's last ``stall_window`` calls, of errored calls in a row
    ending with the newest, or of identical requests in a row (the session's hash window, which
    holds ``HASH_WINDOW``). Every count is anchored on the newest call or request, so the verdict
    clears as soon as the agent does something else: nothing accumulates over the session.
    """
    need = limit + 1
    if route.tool_repeats >= need:
        return f"same tool call and result {route.tool_repeats} times in the last {route.rules.stall_window} calls"
    if route.tool_errors >= need:
        return f"{route.tool_errors} errored tool calls in the last {route.rules.stall_window}"
    h = route.request_hash
    if h and need <= HASH_WINDOW:
        run = repeat_run(recent, h)
        if run >= need:
            return f"{run} identical requests in a row"
    return ""


def models_for(rules: RouteRules, tier: Tier | None) -> tuple[str, ...]:
    if tier is None:
        return ()
    for name, models in rules.models:
        if name == tier.value:
            return models
    return ()


def pick(rules: RouteRules, tier: Tier | None, fallback: str, provider: str) -> str:
    """The tier's model, preferring one of ``provider`` while a cache pin holds it."""
    choices = models_for(rules, tier)
    if provider:
        for model in choices:
            if provider_from_model(model) == provider:
                return model
        if provider_from_model(fallback) == provider:
            return fallback
    return choices[0] if choices else fallback


def next_tier(rules: RouteRules, tier: Tier | None) -> Tier | None:
    """The next tier above ``tier`` that has a model in the table (a tier without one is skipped, as
    LiteLLM's complexity router does); None at the top configured tier."""
    rank = tier_rank(tier)
    for candidate in _TIERS[rank + 1:]:
        if models_for(rules, candidate):
            return candidate
    return None


def cheapest_tier(rules: RouteRules) -> Tier | None:
    for tier in _TIERS:
        if models_for(rules, tier):
            return tier
    return None


def estimate_of(route: Route, model: str) -> int:
    """This request's estimate for ``model`` (micro-USD): its own entry, else the "" default, else 0."""
    default = 0
    for name, micros in route.estimates:
        if name == model:
            return micros
        if not name:
            default = micros
    return default


def _name(tier: Tier | None) -> str:
    return tier.value if tier else "none"


@lru_cache(maxsize=4096)  # a refusal's reason names the cap, the estimate and the spend: mostly the same few
def usd(micros: int) -> str:
    return f"${micros / 1_000_000:.6f}".rstrip("0").rstrip(".")


def _routers_model(route: Route, d: Draft) -> str:
    """The router's model, or the tier's model of the cache-pinned provider while a cache pin holds."""
    return pick(route.rules, route.tier, route.model, d.cache_provider) if d.cache_provider else route.model


def strikes_signal(route: Route) -> bool:
    """The stall signal a request's hash records as a strike: the caller's ``stall``, or under the "strikes"
    detector ``tool_errors`` (the same tool call's errors in a row) at ``STALL_ERRORS`` or more."""
    return route.stall or (route.tool_errors >= STALL_ERRORS and route.rules.stall_detector == "strikes")


def _hash(route: Route, stall: bool = False) -> list[SessionEvent]:
    """The request's ``Hash`` (none without a hash), its stall flag ``strikes_signal``; ``stall``: the window
    detector found a stall (a strike)."""
    h = route.request_hash
    if not h:
        return []
    # strikes_signal inlined (every routed turn with a hash builds one): tool_errors is mostly 0.
    signal = stall or route.stall or (route.tool_errors >= STALL_ERRORS and route.rules.stall_detector == "strikes")
    return [hash_event(route.session_id, h, signal)]


def _reaches_strike_limit(route: Route, base: Entry, config: Config) -> tuple[bool, list[SessionEvent], bool]:
    """Whether this request brings the pinned session to the strike limit (the "strikes" detector); the
    events recording it (the hash); and whether the escalation needs an ``Escalate`` (not when the
    store's auto-escalation does it on the hash)."""
    hashed = _hash(route)
    if not hashed or not base.model:
        return False, hashed, False
    rules = route.rules
    limit = rules.strike_limit or config.strike_limit
    _, strikes = count_strikes(base.recent_hashes, base.strikes, route.request_hash, strikes_signal(route))
    if (not rules.escalate_on_strikes or strikes < limit or strikes <= base.strikes
            or base.escalated or base.user_explicit):
        return False, hashed, False
    return True, hashed, not (config.auto_escalate and strikes >= config.strike_limit)


# -- the choice rules: the first that applies picks the model -----------------------------
def strategy_none(route: Route, state: Entry | None, d: Draft, config: Config) -> bool:
    """Strategy none: the router decides every time; only the budget and the audit apply."""
    if route.rules.strategy != "none":
        return False
    d.kind, d.model, d.tier, d.reason = Kind.BYPASS, route.model, route.tier, "strategy none: router's choice"
    return True


def explicit_pin(route: Route, state: Entry | None, d: Draft, config: Config) -> bool:
    """A user-explicit model wins over everything, and an explicit pin holds for later requests."""
    sid, pinned = route.session_id, d.pinned
    if route.user_explicit:
        d.events += [set_event(sid, route.model, route.tier, True), *_hash(route)]
        same = pinned is not None and pinned.model == route.model
        d.kind, d.reason = ((Kind.RETAIN, "user-explicit pin") if same
                            else (Kind.INITIALIZE, "user-explicit model pinned"))
        d.model, d.tier = route.model, route.tier
        return True
    if pinned is not None and pinned.user_explicit and pinned.model:
        d.events += [touch_event(sid), *_hash(route)]
        d.kind, d.model, d.tier, d.reason = Kind.RETAIN, pinned.model, pinned.tier, "user-explicit pin"
        return True
    return False


def warmup(route: Route, state: Entry | None, d: Draft, config: Config) -> bool:
    """The first ``warmup_turns`` turns follow the router without committing to a tier."""
    turns = route.rules.warmup_turns
    if d.turn > turns:
        return False
    d.events += [set_event(route.session_id, route.model, route.tier), *_hash(route)]
    d.kind, d.model, d.tier = Kind.BYPASS, _routers_model(route, d), route.tier
    d.reason = f"warmup turn {d.turn} of {turns}"
    return True


def first_pin(route: Route, state: Entry | None, d: Draft, config: Config) -> bool:
    """No pin yet (or warmup just ended): the router's choice becomes the pin."""
    turns = route.rules.warmup_turns
    if d.pinned is not None and d.pinned.model and not (turns and d.turn == turns + 1):
        return False
    d.model, d.tier = _routers_model(route, d), route.tier
    d.events += [set_event(route.session_id, d.model, route.tier), *_hash(route)]
    d.kind = Kind.INITIALIZE
    d.reason = "warmup over: pinned router's choice" if turns else "first turn: pinned router's choice"
    return True


def keyword(route: Route, state: Entry | None, d: Draft, config: Config) -> bool:
    """An escalation keyword in the last user message (``Options.escalation_keywords``, LiteLLM's
    default "LITELLM ESCALATE") moves the session one configured tier up, each time it is sent; at the
    top configured tier the other rules apply."""
    if not route.keyword or route.rules.strategy == "none":
        return False
    pinned, sid = d.pinned, route.session_id
    held = pinned is not None and bool(pinned.model)
    base_tier = pinned.tier if held else route.tier  # type: ignore[union-attr]
    up = next_tier(route.rules, base_tier)
    if up is None or (route.rules.strategy == "adaptive" and tier_rank(route.tier) > tier_rank(up)):
        return False  # at the top, or the router asks for more: the usual rules
    d.model, d.kind, d.tier = pick(route.rules, up, route.model, d.cache_provider), Kind.ESCALATE, up
    d.reason = f"escalation keyword {route.keyword!r}: {_name(base_tier)} -> {up.value}"
    d.events += [*_hash(route), *([Escalate(sid, "keyword")] if held else []), set_event(sid, d.model, up)]
    return True


def strikes(route: Route, state: Entry | None, d: Draft, config: Config) -> bool:
    """Three strikes: the request that brings the session to the strike limit (the "strikes" detector),
    or a stall (the "window" detector, ``_stall``), escalates it one configured tier (``_one_tier_up``)."""
    pinned = d.pinned
    assert pinned is not None  # first_pin took every session without a pin
    if route.rules.stall_detector == "window":
        return _stall(route, pinned, d, config)
    reached, hashed, escalate = _reaches_strike_limit(route, pinned, config)
    return reached and _one_tier_up(route, pinned, d, "", hashed, escalate, False)


def _stall(route: Route, pinned: Entry, d: Draft, config: Config) -> bool:
    """The "window" detector's escalation: a stalled request moves the session to the next configured
    tier (latched, as the seed's strikes do), or, with ``stall_lift``, is served one configured tier
    up while the pin stays (a bypass), so the session leaves the escalation once the agent moves on."""
    rules = route.rules
    lift = rules.stall_lift
    if not rules.escalate_on_strikes or pinned.user_explicit or (pinned.escalated and not lift):
        return False
    why = stall_reason(route, pinned.recent_hashes, rules.strike_limit or config.strike_limit)
    return bool(why) and _one_tier_up(route, pinned, d, f" ({why})", _hash(route, True), not lift, lift)


def _one_tier_up(route: Route, pinned: Entry, d: Draft, why: str, hashed: list[SessionEvent], escalate: bool,
                 lift: bool) -> bool:
    """A stalled session goes to the next configured tier (``Escalate`` first when ``escalate``); a still
    higher router tier wins under adaptive; at the top configured tier the pin is kept (no tier is claimed
    that no model serves); ``lift``: this request only, as a bypass, the pin unchanged."""
    sid, rules = route.session_id, route.rules
    marked = [*hashed, Escalate(sid, "strikes")] if escalate else hashed
    up = next_tier(rules, pinned.tier)
    if rules.strategy == "adaptive" and tier_rank(route.tier) > tier_rank(up or pinned.tier):
        d.model, d.kind, d.tier = _routers_model(route, d), Kind.UPGRADE, route.tier
        d.reason = f"strike limit reached{why}; router asked for a higher tier"
        d.events += [*marked, set_event(sid, d.model, d.tier)]
    elif up is None:
        d.model, d.kind, d.tier = pinned.model, Kind.RETAIN, pinned.tier
        d.reason = f"strike limit reached{why} at the top configured tier ({_name(pinned.tier)}): pin kept"
        d.events += [*hashed, touch_event(sid)]
    elif lift:  # a bypass: another model serves this request, the pin is unchanged
        d.model, d.kind, d.tier = pick(rules, up, pinned.model, d.cache_provider), Kind.BYPASS, up
        d.reason = f"strike limit reached{why}: {_name(pinned.tier)} -> {up.value}{LIFTING}"
        d.lift = True
        d.events += [*hashed, touch_event(sid)]
    else:
        d.model, d.kind, d.tier = pick(rules, up, pinned.model, d.cache_provider), Kind.ESCALATE, up
        d.reason = f"strike limit reached{why}: {_name(pinned.tier)} -> {up.value}"
        d.events += [*marked, set_event(sid, d.model, up)]
    return True


def never_downgrade(route: Route, state: Entry | None, d: Draft, config: Config) -> bool:
    """The pin holds: a higher router tier upgrades it (adaptive), a SIMPLE follow-up is served by the
    cheap model without replacing it (adaptive), anything else keeps the pinned model."""
    pinned, sid, adaptive = d.pinned, route.session_id, route.rules.strategy == "adaptive"
    assert pinned is not None
    hashed = _hash(route)
    if adaptive and tier_rank(route.tier) > tier_rank(pinned.tier):
        d.model, d.kind, d.tier = _routers_model(route, d), Kind.UPGRADE, route.tier
        d.reason = f"router tier {_name(route.tier)} above pinned {_name(pinned.tier)}"
        d.events += [set_event(sid, d.model, d.tier), *hashed]
    elif adaptive and route.rules.simple_bypass and route.tier is Tier.SIMPLE and tier_rank(pinned.tier) > 0:
        d.model = pick(route.rules, Tier.SIMPLE, route.model, d.cache_provider) if d.cache_provider else route.model
        d.kind, d.tier, d.reason = Kind.BYPASS, Tier.SIMPLE, "SIMPLE follow-up: cheap model, pin kept"
        d.events += [touch_event(sid), *hashed]
    else:
        d.model, d.tier, d.kind = pinned.model, pinned.tier, Kind.RETAIN
        d.reason = "sticky: pinned model kept" if not adaptive else "never downgrade: pinned model kept"
        d.events += [touch_event(sid), *hashed]
    return True


# -- the adjusting rules: each runs on the choice ------------------------------------------
def cache_stickiness(route: Route, state: Entry | None, d: Draft, config: Config) -> None:
    """A long context pins the provider that holds its prefix cache (while no pin holds one)."""
    if route.rules.cache_sticky and route.rules.strategy != "none" and not d.cache_provider and route.long_context:
        d.events.append(SetCacheSticky(route.session_id, provider_from_model(d.model)))
    if d.cache_provider and d.kind is not Kind.RETAIN:
        d.reason += f"; cache pin {d.cache_provider}"


def budget(route: Route, state: Entry | None, d: Draft, config: Config) -> None:
    """Settled spend plus open reservations plus this request's estimate must stay within the cap:
    else serve the cheapest tier (graceful, pin kept) or refuse."""
    limit = route.rules.max_cost_micros
    d.estimate = estimate_of(route, d.model)
    if limit < 0:
        return
    committed = (state.session_cost_micros + state.reserved_micros) if state is not None else 0
    # At the cap nothing more is served, even a request with no estimate (LiteLLM: spent >= cap).
    if committed + d.estimate <= limit and committed < limit:
        return
    over = (f"budget: {usd(committed)} committed + {usd(d.estimate)} estimate > {usd(limit)} cap"
            if committed < limit else f"budget: {usd(committed)} committed >= {usd(limit)} cap")
    cheap_tier = cheapest_tier(route.rules)
    serious = route.tools or d.tier in (Tier.COMPLEX, Tier.REASONING) or route.user_explicit
    if route.rules.budget_mode == "strict" or serious or cheap_tier is None:
        why = "strict" if route.rules.budget_mode == "strict" else (
            "tool use" if route.tools else "explicit model" if route.user_explicit
            else f"{_name(d.tier)} tier" if serious else "no cheaper tier")
        d.kind, d.reason, d.refused, d.events, d.lift = Kind.REFUSE, f"{over}; refused ({why})", True, [], False
        return
    cheap = pick(route.rules, cheap_tier, d.model, d.cache_provider)
    cheap_estimate = estimate_of(route, cheap)
    if committed + cheap_estimate > limit or committed >= limit:
        d.kind, d.model, d.tier, d.estimate = Kind.REFUSE, cheap, cheap_tier, cheap_estimate
        d.refused, d.events, d.lift = True, [], False
        d.reason = (f"budget: {usd(committed)} committed + {usd(cheap_estimate)} estimate > {usd(limit)} cap; "
                    "refused") if committed < limit else f"{over}; refused"
        return
    # Downgrade for this request only: the pin is kept (SetSession would move it down).
    if d.pinned is not None:
        d.events = [touch_event(route.session_id) if type(e) is SetSession else e for e in d.events]
    d.kind, d.model, d.tier, d.estimate, d.reason = Kind.BYPASS, cheap, cheap_tier, cheap_estimate, f"{over}{DOWNGRADE}"
    d.downgrade, d.lift = True, False


def key_provider(key: str) -> str:
    """The provider a ``deployment_key`` names (its text before ``:`` or ``@``); "" when the key has
    neither. Read only to re-run logs decided by key names (``RouteRules.affinity_by_record`` false)."""
    if ":" not in key and "@" not in key:
        return ""
    return key.split("@", 1)[0].split(":", 1)[0]


def deployment_affinity(route: Route, state: Entry | None, d: Draft, config: Config) -> None:
    """The deployment that served the session goes first; a retained pin whose deployment is gone
    switches to the first candidate. A new pin records its first deployment. A bypass (SIMPLE
    follow-up, budget downgrade, strategy none) keeps its own deployment pin per (model group, tier),
    so the cheap model's provider cache stays warm too; the pin's deployment is left alone.

    Decided on what the session recorded, never on a key's name: ``Entry.deployment`` is the deployment
    that served the pinned model (a turn that moves the pin to another model either records the new
    model's deployment or clears it: the old one served the model the pin left), a group pin the one that
    served its (model, tier). The candidates are the router's, for its own model: a decision serving
    another model uses among them only the deployment recorded serving that model."""
    rules = route.rules
    if not rules.affinity_by_record:
        return _affinity_by_key_name(route, state, d)
    bypass = d.kind is Kind.BYPASS
    served = recorded(state, d.kind, d.model, d.tier)
    if bypass:  # also without candidates: a host that filters deployments itself reads it (Routed.served)
        d.served = served
        moved = False
    else:
        # The pin moves to another model: its deployment served the model it leaves.
        moved = bool(served) and state is not None and bool(state.model) and state.model != d.model
    candidates = route.candidates
    if candidates and d.model != route.model:
        candidates = (served,) if served and not moved and served in candidates else ()
    d.candidates = candidates
    if d.refused:
        return
    if not candidates:
        if moved:  # no deployment known for the new model: the pin has none until one serves it
            d.events.append(SetDeployment(route.session_id, ""))
        return
    d.deployment, d.candidates, gone = place(served, candidates)
    if served and not gone:
        return
    if bypass:  # the bypass's own group deployment pin
        d.events.append(SetDeployment(route.session_id, d.deployment, d.model, d.tier))
        return
    if switches(d.kind, gone):  # the deployment that served the pinned model is gone
        d.kind = Kind.SWITCH
        d.reason += f"; {SWITCHED}"
    d.events.append(SetDeployment(route.session_id, d.deployment))


def _affinity_by_key_name(route: Route, state: Entry | None, d: Draft) -> None:
    """``deployment_affinity`` as logs with ``affinity_by_record`` false were decided (the backtest re-runs
    them so): a candidate serves the decided model when its key names the model's provider
    (``candidates_by_provider``; every candidate in logs without that field), and a pin whose deployment's
    key names another provider than its model's has "moved" there (no switch)."""
    candidates = route.candidates
    by_provider = route.rules.candidates_by_provider
    provider = provider_from_model(d.model) if by_provider and candidates else ""
    if provider and provider != provider_from_model(route.model):
        candidates = tuple(c for c in candidates if key_provider(c) in (provider, ""))
    d.candidates = candidates
    bypass = d.kind is Kind.BYPASS
    if bypass:
        served = state.group_deployment(d.model, d.tier) if state is not None and state.deployments else ""
        d.served = served
    else:
        served = state.deployment if state is not None else ""
    if d.refused or not candidates:
        return
    if served and served in candidates:
        d.deployment = served
        d.candidates = served_first(served, candidates)
        return
    d.deployment = candidates[0]
    if bypass:
        d.events.append(SetDeployment(route.session_id, d.deployment, d.model, d.tier))
        return
    moved = provider not in ("", "default") and key_provider(served) not in (provider, "")
    if served and d.kind is Kind.RETAIN and not moved:
        d.kind = Kind.SWITCH
        d.reason += "; deployment gone, switched"
    d.events.append(SetDeployment(route.session_id, d.deployment))


Rule = Callable[[Route, "Entry | None", Draft, Config], Any]

#: The rules in the order they apply: the first choice rule that returns True picks the model,
#: then every adjusting rule runs (docs/policy.md numbers them the same way).
RULES: tuple[tuple[str, tuple[Rule, ...]], ...] = (
    ("choice", (strategy_none, explicit_pin, keyword, warmup, first_pin, strikes, never_downgrade)),
    ("adjust", (cache_stickiness, budget, deployment_affinity)),
)


def decide_route(state: Entry | None, route: Route, config: Config) -> tuple[Routed, list[SessionEvent]]:
    """The decision for ``route`` on ``state`` (already settled at the request's time) and the session
    events it implies, in the order they apply. A refusal implies none."""
    # A cost-only entry (spend recorded, no model yet) pins nothing.
    pinned = None if state is not None and not state.model and state.request_count == 0 else state
    d = Draft(pinned=pinned, turn=1 if pinned is None else pinned.request_count + 1,
              cache_provider=state.provider if state is not None and state.cache_sticky else "")
    choice, adjust = RULES[0][1], RULES[1][1]
    for rule in choice:
        if rule(route, state, d, config):
            break
    for rule in adjust:
        rule(route, state, d, config)
    spent = state.session_cost_micros if state is not None else 0
    reserved = state.reserved_micros if state is not None else 0
    limit = route.rules.max_cost_micros
    # A served request under a cap holds its estimate (engine.core.transitions adds the reservation).
    rid = route.reservation_id if limit >= 0 and d.estimate > 0 and not d.refused else ""
    return routed_of(d.kind, d.model, d.tier, d.reason[:256], d.deployment, d.candidates, spent, reserved,
                     d.estimate, limit, d.served if d.served is not None else state.deployment if state is not None
                     else "", rid, d.downgrade, d.lift), d.events
