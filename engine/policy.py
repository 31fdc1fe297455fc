"""Routing policy: the rules of docs/policy.md over a store, never failing a request.

``Policy.route(request)`` sends one ``Route`` event with one bounded ``ask``:
the session's own turn runs the routing rules (``engine.core.rules``) on its live
state, applies the events the decision implies, reserves the request's
estimate under a budget cap, and logs the decision, so concurrent requests of
one session are decided one after the other. If the engine does not answer
within ``Options.deadline_s`` or fails, the router's own choice is returned
with kind ``unavailable`` and the request goes on. ``record_response``
settles the cost, ``release`` gives a failed call's reservation back.
``decide(request, state, ...)`` runs the same rules, purely, on a snapshot.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

import orjson

from engine.core.affinity import GROUP_KINDS, served_record
from engine.core.config import Config, default_config
from engine.core.entry import Entry
from engine.core.headers import decision_headers, with_deprecated_aliases
from engine.core.kinds import Kind
from engine.core.providers import provider_from_model
from engine.core.requests import hash_request_content, should_cache_sticky
from engine.core.rules import STALL_ERRORS as STALL_ERRORS  # the "strikes" detector's threshold, applied in the turn
from engine.core.rules import Routed, decide_route
from engine.identity import FINGERPRINT, INVALID_PREFIX, IdentityResolver, check_tenant, message_text
from engine.store import SessionStore
from events import (
    Cost,
    EngineError,
    InvalidEvent,
    Release,
    Route,
    RouteRules,
    SessionEvent,
    Tier,
    parse_tier,
)
from events import Decision as DecisionEvent
from events._events import MAX_STALL_WINDOW, check_stall_detector, check_stall_window
from events._validate import MAX_MICROS, UNENCODABLE, check_text, encodable, is_valid_session_id

if TYPE_CHECKING:
    from engine.aio import AsyncSessionStore

__all__ = [
    "AsyncPolicy", "BudgetExceeded", "Estimator", "Kind", "Options", "Policy", "Request", "RouteDecision",
    "STALL_ERRORS", "Strategy", "TierModels", "cost_micros", "decide", "deployment_key", "provider_from_model",
    "request_hash", "route_rules", "stall_reading", "tool_error_run",
]

log = logging.getLogger("engine.policy")

_TIERS = (Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX, Tier.REASONING)


class Strategy(str, Enum):
    """How a session holds its pin (docs/identity.md)."""

    STICKY = "sticky"  # pin the first choice and keep it (three-strike escalation still applies)
    ADAPTIVE = "adaptive"  # never downgrade: upgrade on a higher router tier, SIMPLE follow-ups bypass
    NONE = "none"  # no pinning: the router's choice every time (budget still applies)

    def __str__(self) -> str:
        return self.value


BUDGET_MODES = ("graceful", "strict")
#: LiteLLM 1.110's default ``escalation_keywords`` (its complexity router), kept here.
DEFAULT_ESCALATION_KEYWORDS: tuple[str, ...] = ("LITELLM ESCALATE",)

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
        """The refusal as an OpenAI-style JSON error body (what an HTTP 422 refusal carries: not retried by clients)."""
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
    deadline_s: float = 0.1
    #: How long a request's budget reservation holds when its cost is never reported (a crashed caller).
    reservation_ttl_ms: int = 600_000
    #: Text that, found in the last user message (case-sensitive), moves the session one configured tier
    #: up (LiteLLM's ``escalation_keywords``, same default); () turns it off.
    escalation_keywords: tuple[str, ...] = DEFAULT_ESCALATION_KEYWORDS
    #: The stall detector (docs/policy.md "Stalls"): "window" reads the request's last ``stall_window``
    #: tool calls (name, arguments, result) and the session's identical requests in a row; "strikes" is
    #: the seed's cumulative count over tool-call names. ``stall_lift``: a stalled request is served one
    #: configured tier up while the pin stays, so the escalation ends once the agent moves on (False: the
    #: session is escalated for good, once, as the seed does).
    stall_detector: str = "window"
    stall_window: int = 6
    stall_lift: bool = False

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "strategy", Strategy(self.strategy))
        except ValueError:
            raise InvalidEvent("strategy", "must be one of sticky, adaptive, none") from None
        check_stall_detector(self.stall_detector)
        check_stall_window(self.stall_window)
        for name in ("simple_bypass", "escalate_on_strikes", "cache_sticky", "stall_lift"):
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
        if type(self.reservation_ttl_ms) is not int or self.reservation_ttl_ms < 1:
            raise InvalidEvent("reservation_ttl_ms", "must be an int >= 1")
        keywords = self.escalation_keywords
        if isinstance(keywords, str) or not isinstance(keywords, Sequence):
            raise InvalidEvent("escalation_keywords", "must be a sequence of non-empty strings")
        object.__setattr__(self, "escalation_keywords", tuple(keywords))
        for word in self.escalation_keywords:
            if type(word) is not str or not word or not word.strip():
                raise InvalidEvent("escalation_keywords", "must be a sequence of non-empty strings")
            check_text(word, "escalation_keywords", 64)


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
    #: The request's output limit (0: not given); read by estimators.
    max_tokens: int = 0

    def __post_init__(self) -> None:
        check_text(self.model, "model")
        object.__setattr__(self, "tier", parse_tier(self.tier))
        if type(self.session_id) is not str:
            raise InvalidEvent("session_id", f"must be a str, got {type(self.session_id).__name__}")
        if not self.session_id.isprintable() and not encodable(self.session_id):
            # Not text at all (a lone surrogate a JSON body carried): refused here, as a model would be. An id
            # with control characters is text, and falls back to a bypass (is_valid_session_id).
            raise InvalidEvent("session_id", UNENCODABLE)
        if type(self.user_explicit) is not bool:
            raise InvalidEvent("user_explicit", "must be a bool")
        if type(self.estimate_usd) not in (int, float) or not self.estimate_usd >= 0:
            raise InvalidEvent("estimate_usd", "must be a number >= 0")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        for candidate in self.candidates:
            check_text(candidate, "candidates", 256)
        messages = self.messages
        if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not all(
                isinstance(m, Mapping) or hasattr(m, "role") for m in messages):
            raise InvalidEvent("messages", "must be a sequence of messages (mappings or objects with a role)")
        check_text(self.source, "source", 64)
        check_tenant(self.tenant)
        if type(self.max_tokens) is not int or self.max_tokens < 0:
            raise InvalidEvent("max_tokens", "must be an int >= 0")


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
    #: Store events implied by the decision, in the order they apply (``decide`` only: a policy's
    #: ``Route`` has already applied them).
    events: tuple[SessionEvent, ...] = field(default=(), repr=False)
    #: The budget reservation this request holds ("" when none); ``record_response`` settles it.
    reservation_id: str = ""
    #: The deployment that had served the session when the decision was taken ("" when none); for a
    #: bypass, the one pinned for the bypass's model group and tier.
    served_deployment: str = ""

    @property
    def refused(self) -> bool:
        return self.kind is Kind.REFUSE

    def headers(self, cost_usd: float | None = None) -> dict[str, str]:
        """The decision report as HTTP response headers (ASCII-safe): ``x-session-engine-*``, the format the
        LiteLLM hook answers with too (``engine.core.headers``), plus the session id and, with ``cost_usd``
        (the response's), its cost and what remains of a budget after it. The deprecated ``x-session-*``
        names of the same values are written too, for this release."""
        return with_deprecated_aliases(decision_headers(
            self.kind.value, self.model, self.tier.value if self.tier else None, self.source, reason=self.reason,
            strategy=self.strategy.value, session_id=self.session_id, limit_usd=self.limit_usd,
            spent_usd=self.spent_usd, cost_usd=cost_usd))

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


def _tool_calls(message: Any) -> Sequence[Any]:
    """An assistant message's ``tool_calls`` list (() when absent or not a list: nothing to read)."""
    calls = _get(message, "tool_calls")
    return calls if isinstance(calls, (list, tuple)) else ()


def tool_call_names(message: Any) -> list[str]:
    """Names of the tools an assistant message called (OpenAI ``tool_calls`` or Anthropic ``tool_use``)."""
    return [name for _, name, _ in _calls(message)]


def last_user_text(messages: Sequence[Any], *, spoken: bool = False) -> str:
    """The text of the last user message ("" when there is none); ``spoken``: of the last one with text
    (an Anthropic user message of tool results only has none)."""
    for message in reversed(list(messages)):
        if _get(message, "role") == "user":
            text = message_text(_get(message, "content"))
            if text or not spoken:
                return text
    return ""


def escalation_keyword(messages: Sequence[Any], keywords: Sequence[str]) -> str:
    """The first of ``keywords`` the last user message contains (case-sensitive, as LiteLLM matches), or ""."""
    if not keywords or not messages:
        return ""
    text = last_user_text(messages)
    return next((k for k in keywords if k in text), "")


def request_hash(messages: Sequence[Any]) -> str:
    """The "strikes" detector's hash: the last user message plus the tool-call names of the last
    assistant message (the "window" detector's is ``stall_reading``)."""
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


def _canonical(arguments: Any) -> str:
    """Tool-call arguments as canonical JSON (keys sorted), whether sent as a JSON string (OpenAI) or an
    object (Anthropic), so the same call compares equal on both; unparsable text stays as sent."""
    if isinstance(arguments, (str, bytes)):
        try:
            arguments = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return arguments if isinstance(arguments, str) else arguments.decode("utf-8", "replace")
    try:
        return orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS, default=str).decode()
    except TypeError:
        return str(arguments)


def _calls(message: Any) -> list[tuple[Any, Any, Any]]:
    """(id, name, arguments) of each tool call of an assistant message, in order, on both surfaces."""
    calls = []
    for call in _tool_calls(message):
        fn = _get(call, "function")
        name = _get(fn, "name") if fn is not None else _get(call, "name")
        if isinstance(name, str):
            calls.append((_get(call, "id"), name, _get(fn, "arguments") if fn is not None else None))
    content = _get(message, "content")
    if isinstance(content, Sequence) and not isinstance(content, str):
        for block in content:
            if _get(block, "type") == "tool_use" and isinstance(_get(block, "name"), str):
                calls.append((_get(block, "id"), _get(block, "name"), _get(block, "input")))
    return calls


def tool_steps(messages: Sequence[Any], window: int) -> tuple[list[tuple[str, str, bool]], int]:
    """The last ``window`` tool calls of the current task, newest first, each as (signature, result text,
    errored), and how many of them the last assistant message made. The current task's calls are those
    since the last user message (one that is not only tool results): a user who speaks moves the
    conversation on. The signature is the tool's name plus its canonical JSON arguments; a call not
    answered yet has the result "" and no error. A result is an error when it says so (Anthropic
    ``is_error: true``) or its text starts with error, exception, traceback or an ``{"error"`` object
    (chat completions have no error flag)."""
    results: dict[str, tuple[str, bool]] = {}
    steps: list[tuple[str, str, bool]] = []
    last = -1
    for message in reversed(messages):
        role = _get(message, "role")
        if role == "tool":
            call_id = _get(message, "tool_call_id")
            if isinstance(call_id, str) and call_id not in results:
                content = _get(message, "content")
                results[call_id] = (message_text(content), _is_error_result(None, content))
        elif role == "user":
            content = _get(message, "content")
            answered = False
            if isinstance(content, Sequence) and not isinstance(content, str):
                for block in content:
                    call_id = _get(block, "tool_use_id")
                    if _get(block, "type") == "tool_result" and isinstance(call_id, str):
                        answered = True
                        if call_id not in results:
                            inner = _get(block, "content")
                            results[call_id] = (message_text(inner), _is_error_result(_get(block, "is_error"), inner))
            if not answered:
                break  # the user spoke: the calls before belong to an earlier task
        elif role == "assistant":
            for call_id, name, arguments in reversed(_calls(message)):
                text, error = results.get(call_id, ("", False)) if isinstance(call_id, str) else ("", False)
                steps.append((f"{name}({_canonical(arguments)})", text, error))
                if len(steps) == window:
                    break
            if last < 0:
                last = len(steps)
            if len(steps) == window:
                break
    return steps, max(last, 0)


def stall_reading(messages: Sequence[Any], window: int) -> tuple[str, int, int]:
    """What the "window" stall detector reads of a request: its hash (the last user text plus the
    calls of the last assistant message with a digest of their results), how many of its last
    ``window`` tool calls repeat the newest (same name, arguments and result; 0 below 2), and, when
    the newest returned an error, how many errors: in a row ending with it, or of the same call (name
    and arguments, whatever the error's text) in the window, whichever is more. Only the counts and
    the hash leave here."""
    steps, last = tool_steps(messages, window)
    user = last_user_text(messages, spoken=True)
    calls = [f"{sig}={hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=8).hexdigest()}"
             for sig, text, _ in steps[:last]]
    if not steps:
        return hash_request_content(user, calls), 0, 0
    newest = steps[0]
    repeats = sum(1 for step in steps if step[0] == newest[0] and step[1] == newest[1])
    errors = 0
    if newest[2]:  # errors in a row, or errors of the newest's call whatever their text (ids, times)
        for step in steps:
            if not step[2]:
                break
            errors += 1
        errors = max(errors, sum(1 for step in steps if step[2] and step[0] == newest[0]))
    return hash_request_content(user, calls), repeats if repeats > 1 else 0, errors


_ERROR_PREFIXES = ("error", "exception", "traceback", '{"error"', "{'error'")


def _is_error_result(is_error: Any, content: Any) -> bool:
    """A tool result is an error when it says so (Anthropic ``is_error: true``) or its text starts with
    error, exception, traceback or an ``{"error"`` object (case-insensitive, after whitespace)."""
    if is_error is True:
        return True
    return message_text(content).lstrip()[:16].lower().startswith(_ERROR_PREFIXES)


def tool_error_run(messages: Sequence[Any]) -> int:
    """How many times in a row, at the end of the conversation, the same tool call returned an error."""
    calls: dict[str, str] = {}  # tool call id -> "name(arguments)"
    results: list[tuple[str, bool]] = []  # (signature, error) of each tool result, in order
    for message in messages:
        role = _get(message, "role")
        if role == "assistant":
            for call in _tool_calls(message):
                fn = _get(call, "function")
                if fn is not None and isinstance(_get(call, "id"), str):
                    calls[_get(call, "id")] = f"{_get(fn, 'name')}({_get(fn, 'arguments')})"
            content = _get(message, "content")
            if isinstance(content, Sequence) and not isinstance(content, str):
                for block in content:
                    if _get(block, "type") == "tool_use" and isinstance(_get(block, "id"), str):
                        calls[_get(block, "id")] = f"{_get(block, 'name')}({_get(block, 'input')!r})"
        elif role == "tool":
            call_id = _get(message, "tool_call_id")
            results.append((calls.get(call_id, "") if isinstance(call_id, str) else "",
                            _is_error_result(None, _get(message, "content"))))
        elif role == "user":
            content = _get(message, "content")
            if isinstance(content, Sequence) and not isinstance(content, str):
                for block in content:
                    if _get(block, "type") == "tool_result":
                        call_id = _get(block, "tool_use_id")
                        results.append((calls.get(call_id, "") if isinstance(call_id, str) else "",
                                        _is_error_result(_get(block, "is_error"), _get(block, "content"))))
    run = 0
    last = results[-1][0] if results else ""
    for signature, error in reversed(results):
        if not error or not signature or signature != last:
            break
        run += 1
    return run


# -- the pure decision --------------------------------------------------------------------
def route_rules(models: TierModels, options: Options) -> RouteRules:
    """The options and tier table as the routing transition reads them (frozen data, built once)."""
    table = []
    for tier in _TIERS:
        value = models.get(tier)
        if value is None:
            value = models.get(tier.value)
        if value is not None:
            table.append((tier.value, (value,) if isinstance(value, str) else tuple(value)))
    cap = -1 if options.max_cost_usd is None else cost_micros(options.max_cost_usd)
    return RouteRules(tuple(table), options.strategy.value, options.simple_bypass,  # type: ignore[union-attr]
                      options.warmup_turns, options.escalate_on_strikes, options.strike_limit or 0,
                      options.cache_sticky, cap, options.budget_mode, options.reservation_ttl_ms,
                      options.stall_detector, options.stall_window, options.stall_lift)


def _estimate(model: str, request: Request, options: Options) -> float:
    if options.estimator is None:
        return float(request.estimate_usd)
    try:
        value = options.estimator(model, request)
    except Exception as exc:  # an estimator's bug must not fail the request
        log.warning("session-engine policy: estimator failed (%s); using the request's estimate",
                    type(exc).__name__)
        return float(request.estimate_usd)
    return float(value) if type(value) in (int, float) and value >= 0 else float(request.estimate_usd)


def route_event(request: Request, rules: RouteRules, options: Options, reservation_id: str = "",
                models: Sequence[str] = ()) -> Route:
    """The ``Route`` event of a request: what the rules read of it, computed here, outside the session's
    turn (hashes, stall signal, context length, estimates), never the prompt text itself.

    With a cap, every model of ``models`` (the tier table's) and the router's own are priced
    (``Options.estimator``); without one only the request's own ``estimate_usd`` is carried.
    """
    messages = request.messages
    if rules.max_cost_micros >= 0 and options.estimator is not None:
        priced = dict.fromkeys((request.model, *models))
        estimates = tuple((m, min(cost_micros(_estimate(m, request, options)), MAX_MICROS)) for m in priced)
    elif rules.max_cost_micros >= 0:  # every model at the request's own estimate
        estimates = (("", min(cost_micros(request.estimate_usd), MAX_MICROS)),)
    else:
        estimates = (("", min(cost_micros(request.estimate_usd), MAX_MICROS)),) if request.estimate_usd else ()
    repeats = errors = 0
    if not messages:
        h, stall = "", False
    elif rules.stall_detector == "window":
        (h, repeats, errors), stall = stall_reading(messages, rules.stall_window), False
    else:
        # The count travels in the Route: the rules apply STALL_ERRORS in the turn (engine.core.rules.strikes_signal).
        h, stall, errors = request_hash(messages), False, min(tool_error_run(messages), MAX_STALL_WINDOW)
    return Route(
        request.session_id, request.model, request.tier, rules, request.user_explicit, h, stall,
        bool(request.tools),
        bool(messages) and rules.cache_sticky and should_cache_sticky(messages),
        request.candidates, request.source, estimates,
        reservation_id or ("decide" if rules.max_cost_micros >= 0 else ""),
        escalation_keyword(messages, options.escalation_keywords), repeats, errors)


def _route_decision(request: Request, routed: Routed, strategy: Strategy, events: tuple[SessionEvent, ...] = ()
              ) -> RouteDecision:
    limit = None if routed.limit_micros < 0 else routed.limit_micros / 1_000_000
    return RouteDecision(request.session_id, routed.kind, routed.model, routed.tier,
                         provider_from_model(routed.model), routed.reason, strategy, request.source,
                         routed.deployment, routed.candidates,
                         (routed.spent_micros + routed.reserved_micros) / 1_000_000,
                         routed.estimate_micros / 1_000_000, limit, events, routed.reservation_id, routed.served)


def decide(request: Request, state: Entry | None, models: TierModels, options: Options | None = None,
           config: Config | None = None) -> RouteDecision:
    """The pure routing decision (docs/policy.md): no I/O, no clock, no engine.

    ``state`` is the session's snapshot, ``config`` the store's config (strike
    limit, auto-escalation). It runs the same rules (``engine.core.rules.RULES``)
    as the ``Route`` transition a ``Policy`` sends, and returns the session
    events the decision implies, ending with its ``Decision``. A ``Policy``
    never applies these: its ``Route`` applies them in the session's turn.
    """
    options = options or Options()
    config = config or default_config()
    strategy: Strategy = options.strategy  # type: ignore[assignment]
    sid = request.session_id
    if not sid or not is_valid_session_id(sid):
        return RouteDecision(sid, Kind.BYPASS, request.model, request.tier,  # type: ignore[arg-type]
                             provider_from_model(request.model), "no session id" if not sid else "invalid session id",
                             strategy, request.source)
    rules = route_rules(models, options)
    routed, events = decide_route(state, route_event(request, rules, options, models=_table_models(rules)), config)
    routed = replace(routed, reservation_id="")  # nothing is reserved on a snapshot
    decision = DecisionEvent(sid, routed.kind.value, routed.model, routed.tier, provider_from_model(routed.model),
                             routed.reason, strategy.value, request.source, routed.deployment)
    return _route_decision(request, routed, strategy, (*events, decision))


def _table_models(rules: RouteRules) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for _, ms in rules.models for m in ms))


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
        self.options = options or Options()  # also builds self.rules
        self.identity = identity
        self._config = config
        self._lock = threading.Lock()
        # Reservation ids: unique per policy (a random prefix) and cheap (a counter, no uuid per request).
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        #: Requests answered with kind ``unavailable`` (engine too slow or failed); read by metrics.
        self.unavailable_count = 0

    @property
    def options(self) -> Options:
        return self._options

    @options.setter
    def options(self, options: Options) -> None:
        """Replace the options; the rules the ``Route`` event carries are rebuilt from them."""
        if not isinstance(options, Options):
            raise InvalidEvent("options", "must be an engine.policy.Options")
        self._options = options
        #: The options and the tier table as the Route transition reads them (built once per options).
        self.rules = route_rules(self.models, options)
        self._models = _table_models(self.rules)

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
        """The decision when there is no session to route in (no id, invalid id, store disabled)."""
        store = self._sync_store()
        if request.session_id and is_valid_session_id(request.session_id) and store.enabled:
            return None
        decision = decide(request, None, self.models, self.options, self._config)
        if not store.enabled and request.session_id:
            decision = _no_events(decision, "session store disabled")
        return decision

    def _route_event(self, request: Request) -> Route:
        rid = f"{self._prefix}-{next(self._ids)}" if self.rules.max_cost_micros >= 0 else ""
        return route_event(request, self.rules, self.options, rid, self._models)

    def decide_blocking(self, request: Request) -> RouteDecision:
        """The decision with one blocking ask of at most ``deadline_s`` (``AsyncPolicy``: for sync callers)."""
        request = self._identify(request)
        decision = self._without_lookup(request)
        if decision is not None:
            return decision
        event = self._route_event(request)
        try:
            routed = self._sync_store().ask(event, timeout=self.options.deadline_s)
        except (EngineError, TimeoutError) as exc:
            return self._unavailable(request, exc, event)
        return self._routed(request, routed)

    def _routed(self, request: Request, routed: Routed) -> RouteDecision:
        return _route_decision(request, routed, self.options.strategy)  # type: ignore[arg-type]

    def _unavailable(self, request: Request, exc: BaseException, route: Route | None = None) -> RouteDecision:
        """The engine was too slow or failed: serve the router's own choice, count and log it.

        A ``Route`` that timed out may still be applied later in the session's turn; the reservation it
        would hold is released right behind it (same mailbox, so in order).
        """
        with self._lock:
            self.unavailable_count += 1
        why = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        log.warning("session-engine policy: engine %s for a request; serving the router's choice", why)
        decision = unavailable(request, self.options, why)
        events: list[SessionEvent] = [_decision_event(decision)]
        if route is not None and route.reservation_id:
            events.append(Release(route.session_id, route.reservation_id))
        self._tell(events)
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
                         decision: RouteDecision | None, tokens: tuple[int, int] = (0, 0)) -> list[SessionEvent]:
        if not session_id or not is_valid_session_id(session_id):
            return []
        events: list[SessionEvent] = []
        amount = micros if micros is not None else cost_micros(cost_usd or 0.0)
        rid = decision.reservation_id if decision is not None and decision.session_id == session_id else ""
        if amount or rid:
            p_tokens, c_tokens = (t if type(t) is int and 0 <= t <= MAX_MICROS else 0 for t in tokens)
            events.append(Cost(session_id, amount, rid, p_tokens, c_tokens))
        if deployment and (decision is None or decision.session_id == session_id or decision.kind not in GROUP_KINDS):
            # The pin's deployment, or the deployment pin of a bypass's (model group, tier): one rule
            # (engine.core.affinity.served_record), which the LiteLLM hook records with too.
            record = (served_record(session_id, deployment, None) if decision is None
                      else served_record(session_id, deployment, decision.kind, decision.model, decision.tier))
            if record is not None:
                events.append(record)
        return events

    def _release_events(self, decision: RouteDecision | None) -> list[SessionEvent]:
        if decision is None or not decision.reservation_id or not is_valid_session_id(decision.session_id):
            return []
        return [Release(decision.session_id, decision.reservation_id)]


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
        return self.decide_blocking(request)

    def route(self, request: Request) -> RouteDecision:
        """Decide in the session's turn (its effects applied) and return the decision; raises
        ``BudgetExceeded`` on a refusal."""
        decision = self.decide(request)
        if decision.refused:
            raise decision.budget_error()
        return decision

    def record_response(self, session_id: str, *, cost_usd: float | None = None, micros: int | None = None,
                        deployment: str = "", decision: RouteDecision | None = None, prompt_tokens: int = 0,
                        completion_tokens: int = 0) -> None:
        """After the response: add its cost (USD, or micros) and remember the deployment that served it.

        Pass the request's ``decision``: its budget reservation is settled (the
        actual cost replaces the estimate), and a bypass (a model other than the
        pin served) does not replace the pinned model's deployment: it pins the deployment of its own
        model group and tier, which the next bypass to that model returns to. Token counts,
        when known, are logged with the cost.
        """
        self._tell(self._response_events(session_id, cost_usd, micros, deployment, decision,
                                         (prompt_tokens, completion_tokens)))

    def release(self, decision: RouteDecision | None) -> None:
        """The call failed (no cost): give back the budget the decision reserved."""
        self._tell(self._release_events(decision))

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
        event = self._route_event(request)
        try:
            routed = await self.store.ask(event, timeout=self.options.deadline_s)
        except (EngineError, TimeoutError) as exc:  # asyncio.TimeoutError is TimeoutError
            return self._unavailable(request, exc, event)
        return self._routed(request, routed)

    async def route(self, request: Request) -> RouteDecision:
        decision = await self.decide(request)
        if decision.refused:
            raise decision.budget_error()
        return decision

    async def record_response(self, session_id: str, *, cost_usd: float | None = None, micros: int | None = None,
                              deployment: str = "", decision: RouteDecision | None = None, prompt_tokens: int = 0,
                              completion_tokens: int = 0) -> None:
        """After the response: settle its cost and remember the deployment (see ``Policy.record_response``)."""
        self._tell(self._response_events(session_id, cost_usd, micros, deployment, decision,
                                         (prompt_tokens, completion_tokens)))

    async def release(self, decision: RouteDecision | None) -> None:
        """The call failed (no cost): give back the budget the decision reserved."""
        self._tell(self._release_events(decision))

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
