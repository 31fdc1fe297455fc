"""Routing policy: a pure decision function, and a thin wrapper over the store that never fails a request.

``decide(request, state, models, options, config)`` is pure: from the router's
own choice, the session's snapshot and a tier -> models table it returns a
``RouteDecision`` (model, tier, provider, kind, reason) and the store events
the decision implies. ``Policy.route(request)`` reads the snapshot with one
bounded ``ask``, decides, and *tells* the events (fire and forget), so a
request costs one round trip to the engine; if the engine does not answer
within ``Options.deadline_s`` or fails, the router's own choice is returned
with kind ``unavailable`` and the request goes on. docs/policy.md has the
table of rules and options.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

from engine._config import Config, default_config
from engine._core import apply
from engine._entry import Entry
from engine._helpers import hash_request_content, provider_from_model, should_cache_sticky
from engine.identity import FINGERPRINT, INVALID_PREFIX, IdentityResolver, check_tenant, message_text
from engine.store import SessionStore
from events import (
    Cost,
    EngineError,
    Escalate,
    GetSession,
    Hash,
    InvalidEvent,
    SessionEvent,
    SetCacheSticky,
    SetDeployment,
    SetSession,
    Tier,
    Touch,
    parse_tier,
    tier_above,
    tier_rank,
)
from events import Decision as DecisionEvent
from events._validate import check_text, is_valid_session_id

if TYPE_CHECKING:
    from engine.aio import AsyncSessionStore

log = logging.getLogger("engine.policy")

_TIERS = (Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX, Tier.REASONING)


class Strategy(str, Enum):
    """How a session holds its pin (docs/identity.md)."""

    STICKY = "sticky"  # pin the first choice and keep it (three-strike escalation still applies)
    ADAPTIVE = "adaptive"  # never downgrade: upgrade on a higher router tier, SIMPLE follow-ups bypass
    NONE = "none"  # no pinning: the router's choice every time (budget still applies)

    def __str__(self) -> str:
        return self.value


class Kind(str, Enum):
    """What a decision did, as logged in ``decision.made`` records."""

    INITIALIZE = "initialize"  # a new pin: first turn, end of warmup, or a user-explicit model
    RETAIN = "retain"  # the pinned model serves the request
    UPGRADE = "upgrade"  # the router asked for a higher tier: the pin moves up
    BYPASS = "bypass"  # another model serves this request; the pin is unchanged
    ESCALATE = "escalate"  # three-strike: the pin moves one tier up
    SWITCH = "switch"  # the deployment that served the session is gone: another one takes over
    REFUSE = "refuse"  # over budget: the request is not served (BudgetExceeded)
    UNAVAILABLE = "unavailable"  # the engine did not answer in time: the router's own choice

    def __str__(self) -> str:
        return self.value


BUDGET_MODES = ("graceful", "strict")

#: tier -> model, or tier -> models in order of preference (the first is the tier's default).
TierModels = Mapping[Tier | str, str | Sequence[str]]
#: (model, request) -> estimated USD of serving this request with that model.
Estimator = Callable[[str, "Request"], float]


class BudgetExceeded(EngineError):
    """The session's budget cannot cover this request; carries spent, estimate and limit in USD."""

    def __init__(self, session_id: str, spent_usd: float, estimate_usd: float, limit_usd: float,
                 decision: RouteDecision | None = None) -> None:
        super().__init__(f"session budget exceeded: spent ${spent_usd:.6f} + estimate ${estimate_usd:.6f} "
                         f"> limit ${limit_usd:.6f}")
        self.session_id = session_id
        self.spent_usd = spent_usd
        self.estimate_usd = estimate_usd
        self.limit_usd = limit_usd
        self.decision = decision

    def error_body(self, message: str | None = None) -> dict[str, Any]:
        """The refusal as an OpenAI-style JSON error body (what an HTTP 429 carries)."""
        return {"error": {
            "message": str(self) if message is None else message, "type": "budget_exceeded",
            "code": "session_budget_exceeded", "session_id": self.session_id, "spent_usd": self.spent_usd,
            "estimate_usd": self.estimate_usd, "limit_usd": self.limit_usd,
        }}


@dataclass(frozen=True, slots=True)
class Options:
    """Policy options; every rule of docs/policy.md has its switch here."""

    strategy: Strategy | str = Strategy.ADAPTIVE
    #: A SIMPLE follow-up may use the router's cheap model without replacing the pin.
    simple_bypass: bool = True
    #: First turns that follow the router unpinned before the session commits to a tier.
    warmup_turns: int = 0
    #: Three-strike escalation; ``strike_limit`` None means the store's ``config.strike_limit``.
    escalate_on_strikes: bool = True
    strike_limit: int | None = None
    #: Pin the provider while the context is long enough for its prefix cache to matter.
    cache_sticky: bool = True
    #: Per-session budget in USD (None: no budget) and what happens when it would be passed.
    max_cost_usd: float | None = None
    budget_mode: str = "graceful"
    #: Estimated USD of a request for a model; None: ``Request.estimate_usd`` for every model.
    estimator: Estimator | None = None
    #: Most seconds ``Policy.route`` waits for the engine before answering ``unavailable``.
    deadline_s: float = 0.05

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "strategy", Strategy(self.strategy))
        except ValueError:
            raise InvalidEvent("strategy", "must be one of sticky, adaptive, none") from None
        for name in ("simple_bypass", "escalate_on_strikes", "cache_sticky"):
            if type(getattr(self, name)) is not bool:
                raise InvalidEvent(name, "must be a bool")
        if type(self.warmup_turns) is not int or self.warmup_turns < 0:
            raise InvalidEvent("warmup_turns", "must be an int >= 0")
        if self.strike_limit is not None and (type(self.strike_limit) is not int or self.strike_limit < 1):
            raise InvalidEvent("strike_limit", "must be an int >= 1 or None")
        if self.max_cost_usd is not None and (
                type(self.max_cost_usd) not in (int, float) or not self.max_cost_usd >= 0):
            raise InvalidEvent("max_cost_usd", "must be a number >= 0 or None")
        if self.budget_mode not in BUDGET_MODES:
            raise InvalidEvent("budget_mode", "must be graceful or strict")
        if self.estimator is not None and not callable(self.estimator):
            raise InvalidEvent("estimator", "must be callable or None")
        if type(self.deadline_s) not in (int, float) or not self.deadline_s > 0:
            raise InvalidEvent("deadline_s", "must be a positive number of seconds")


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the policy sees it: the router's own choice plus what the rules read.

    ``session_id`` "" means: derive a keyed fingerprint from ``messages`` (when
    the policy has an identity resolver) or serve without a session.
    ``candidates`` are deployment keys (see ``deployment_key``) able to serve the request.
    """

    model: str
    tier: Tier | str | None = None
    session_id: str = ""
    messages: Sequence[Any] = ()
    tools: Sequence[Any] = ()
    user_explicit: bool = False
    estimate_usd: float = 0.0
    candidates: Sequence[str] = ()
    #: Where the session id came from (``IdentityResolver.resolve``'s second value).
    source: str = ""
    #: The caller's tenant (``Scope.tenant``, or ""): scopes and keys the fingerprint derived here.
    tenant: str = ""
    #: A top-level system prompt (Anthropic Messages' ``system``), fingerprinted like the chain does.
    system: Any = None

    def __post_init__(self) -> None:
        check_text(self.model, "model")
        object.__setattr__(self, "tier", parse_tier(self.tier))
        if type(self.session_id) is not str:
            raise InvalidEvent("session_id", f"must be a str, got {type(self.session_id).__name__}")
        if type(self.user_explicit) is not bool:
            raise InvalidEvent("user_explicit", "must be a bool")
        if type(self.estimate_usd) not in (int, float) or not self.estimate_usd >= 0:
            raise InvalidEvent("estimate_usd", "must be a number >= 0")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        for candidate in self.candidates:
            check_text(candidate, "candidates", 256)
        check_text(self.source, "source", 64)
        check_tenant(self.tenant)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where the request goes, why, and the store events that record it."""

    session_id: str
    kind: Kind
    model: str
    tier: Tier | None
    provider: str
    reason: str
    strategy: Strategy
    source: str = ""
    #: The deployment to try first ("" when the router gave no candidates).
    deployment: str = ""
    #: The router's candidates reordered: the session's deployment first.
    candidates: tuple[str, ...] = ()
    #: Budget figures in USD (limit None: no budget).
    spent_usd: float = 0.0
    estimate_usd: float = 0.0
    limit_usd: float | None = None
    #: Store events implied by the decision, in the order they must be applied.
    events: tuple[SessionEvent, ...] = field(default=(), repr=False)

    @property
    def refused(self) -> bool:
        return self.kind is Kind.REFUSE

    def headers(self) -> dict[str, str]:
        """The decision report as HTTP response headers (ASCII-safe)."""
        values = {
            "x-session-id": self.session_id, "x-session-decision": self.kind.value,
            "x-session-reason": self.reason, "x-session-strategy": self.strategy.value,
            "x-session-source": self.source, "x-session-model": self.model,
            "x-session-tier": self.tier.value if self.tier else "",
        }
        return {k: v.encode("ascii", "replace").decode() for k, v in values.items() if v}

    def budget_error(self) -> BudgetExceeded:
        return BudgetExceeded(self.session_id, self.spent_usd, self.estimate_usd, self.limit_usd or 0.0, self)


def deployment_key(provider: str, api_key: str = "", api_base: str = "") -> str:
    """A loggable deployment identity: provider, a short hash of the API key, and the base URL.

    Provider prefix caches live per key, so affinity is per key; the key itself
    never leaves this function.
    """
    key = hashlib.sha256(api_key.encode()).hexdigest()[:12] if api_key else ""
    return ":".join(part for part in (provider, key) if part) + (f"@{api_base}" if api_base else "")


# -- request reading --------------------------------------------------------------------
def _get(message: Any, name: str) -> Any:
    if isinstance(message, Mapping):
        return message.get(name)
    return getattr(message, name, None)


def tool_call_names(message: Any) -> list[str]:
    """Names of the tools an assistant message called (OpenAI ``tool_calls`` or Anthropic ``tool_use``)."""
    names = []
    for call in _get(message, "tool_calls") or ():
        fn = _get(call, "function")
        name = _get(fn, "name") if fn is not None else _get(call, "name")
        if isinstance(name, str):
            names.append(name)
    content = _get(message, "content")
    if isinstance(content, Sequence) and not isinstance(content, str):
        for block in content:
            if _get(block, "type") == "tool_use" and isinstance(_get(block, "name"), str):
                names.append(_get(block, "name"))
    return names


def request_hash(messages: Sequence[Any]) -> str:
    """Three-strike hash: the last user message plus the tool-call names of the last assistant message."""
    # In an agent loop the last user message stays the same while the assistant
    # keeps calling tools: the same text plus the same tool calls is a stall.
    last_user: str | None = None
    tools: list[str] | None = None
    for message in reversed(list(messages)):
        role = _get(message, "role")
        if role == "user" and last_user is None:
            last_user = message_text(_get(message, "content"))
        elif role == "assistant" and tools is None:
            tools = tool_call_names(message)
        if last_user is not None and tools is not None:
            break
    return hash_request_content(last_user or "", tools)


# -- the pure decision --------------------------------------------------------------------
def _models_for(models: TierModels, tier: Tier | None) -> tuple[str, ...]:
    value = models.get(tier) if tier is not None else None
    if value is None and tier is not None:
        value = models.get(tier.value)
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _pick(models: TierModels, tier: Tier | None, fallback: str, provider: str) -> str:
    """The tier's model, preferring one of ``provider`` while a cache pin holds it."""
    choices = _models_for(models, tier)
    if provider:
        for model in choices:
            if provider_from_model(model) == provider:
                return model
        if provider_from_model(fallback) == provider:
            return fallback
    return choices[0] if choices else fallback


def _cheapest_tier(models: TierModels) -> Tier | None:
    for tier in _TIERS:
        if _models_for(models, tier):
            return tier
    return None


def _estimate(model: str, request: Request, options: Options) -> float:
    if options.estimator is None:
        return float(request.estimate_usd)
    value = options.estimator(model, request)
    return float(value) if isinstance(value, (int, float)) and value >= 0 else float(request.estimate_usd)


def _name(tier: Tier | None) -> str:
    return tier.value if tier else "none"


def _usd(value: float) -> str:
    return f"${value:.6f}".rstrip("0").rstrip(".")


def decide(request: Request, state: Entry | None, models: TierModels, options: Options | None = None,
           config: Config | None = None) -> RouteDecision:
    """The pure routing decision (docs/policy.md): no I/O, no clock, no engine.

    ``state`` is the session's snapshot (``store.get_session``), ``config`` the
    store's config (strike limit, auto-escalation). Rules, highest first:
    user-explicit pin, warmup, strategy, three-strike escalation, never-downgrade
    with SIMPLE bypass, cache-provider preference, budget, deployment affinity.
    """
    options = options or Options()
    config = config or default_config()
    sid = request.session_id
    strategy: Strategy = options.strategy  # type: ignore[assignment]
    r_model, r_tier = request.model, request.tier

    def out(kind: Kind, model: str, tier: Tier | None, reason: str, events: list[SessionEvent] | None = None,
            **extra: Any) -> RouteDecision:
        return RouteDecision(sid, kind, model, tier, provider_from_model(model), reason, strategy,
                             request.source, events=tuple(events or ()), **extra)

    if not sid or not is_valid_session_id(sid):
        return out(Kind.BYPASS, r_model, r_tier, "no session id" if not sid else "invalid session id")

    # A cost-only entry (spend recorded, no model yet) pins nothing.
    pinned = None if state is not None and not state.model and state.request_count == 0 else state
    turn = 1 if pinned is None else pinned.request_count + 1
    events: list[SessionEvent] = []
    cache_provider = state.provider if state is not None and state.cache_sticky else ""
    h = request_hash(request.messages) if request.messages else ""

    def strikes_rule(base: Entry | None) -> tuple[bool, list[SessionEvent]]:
        """Record the hash; True when this request brings the session to the strike limit."""
        if not h:
            return False, []
        hash_events: list[SessionEvent] = [Hash(sid, h)]
        if base is None or not base.model:
            return False, hash_events
        limit = options.strike_limit or config.strike_limit
        predicted = apply(base, Hash(sid, h), base.last_used_at, config)
        strikes = predicted.result
        if (not options.escalate_on_strikes or strikes < limit or strikes <= base.strikes
                or base.escalated or base.user_explicit):
            return False, hash_events
        if predicted.state is None or not predicted.state.escalated:
            hash_events.append(Escalate(sid, "strikes"))
        return True, hash_events

    # 1. Strategy none: the router decides every time; only the budget and the audit apply.
    if strategy is Strategy.NONE:
        kind, model, tier, reason = Kind.BYPASS, r_model, r_tier, "strategy none: router's choice"
    # 2. A user-explicit model wins over everything.
    elif request.user_explicit:
        events.append(SetSession(sid, r_model, r_tier, True))
        if pinned is not None and pinned.model == r_model:
            kind, reason = Kind.RETAIN, "user-explicit pin"
        else:
            kind, reason = Kind.INITIALIZE, "user-explicit model pinned"
        _, hashed = strikes_rule(None)
        events += hashed
        model, tier = r_model, r_tier
    elif pinned is not None and pinned.user_explicit and pinned.model:
        events.append(Touch(sid))
        _, hashed = strikes_rule(None)
        events += hashed
        kind, model, tier, reason = Kind.RETAIN, pinned.model, pinned.tier, "user-explicit pin"
    # 3. Warmup: the first turns follow the router without committing to a tier.
    elif turn <= options.warmup_turns:
        events.append(SetSession(sid, r_model, r_tier))
        _, hashed = strikes_rule(None)
        events += hashed
        model = _pick(models, r_tier, r_model, cache_provider) if cache_provider else r_model
        kind, tier, reason = Kind.BYPASS, r_tier, f"warmup turn {turn} of {options.warmup_turns}"
    # 4. No pin yet (or warmup just ended): the router's choice becomes the pin.
    elif pinned is None or not pinned.model or (options.warmup_turns and turn == options.warmup_turns + 1):
        model = _pick(models, r_tier, r_model, cache_provider) if cache_provider else r_model
        events.append(SetSession(sid, model, r_tier))
        _, hashed = strikes_rule(None)
        events += hashed
        reason = "warmup over: pinned router's choice" if options.warmup_turns else "first turn: pinned router's choice"
        kind, tier = Kind.INITIALIZE, r_tier
    else:
        escalate, hashed = strikes_rule(pinned)
        p_tier = pinned.tier
        if escalate:
            up = tier_above(p_tier)
            if strategy is Strategy.ADAPTIVE and tier_rank(r_tier) > tier_rank(up):
                model = _pick(models, r_tier, r_model, cache_provider) if cache_provider else r_model
                kind, tier, reason = Kind.UPGRADE, r_tier, "strike limit reached; router asked for a higher tier"
            else:
                model = _pick(models, up, pinned.model, cache_provider)
                kind, tier = Kind.ESCALATE, up
                reason = f"strike limit reached: {_name(p_tier)} -> {up.value}"
            events += [*hashed, SetSession(sid, model, tier)]
        elif strategy is Strategy.ADAPTIVE and tier_rank(r_tier) > tier_rank(p_tier):
            model = _pick(models, r_tier, r_model, cache_provider) if cache_provider else r_model
            kind, tier = Kind.UPGRADE, r_tier
            reason = f"router tier {_name(r_tier)} above pinned {_name(p_tier)}"
            events += [SetSession(sid, model, tier), *hashed]
        elif (strategy is Strategy.ADAPTIVE and options.simple_bypass and r_tier is Tier.SIMPLE
              and tier_rank(p_tier) > 0):
            model = _pick(models, Tier.SIMPLE, r_model, cache_provider) if cache_provider else r_model
            kind, tier, reason = Kind.BYPASS, Tier.SIMPLE, "SIMPLE follow-up: cheap model, pin kept"
            events += [Touch(sid), *hashed]
        else:
            model, tier = pinned.model, p_tier
            kind = Kind.RETAIN
            reason = ("sticky: pinned model kept" if strategy is Strategy.STICKY
                      else "never downgrade: pinned model kept")
            events += [Touch(sid), *hashed]

    # 5. Prompt-cache stickiness: a long context pins the provider that holds its prefix cache.
    if (options.cache_sticky and strategy is not Strategy.NONE and not cache_provider and request.messages
            and should_cache_sticky(request.messages)):
        events.append(SetCacheSticky(sid, provider_from_model(model)))
    if cache_provider and kind is not Kind.RETAIN:
        reason += f"; cache pin {cache_provider}"

    # 6. Budget: spent plus this request's estimate must stay within the cap.
    spent = (state.session_cost_micros if state is not None else 0) / 1_000_000
    limit = options.max_cost_usd
    estimate = _estimate(model, request, options) if limit is not None else float(request.estimate_usd)
    budget = {"spent_usd": spent, "estimate_usd": estimate, "limit_usd": limit}
    if limit is not None and spent + estimate > limit:
        over = f"budget: {_usd(spent)} spent + {_usd(estimate)} estimate > {_usd(limit)} cap"
        cheap_tier = _cheapest_tier(models)
        serious = bool(request.tools) or tier in (Tier.COMPLEX, Tier.REASONING) or request.user_explicit
        if options.budget_mode == "strict" or serious or cheap_tier is None:
            why = "strict" if options.budget_mode == "strict" else (
                "tool use" if request.tools else "explicit model" if request.user_explicit
                else f"{tier.value if tier else 'no'} tier" if serious else "no cheaper tier")
            refused = out(Kind.REFUSE, model, tier, f"{over}; refused ({why})",
                          [DecisionEvent(sid, Kind.REFUSE.value, model, tier, provider_from_model(model),
                                         f"{over}; refused ({why})", strategy.value, request.source)],
                          **budget)
            return refused
        cheap = _pick(models, cheap_tier, model, cache_provider)
        cheap_estimate = _estimate(cheap, request, options)
        if spent + cheap_estimate > limit:
            reason = f"budget: {_usd(spent)} spent + {_usd(cheap_estimate)} estimate > {_usd(limit)} cap; refused"
            return out(Kind.REFUSE, cheap, cheap_tier, reason,
                       [DecisionEvent(sid, Kind.REFUSE.value, cheap, cheap_tier, provider_from_model(cheap),
                                      reason, strategy.value, request.source)],
                       spent_usd=spent, estimate_usd=cheap_estimate, limit_usd=limit)
        # Downgrade for this request only: the pin is kept (SetSession would move it down).
        events = [Touch(sid) if isinstance(e, SetSession) and pinned is not None else e for e in events]
        kind, model, tier, reason = Kind.BYPASS, cheap, cheap_tier, f"{over}; cheapest tier"
        budget["estimate_usd"] = cheap_estimate

    # 7. Deployment affinity: the deployment that served the session goes first. The
    # candidates are the chosen model's deployments, so only a turn that keeps the
    # pinned model can find its deployment gone (a switch); a new pin records its
    # first deployment, and a bypass leaves the pin's deployment alone.
    candidates = request.candidates
    deployment = ""
    if candidates and strategy is not Strategy.NONE:
        served = state.deployment if state is not None else ""
        if served and served in candidates:
            deployment = served
            candidates = (served, *(c for c in candidates if c != served))
        else:
            deployment = candidates[0]
            if kind is not Kind.BYPASS:
                if served and kind is Kind.RETAIN:
                    kind = Kind.SWITCH
                    reason += "; deployment gone, switched"
                events.append(SetDeployment(sid, deployment))

    events.append(DecisionEvent(sid, kind.value, model, tier, provider_from_model(model), reason[:256],
                                strategy.value, request.source, deployment))
    return out(kind, model, tier, reason[:256], events, deployment=deployment, candidates=tuple(candidates),
               **budget)


def unavailable(request: Request, options: Options | None, why: str) -> RouteDecision:
    """The router's own choice, when the engine cannot answer in time."""
    strategy = (options or Options()).strategy
    return RouteDecision(request.session_id, Kind.UNAVAILABLE, request.model, request.tier,  # type: ignore[arg-type]
                         provider_from_model(request.model), f"engine unavailable: {why}", strategy,
                         request.source, deployment=request.candidates[0] if request.candidates else "",
                         candidates=tuple(request.candidates))


def cost_micros(cost_usd: float) -> int:
    """USD -> integer micro-USD, rounded; negative or non-finite costs count as 0."""
    if type(cost_usd) not in (int, float) or not cost_usd > 0 or cost_usd == float("inf"):
        return 0
    return round(cost_usd * 1_000_000)


# -- the wrappers -------------------------------------------------------------------------
class _Base:
    def __init__(self, models: TierModels, options: Options | None, identity: IdentityResolver | None,
                 config: Config) -> None:
        if not isinstance(models, Mapping):
            raise InvalidEvent("models", "must be a mapping of tier -> model(s)")
        for key in models:
            parse_tier(key, "models")
        self.models = models
        self.options = options or Options()
        self.identity = identity
        self._config = config
        self._lock = threading.Lock()
        #: Requests answered with kind ``unavailable`` (engine too slow or failed); read by metrics.
        self.unavailable_count = 0

    def _identify(self, request: Request) -> Request:
        # An explicit id the chain rejected gives no session, never a weaker fingerprint.
        if (request.session_id or self.identity is None or not request.messages
                or request.source.startswith(INVALID_PREFIX)):
            return request
        sid = self.identity.fingerprint(request.messages, tenant=request.tenant, system=request.system)
        if not sid:
            return request
        return replace(request, session_id=sid, source=request.source or FINGERPRINT)

    def _sync_store(self) -> SessionStore:
        raise NotImplementedError

    def _without_lookup(self, request: Request) -> RouteDecision | None:
        """The decision when there is no session to look up (no id, invalid id, store disabled)."""
        store = self._sync_store()
        if request.session_id and is_valid_session_id(request.session_id) and store.enabled:
            return None
        decision = decide(request, None, self.models, self.options, self._config)
        if not store.enabled and request.session_id:
            decision = _no_events(decision, "session store disabled")
        return decision

    def _decided(self, request: Request, state: Entry | None) -> RouteDecision:
        """Decide on the session's snapshot and tell the events the decision implies."""
        decision = decide(request, state, self.models, self.options, self._config)
        self._tell(decision.events)
        return decision

    def _unavailable(self, request: Request, exc: BaseException) -> RouteDecision:
        """The engine was too slow or failed: serve the router's own choice, count and log it."""
        with self._lock:
            self.unavailable_count += 1
        why = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        log.warning("session-engine policy: engine %s for a request; serving the router's choice", why)
        decision = unavailable(request, self.options, why)
        self._tell([_decision_event(decision)])
        return decision

    def _tell(self, events: Sequence[SessionEvent]) -> None:
        # tell_many only appends to mailboxes: safe and quick, also on an event loop's thread.
        if not events:
            return
        try:
            self._sync_store().tell_many(events)
        except EngineError as exc:  # a closed store: the request still goes on
            log.warning("session-engine policy: could not record a decision (%s)", type(exc).__name__)

    def _response_events(self, session_id: str, cost_usd: float | None, micros: int | None, deployment: str,
                         decision: RouteDecision | None) -> list[SessionEvent]:
        if not session_id or not is_valid_session_id(session_id):
            return []
        events: list[SessionEvent] = []
        amount = micros if micros is not None else cost_micros(cost_usd or 0.0)
        if amount:
            events.append(Cost(session_id, amount))
        if deployment and (decision is None or decision.kind is not Kind.BYPASS):
            events.append(SetDeployment(session_id, deployment))
        return events


class Policy(_Base):
    """The policy over a ``SessionStore``: ``route`` before the call, ``record_response`` after it.

    ``route`` never raises for engine trouble (kind ``unavailable`` instead); it
    raises ``BudgetExceeded`` when the budget refuses the request.
    """

    def __init__(self, store: SessionStore, models: TierModels, options: Options | None = None, *,
                 identity: IdentityResolver | None = None) -> None:
        super().__init__(models, options, identity, store.config)
        self.store = store

    def _sync_store(self) -> SessionStore:
        return self.store

    def decide(self, request: Request) -> RouteDecision:
        """Like ``route`` but never raises ``BudgetExceeded``: a refusal is returned as a decision."""
        request = self._identify(request)
        decision = self._without_lookup(request)
        if decision is not None:
            return decision
        try:
            state = self.store.ask(GetSession(request.session_id), timeout=self.options.deadline_s)
        except (EngineError, TimeoutError) as exc:
            return self._unavailable(request, exc)
        return self._decided(request, state)

    def route(self, request: Request) -> RouteDecision:
        """Decide, record, and return the decision; raises ``BudgetExceeded`` on a refusal."""
        decision = self.decide(request)
        if decision.refused:
            raise decision.budget_error()
        return decision

    def record_response(self, session_id: str, *, cost_usd: float | None = None, micros: int | None = None,
                        deployment: str = "", decision: RouteDecision | None = None) -> None:
        """After the response: add its cost (USD, or micros) and remember the deployment that served it.

        Pass the request's ``decision`` so that a bypass (a model other than the
        pin served) does not replace the pinned model's deployment.
        """
        self._tell(self._response_events(session_id, cost_usd, micros, deployment, decision))

    def record_cost(self, session_id: str, cost_usd: float) -> None:
        """Add a response's cost in USD (stored in micros)."""
        self.record_response(session_id, cost_usd=cost_usd)


class AsyncPolicy(_Base):
    """Coroutine twin of ``Policy`` over an ``AsyncSessionStore``; never blocks the event loop."""

    def __init__(self, store: AsyncSessionStore, models: TierModels, options: Options | None = None, *,
                 identity: IdentityResolver | None = None) -> None:
        super().__init__(models, options, identity, store.store.config)
        self.store = store

    def _sync_store(self) -> SessionStore:
        return self.store.store

    async def decide(self, request: Request) -> RouteDecision:
        request = self._identify(request)
        decision = self._without_lookup(request)
        if decision is not None:
            return decision
        try:
            state = await self.store.ask(GetSession(request.session_id), timeout=self.options.deadline_s)
        except (EngineError, TimeoutError) as exc:  # asyncio.TimeoutError is TimeoutError
            return self._unavailable(request, exc)
        return self._decided(request, state)

    async def route(self, request: Request) -> RouteDecision:
        decision = await self.decide(request)
        if decision.refused:
            raise decision.budget_error()
        return decision

    async def record_response(self, session_id: str, *, cost_usd: float | None = None, micros: int | None = None,
                              deployment: str = "", decision: RouteDecision | None = None) -> None:
        """After the response: add its cost and remember the deployment (see ``Policy.record_response``)."""
        self._tell(self._response_events(session_id, cost_usd, micros, deployment, decision))

    async def record_cost(self, session_id: str, cost_usd: float) -> None:
        await self.record_response(session_id, cost_usd=cost_usd)


def _decision_event(decision: RouteDecision) -> DecisionEvent:
    return DecisionEvent(decision.session_id, decision.kind.value, decision.model, decision.tier,
                         decision.provider, decision.reason[:256], decision.strategy.value, decision.source[:64],
                         decision.deployment)


def _no_events(decision: RouteDecision, reason: str) -> RouteDecision:
    return RouteDecision(decision.session_id, Kind.BYPASS if decision.kind is not Kind.REFUSE else Kind.REFUSE,
                         decision.model, decision.tier, decision.provider, reason, decision.strategy,
                         decision.source, decision.deployment, decision.candidates, decision.spent_usd,
                         decision.estimate_usd, decision.limit_usd)
