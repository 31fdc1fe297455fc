"""LiteLLM integration: the routing policy as one ``CustomLogger`` (extra ``session-engine[litellm]``).

``SessionEngineCallback`` brings ``engine.policy`` to LiteLLM wherever it runs:

- ``async_pre_routing_hook`` (``litellm.Router``): rewrites the requested model
  group to the one the policy chose (pin, never-downgrade, SIMPLE bypass,
  three-strike escalation, budget downgrade) and raises ``BudgetExceeded``
  when the budget refuses the request;
- ``async_filter_deployments`` (``Router``, after health filtering): keeps the
  deployment that served the session (or puts it first), so provider caches
  stay warm; when it is gone, another one takes over and a ``switch`` is logged;
  a bypass (SIMPLE follow-up, budget downgrade, strategy none) returns to the
  deployment pinned for its own model group and tier;
  ``async_pre_call_deployment_hook`` remembers the deployment LiteLLM picked;
- ``async_pre_call_hook`` (the LiteLLM proxy server): the same decision, with
  the refusal answered as LiteLLM answers its own budget errors (HTTP 422,
  ``type: budget_exceeded``), which standard clients do not retry;
- ``async_post_call_response_headers_hook`` (the proxy server): the decision as
  ``x-session-engine-*`` response headers;
- ``async_log_success_event`` (every successful call): records
  ``response_cost`` in micros, settling the request's budget reservation,
  unless ``acompletion``/``completion`` already did (once per request);
  ``async_log_failure_event`` releases the reservation of a failed call.

``acompletion``/``completion`` settle the cost from the response before they
return and put the decision in ``response._hidden_params["session_engine"]``.
With no ``Options.estimator``, requests are priced from LiteLLM's own price
map and token counter (``LiteLLMEstimator``).

Routers built on LiteLLM's Rust core (1.9x and later) no longer call a
callback's ``async_pre_routing_hook``: there, send requests through
``callback.acompletion(router, model=..., messages=...)``, which runs the hook
and then ``router.acompletion`` on the chosen group. The hook is idempotent
per request (the decision travels in the request's metadata under
``"session_engine"``), so a Router that does call it never decides twice,
and a LiteLLM fallback to another group is left alone.

The session id comes from ``litellm_session_id``, ``metadata["session_id"]``
(never when the proxy generated them: ``litellm_session_id_generated``),
or the identity chain over the request's headers and body (docs/identity.md),
and is scoped by the caller (``scope``): on the proxy, by the caller's API-key
hash (``"key"``, the default) or team (``"team"``); with the SDK, by
``metadata["tenant"]`` as the application names its caller. Two callers never
share a session; ``scope="off"`` is for trusted single-tenant deployments.
The policy's tier table names LiteLLM *model groups*; name groups
``provider/model`` for cache stickiness to prefer a provider.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from litellm.integrations.custom_logger import CustomLogger
from litellm.types.router import PreRoutingHookResponse

from engine.aio import AsyncSessionStore
from engine.core.affinity import SWITCHED, place, served_record, switches
from engine.core.config import Config
from engine.core.headers import PREFIX
from engine.core.headers import decision_headers as _decision_headers
from engine.identity import DEFAULT_ORDER, FINGERPRINT, IdentityResolver, Scope
from engine.policy import AsyncPolicy, BudgetExceeded, Kind, Options, Request, RouteDecision, TierModels, cost_micros
from engine.store import SessionStore
from events import (
    Cost,
    Decision,
    InvalidEvent,
    Release,
    SessionEvent,
    Tier,
    parse_tier,
    tier_rank,
)
from events._validate import MAX_MICROS

__all__ = [
    "DECISION_KEY", "HIDDEN_KEY", "LiteLLMEstimator", "SessionEngineCallback", "decision_headers", "deployment_id",
]

log = logging.getLogger("engine.integrations.litellm")

#: Metadata key under which the decision travels with the request (read by the later hooks).
DECISION_KEY = "session_engine"
#: "only": keep just the session's deployment while it is healthy (LiteLLM's shuffle strategies do
#: not honour order, so this is what makes affinity real); "first": put it first; "off".
AFFINITY_MODES = ("only", "first", "off")
#: Proxy call types whose body is a chat conversation.
CHAT_CALL_TYPES = frozenset({"completion", "acompletion", "text_completion", "anthropic_messages"})
_METADATA_KEYS = ("metadata", "litellm_metadata")
#: LiteLLM's ``SESSION_ID_GENERATED_METADATA_KEY``: the proxy made the session id up (never pinned).
GENERATED_KEY = "litellm_session_id_generated"
#: Decisions after which the request is served by the session's pin (a bypass or a refusal is not).
_PINNING = frozenset({Kind.INITIALIZE, Kind.RETAIN, Kind.UPGRADE, Kind.ESCALATE, Kind.SWITCH})
_RETAINED = frozenset({Kind.RETAIN, Kind.SWITCH})
#: Decisions served without moving the pin (SIMPLE bypass, budget downgrade, strategy none): their
#: deployment pin is the one of their own model group and tier.
_BYPASSED = frozenset({Kind.BYPASS})
_TIER_VALUES = frozenset(t.value for t in Tier)
#: What a session is scoped by: the caller's API-key hash, its team (else its key), or nothing.
SCOPES = ("key", "team", "off")


#: Output tokens an estimate assumes when the request sets no ``max_tokens`` (docs/integration.md).
DEFAULT_OUTPUT_TOKENS = 1024
#: Key of the decision in an SDK response's ``_hidden_params``.
HIDDEN_KEY = "session_engine"
#: Request ids remembered as settled, so each request's cost counts once (oldest forgotten first).
_SETTLED_MEMORY = 10_000


class LiteLLMEstimator:
    """``Options.estimator`` from LiteLLM's own price map and token counter.

    A request costs ``prompt tokens x input price + output allowance x output price``, the
    allowance being the request's ``max_tokens`` or ``DEFAULT_OUTPUT_TOKENS``. A model group's
    prices are those of its most expensive deployment (``input_cost_per_token`` /
    ``output_cost_per_token`` in its ``litellm_params``, else LiteLLM's price map for its model),
    looked up in the Router the hook last served, else the price map under the group's name. An
    unpriced model is estimated at the request's ``estimate_usd``.
    """

    def __init__(self, hook: SessionEngineCallback, default_output_tokens: int = DEFAULT_OUTPUT_TOKENS) -> None:
        self._hook = hook
        self.default_output_tokens = default_output_tokens
        self._tokens: tuple[int, int] = (0, 0)  # (id of the request counted last, its prompt tokens)

    def __call__(self, model: str, request: Request) -> float:
        prices = self._prices(model)
        if prices is None:
            return float(request.estimate_usd)
        return self.prompt_tokens(model, request) * prices[0] + self._output(request) * prices[1]

    def _output(self, request: Request) -> int:
        return request.max_tokens if request.max_tokens else self.default_output_tokens

    def prompt_tokens(self, model: str, request: Request) -> int:
        # The policy prices one request for every model of its table in a row: count it once.
        if self._tokens[0] == id(request):
            return self._tokens[1]
        import litellm

        try:
            count = int(litellm.token_counter(model=model, messages=list(request.messages)))
        except Exception:  # an unknown tokenizer or odd content: bytes / 4, as LiteLLM's fallback does
            count = sum(len(str(m).encode("utf-8", "surrogatepass")) for m in request.messages) // 4
        self._tokens = (id(request), count)
        return count

    def _prices(self, group: str) -> tuple[float, float] | None:
        import litellm

        best: tuple[float, float] | None = None
        router = self._hook._router
        deployments: Sequence[Any] = ()
        if router is not None:
            try:  # LiteLLM 1.9x: the registry; before it, the model_list attribute
                registry = getattr(router, "registry", None)
                deployments = (registry().deployments(group) if callable(registry)
                               else [d for d in router.model_list if d.get("model_name") == group])
            except Exception:
                deployments = ()
        deployments = [d for d in deployments if isinstance(d, Mapping)]
        for deployment in deployments:
            params = deployment.get("litellm_params") or {}
            found = _price_of(params, litellm.model_cost.get(params.get("model")) or
                              litellm.model_cost.get(str(params.get("model", "")).split("/", 1)[-1]))
            if found is not None and (best is None or sum(found) > sum(best)):
                best = found
        if best is None:
            best = _price_of({}, litellm.model_cost.get(group))
        return best


def _price_of(params: Mapping[str, Any], entry: Mapping[str, Any] | None) -> tuple[float, float] | None:
    entry = entry or {}
    prices = []
    for key in ("input_cost_per_token", "output_cost_per_token"):
        value = params.get(key, entry.get(key))
        prices.append(value if type(value) in (int, float) and value >= 0 else None)
    if prices[0] is None and prices[1] is None:
        return None
    return float(prices[0] or 0.0), float(prices[1] or 0.0)


def _metadata(kwargs: Mapping[str, Any] | None, create: bool = False) -> dict[str, Any]:
    """The request's metadata dict (LiteLLM uses ``metadata`` or ``litellm_metadata``)."""
    if not isinstance(kwargs, Mapping):
        return {}
    for key in _METADATA_KEYS:
        value = kwargs.get(key)
        if isinstance(value, dict):
            return value
    if create and isinstance(kwargs, dict):
        kwargs["metadata"] = {}
        return kwargs["metadata"]
    return {}


def _headers(kwargs: Mapping[str, Any], metadata: Mapping[str, Any]) -> Any:
    """Request headers where the proxy leaves them (none for SDK calls)."""
    server = kwargs.get("proxy_server_request")
    if isinstance(server, Mapping) and server.get("headers"):
        return server["headers"]
    return metadata.get("headers") or None


def _generated(kwargs: Mapping[str, Any]) -> bool:
    """The LiteLLM proxy generated this request's ``litellm_session_id`` (``general_settings:
    missing_session_id: generate`` marks it ``litellm_session_id_generated``): a fresh id per request."""
    return any(isinstance(kwargs.get(key), Mapping) and kwargs[key].get(GENERATED_KEY) is True
               for key in _METADATA_KEYS)


def deployment_id(deployment: Mapping[str, Any]) -> str:
    """A Router deployment's identity: its provider model plus LiteLLM's id (a hash of its params).

    The id changes with the API key or base URL, so affinity is per key, as
    provider prefix caches are; the key itself never appears.
    """
    params = deployment.get("litellm_params") or {}
    info = deployment.get("model_info") or {}
    return _compose(params.get("model"), info.get("id"))


def _model_id(deployment: Mapping[str, Any]) -> str:
    info = deployment.get("model_info") if isinstance(deployment, Mapping) else None
    ident = info.get("id") if isinstance(info, Mapping) else None
    return ident if isinstance(ident, str) else ""


def failed_in_request(request_kwargs: Mapping[str, Any] | None, stashed: Mapping[str, Any],
                      deployments: Sequence[Any]) -> frozenset[str]:
    """The deployments (``deployment_id``) that already failed this request: those its earlier attempts
    went to (``async_pre_call_deployment_hook`` lists them in the decision; a request back in the filter
    did not succeed on them), plus the LiteLLM ids its retry loop or a failover hop names
    (``_retry_skipped_deployment_ids``, ``_excluded_deployment_ids``: LiteLLM's
    ``deployment_ids_failed_in_request``). Empty on a first attempt."""
    out = {t for t in stashed.get("tried") or () if isinstance(t, str)}
    litellm_ids: set[str] = set()
    if isinstance(request_kwargs, Mapping):
        for key in ("_retry_skipped_deployment_ids", "_excluded_deployment_ids"):
            value = request_kwargs.get(key)
            if isinstance(value, (list, tuple, set, frozenset)):
                litellm_ids.update(v for v in value if isinstance(v, str))
    if litellm_ids:
        out.update(deployment_id(d) for d in deployments if isinstance(d, Mapping) and _model_id(d) in litellm_ids)
    return frozenset(out)


def _compose(model: Any, ident: Any) -> str:
    if not isinstance(model, str) or not model:
        return ""
    return f"{model}#{ident[:12]}" if isinstance(ident, str) and ident else model


def tiers_of(models: TierModels) -> dict[str, Tier]:
    """Invert the policy's tier table: model group -> the lowest tier that lists it."""
    out: dict[str, Tier] = {}
    for key, value in models.items():
        tier = parse_tier(key, "models")
        for group in (value,) if isinstance(value, str) else tuple(value):
            if tier is not None and (group not in out or tier_rank(tier) < tier_rank(out[group])):
                out[group] = tier
    return out


#: Prefix of the response headers that carry the decision on the proxy (``engine.core.headers``).
HEADER_PREFIX = PREFIX
#: LiteLLM's own budget errors answer 422 (``litellm.budget_exceeded_status_code``, 1.110); the
#: OpenAI SDKs retry 408, 409, 429 and 5xx, so a refusal must not be a 429.
_BUDGET_STATUS = 422


def budget_status_code() -> int:
    """The HTTP status LiteLLM gives its own budget errors (an operator may change it), else 422."""
    import litellm

    status = getattr(litellm, "budget_exceeded_status_code", _BUDGET_STATUS)
    return status if type(status) is int and 400 <= status <= 599 else _BUDGET_STATUS


def budget_http_error(exc: BudgetExceeded) -> Exception:
    """The refusal as the proxy answers it: LiteLLM's own budget error, ``ProxyException`` with
    ``type: budget_exceeded`` and ``budget_status_code()`` (422), the session's figures in
    ``provider_specific_fields`` and ``x-should-retry: false`` for clients that honour it."""
    body = exc.error_body()["error"]
    status = budget_status_code()
    try:
        from litellm.proxy._types import ProxyException
    except ImportError:  # the proxy always has it; a bare SDK install may miss its dependencies
        exc.status_code = status  # type: ignore[attr-defined]
        return exc
    details = {k: v for k, v in body.items() if k not in ("message", "type")}
    return ProxyException(message=body["message"], type=body["type"], param=None, code=status,
                          provider_specific_fields=details, headers={"x-should-retry": "false"})


def decision_headers(stashed: Mapping[str, Any], cost_usd: float | None = None, strategy: str = "") -> dict[str, str]:
    """A stashed decision as ``x-session-engine-*`` headers, in the one format ``RouteDecision.headers``
    writes too (``engine.core.headers.decision_headers``): decision kind, served model group and tier, reason,
    strategy, the session id's source, the response's cost and, when a budget applies, what remains of it
    after this call (limit - spent before it - its cost, negative when a graceful budget was overrun). The
    session id itself is not echoed."""
    def text(key: str) -> str:
        value = stashed.get(key)
        return value if isinstance(value, str) else ""

    limit, spent = stashed.get("limit_usd"), stashed.get("spent_usd")
    return _decision_headers(text("kind"), text("model"), text("tier"), text("source"), reason=text("reason"),
                             strategy=strategy, limit_usd=limit if type(limit) in (int, float) else None,
                             spent_usd=spent if type(spent) in (int, float) else None, cost_usd=cost_usd)


def _response_cost(response: Any) -> float | None:
    hidden = getattr(response, "_hidden_params", None)
    cost = hidden.get("response_cost") if isinstance(hidden, Mapping) else None
    return float(cost) if type(cost) in (int, float) else None


#: LiteLLM's process-wide callback lists a registered hook may have been copied into.
_CALLBACK_LISTS = ("callbacks", "input_callback", "_async_input_callback", "success_callback", "failure_callback",
                   "_async_success_callback", "_async_failure_callback", "service_callback")


def unregister(hook: CustomLogger) -> None:
    """Remove ``hook`` (and its bound methods) from every LiteLLM callback list, under LiteLLM's own
    lock for those lists where it has one."""
    import contextlib

    import litellm

    manager = getattr(litellm, "logging_callback_manager", None)
    with getattr(manager, "callback_lists_lock", None) or contextlib.nullcontext():
        for name in _CALLBACK_LISTS:
            callbacks = getattr(litellm, name, None)
            if isinstance(callbacks, list):
                callbacks[:] = [c for c in callbacks if c is not hook and getattr(c, "__self__", None) is not hook]


class SessionEngineCallback(CustomLogger):
    """The routing policy for LiteLLM; register it in ``litellm.callbacks``.

    ``policy``: an ``AsyncPolicy`` whose tier table names model groups.
    ``tiers``: model group -> the tier the router means by asking for it
    (default: inverted from the policy's table); a request may say its own
    with ``metadata["tier"]``. ``identity``: the chain for requests without an
    explicit id (default: the policy's resolver, else explicit sources only,
    no fingerprint). ``affinity``: one of ``AFFINITY_MODES``.
    ``scope``: one of ``SCOPES`` (docs/identity.md); unless ``"off"``, ``secret``
    (default: the ``SESSION_ENGINE_SECRET`` environment variable) keys the
    tenants, and a missing or weak one is refused (``InvalidEvent``).
    """

    def __init__(self, policy: AsyncPolicy, *, tiers: Mapping[str, Tier | str] | None = None,
                 identity: IdentityResolver | None = None, affinity: str = "only", scope: str = "key",
                 secret: str | bytes | None = None) -> None:
        super().__init__()
        if not isinstance(policy, AsyncPolicy):
            raise InvalidEvent("policy", f"must be an engine.policy.AsyncPolicy, got {type(policy).__name__}")
        if affinity not in AFFINITY_MODES:
            raise InvalidEvent("affinity", "must be one of only, first, off")
        self.policy = policy
        self.tiers: dict[str, Tier] = (
            tiers_of(policy.models) if tiers is None
            else {group: tier for group, value in tiers.items() if (tier := parse_tier(value, "tiers")) is not None})
        if identity is None:
            identity = policy.identity or IdentityResolver(tuple(s for s in DEFAULT_ORDER if s != FINGERPRINT))
        self.identity = identity
        self.affinity = affinity
        #: Unique per instance. LiteLLM de-duplicates callbacks by class name plus public str/int/bool
        #: attributes: without it a second hook would be taken for the first and never called.
        self.instance_id = uuid.uuid4().hex
        self._owned: SessionStore | None = None
        if scope not in SCOPES:
            raise InvalidEvent("scope", "must be one of key, team, off")
        self.scope = scope
        self._scope = None if scope == "off" else Scope.from_env(secret)
        self._init_call_path()

    @classmethod
    def create(cls, models: TierModels, config: Config | None = None, options: Options | None = None, *,
               identity: IdentityResolver | None = None, observer: Any = None,
               affinity: str = "only", scope: str = "key", secret: str | bytes | None = None) -> SessionEngineCallback:
        """A callback with its own store (enabled by default); ``close()`` stops it."""
        store = SessionStore(config or Config(enabled=True), observer=observer)
        try:
            # The callback runs the identity chain itself; the policy gets no resolver so that an invalid
            # explicit id gives no session rather than a fingerprint.
            hook = cls(AsyncPolicy(AsyncSessionStore(store), models, options), identity=identity,
                       affinity=affinity, scope=scope, secret=secret)
        except BaseException:
            store.close()
            raise
        hook._owned = store
        return hook

    def close(self) -> None:
        """Unregister from LiteLLM's callback lists, then stop the store this callback created (a store
        passed in is the caller's to close). A hook created afterwards starts with clean lists."""
        unregister(self)
        if self._owned is not None:
            self._owned.close()

    def _own_stash(self, kwargs: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """This hook's decision stashed in the request; None when there is none or another hook made it
        (each hook keeps its own books when several share a process)."""
        stashed = _metadata(kwargs).get(DECISION_KEY)
        return stashed if isinstance(stashed, Mapping) and stashed.get("hook") == self.instance_id else None

    def _init_call_path(self) -> None:
        """The SDK call path's own state: the settled-request memory and the default estimator."""
        self._router: Any = None  # the Router acompletion/completion last served (for prices)
        self._settled: OrderedDict[str, None] = OrderedDict()
        self._settled_lock = threading.Lock()
        if self.policy.options.estimator is None:
            # Graceful budgets need a per-model price: LiteLLM's own, by default.
            self.policy.options = replace(self.policy.options, estimator=LiteLLMEstimator(self))

    # -- reading a request --------------------------------------------------------------
    def tenant(self, identity: str) -> str:
        """The tenant of a caller identity ("" with ``scope="off"`` or no identity)."""
        return self._scope.tenant(identity) if self._scope is not None and identity else ""

    def proxy_tenant(self, user_api_key_dict: Any) -> str:
        """The tenant of an authenticated proxy caller: its key hash (``api_key``, which LiteLLM hashes),
        or its team with ``scope="team"`` (a caller without a team is scoped by its key)."""
        team = _text(getattr(user_api_key_dict, "team_id", None)) if self.scope == "team" else ""
        if team:
            return self.tenant("team:" + team)
        key = _text(getattr(user_api_key_dict, "api_key", None)) or _text(getattr(user_api_key_dict, "token", None))
        return self.tenant("key:" + key) if key else ""

    def request_tenant(self, kwargs: Mapping[str, Any]) -> str:
        """The tenant of an SDK or Router request: the key hash the LiteLLM proxy put in its metadata
        when it came through the proxy, else ``metadata["tenant"]`` (the application's name for its
        caller, in a namespace of its own so that it can never name a key's scope)."""
        metadata = _metadata(kwargs)
        if self.scope == "team" and _text(metadata.get("user_api_key_team_id")):
            return self.tenant("team:" + metadata["user_api_key_team_id"])
        if _text(metadata.get("user_api_key_hash")):
            return self.tenant("key:" + metadata["user_api_key_hash"])
        return self.tenant("app:" + metadata["tenant"]) if _text(metadata.get("tenant")) else ""

    def session_of(self, kwargs: Mapping[str, Any], messages: Any = None,
                   tenant: str | None = None) -> tuple[str, str]:
        """``(session_id, source)`` of a request's kwargs: the decision's, or explicit, or the identity
        chain, scoped by ``tenant`` (default: ``request_tenant``)."""
        metadata = _metadata(kwargs)
        stashed = metadata.get(DECISION_KEY)
        if isinstance(stashed, Mapping) and stashed.get("hook") != self.instance_id:
            return "", ""  # another hook's request: its session is in that hook's store
        if isinstance(stashed, Mapping) and isinstance(stashed.get("session_id"), str):
            return stashed["session_id"], stashed.get("source", "")
        if tenant is None:
            tenant = self.request_tenant(kwargs)
        if not _generated(kwargs):  # an id the proxy made up for this one request names no session
            for source, value in (("litellm_session_id", kwargs.get("litellm_session_id")),
                                  ("metadata.session_id", metadata.get("session_id"))):
                if isinstance(value, str) and value:
                    return self.identity.explicit(value, source, tenant)
        body = {k: kwargs[k] for k in ("user", "prompt_cache_key", "system") if k in kwargs}
        if isinstance(metadata.get("user_id"), str):
            body["metadata"] = {"user_id": metadata["user_id"]}
        if messages is not None:
            body["messages"] = messages
        return self.identity.resolve(_headers(kwargs, metadata), body, tenant=tenant)

    def _request(self, model: str, kwargs: Mapping[str, Any], messages: Any, tenant: str | None) -> Request | None:
        metadata = _metadata(kwargs)
        if tenant is None:
            tenant = self.request_tenant(kwargs)
        sid, source = self.session_of(kwargs, messages, tenant)
        estimate = metadata.get("estimate_usd", 0.0)
        try:
            return Request(
                model=model, tier=metadata.get("tier") or self.tiers.get(model), session_id=sid,
                messages=messages if isinstance(messages, Sequence) and not isinstance(messages, str) else (),
                tools=kwargs.get("tools") or (), user_explicit=metadata.get("user_explicit") is True,
                estimate_usd=estimate if type(estimate) in (int, float) else 0.0, source=source[:64], tenant=tenant,
                max_tokens=_max_tokens(kwargs))
        except InvalidEvent as exc:
            # A malformed hint from the caller must not fail the request: LiteLLM routes it as asked.
            log.warning("session-engine litellm: request not routed by the policy (%s: %s)", exc.field, exc.rule)
            return None

    async def decide(self, model: str, kwargs: dict[str, Any], messages: Any = None,
                     tenant: str | None = None) -> RouteDecision | None:
        """Decide once per request and stash the decision in its metadata; raises ``BudgetExceeded``.

        ``tenant``: the authenticated caller's (``proxy_tenant``); None reads it from the request
        (``request_tenant``).

        None when the request is not the policy's to route: a re-entry for a
        request already decided (retry, fallback), or a malformed hint.
        """
        prepared = self._prepare(model, kwargs, messages, tenant)
        if prepared is None:
            return None
        return self._stash(prepared[0], model, await self.policy.decide(prepared[1]))

    def decide_sync(self, model: str, kwargs: dict[str, Any], messages: Any = None,
                    tenant: str = "") -> RouteDecision | None:
        """``decide`` for synchronous callers (``Router.completion``): the same decision, blocking for
        at most the policy's deadline."""
        prepared = self._prepare(model, kwargs, messages, tenant)
        if prepared is None:
            return None
        return self._stash(prepared[0], model, self.policy.decide_blocking(prepared[1]))

    def _prepare(self, model: str, kwargs: dict[str, Any], messages: Any,
                 tenant: str) -> tuple[dict[str, Any], Request] | None:
        metadata = _metadata(kwargs, create=True)
        if isinstance(metadata.get(DECISION_KEY), Mapping):
            return None
        request = self._request(model, kwargs, messages, tenant)
        return None if request is None else (metadata, request)

    def _stash(self, metadata: dict[str, Any], model: str, decision: RouteDecision) -> RouteDecision:
        metadata[DECISION_KEY] = {
            "requested": model, "model": decision.model, "kind": decision.kind.value,
            "tier": decision.tier.value if decision.tier else None, "reason": decision.reason,
            "session_id": decision.session_id, "source": decision.source, "hook": self.instance_id,
            # Settlement key: each request's cost is counted once, by the hook or the success callback.
            "request_id": decision.reservation_id or uuid.uuid4().hex,
            "reservation_id": decision.reservation_id, "estimate_usd": decision.estimate_usd,
            "spent_usd": decision.spent_usd, "limit_usd": decision.limit_usd,
            # Affinity reads it in async_filter_deployments: no second ask per request.
            "served_deployment": decision.served_deployment,
        }
        if decision.refused:
            raise decision.budget_error()
        return decision

    def _target(self, model: str, kwargs: Mapping[str, Any]) -> str | None:
        """The group the stashed decision sends ``model`` to; None: leave it (a fallback, or unchanged)."""
        stashed = self._own_stash(kwargs)
        if stashed is None or stashed.get("requested") != model:
            return None
        target = stashed.get("model")
        return target if isinstance(target, str) and target and target != model else None

    # -- litellm.Router -----------------------------------------------------------------
    async def async_pre_routing_hook(self, model: str, request_kwargs: dict,
                                     messages: list[dict[str, object]] | None = None,
                                     input: str | list | None = None, specific_deployment: bool | None = False,
                                     **_: Any) -> PreRoutingHookResponse | None:
        """Rewrite the model group per the policy; raises ``BudgetExceeded`` when refused."""
        if specific_deployment:
            return None  # the caller named one deployment: nothing to route
        await self.decide(model, request_kwargs, messages)
        target = self._target(model, request_kwargs)
        return PreRoutingHookResponse(model=target, messages=messages) if target else None

    async def acompletion(self, router: Any, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """``router.acompletion`` with the policy applied first: the entry point for Routers that do
        not call a callback's pre-routing hook. Raises ``BudgetExceeded`` when refused.

        The response's cost is settled before this returns (from its ``response_cost``), and the
        decision is in ``response._hidden_params["session_engine"]``; a failed call releases the
        budget the decision reserved.
        """
        self._router = router
        kwargs["metadata"] = dict(kwargs.get("metadata") or {})
        request_kwargs = {**kwargs, "model": model, "messages": messages}  # shares the metadata dict
        routed = await self.async_pre_routing_hook(model, request_kwargs, messages)
        try:
            response = await router.acompletion(model=routed.model if routed else model, messages=messages,
                                                **kwargs)
        except BaseException:
            self._release(kwargs["metadata"])
            raise
        return self._settle_response(kwargs["metadata"], response)

    def completion(self, router: Any, model: str, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        """``router.completion`` (synchronous) with the same semantics as ``acompletion``."""
        self._router = router
        kwargs["metadata"] = dict(kwargs.get("metadata") or {})
        request_kwargs = {**kwargs, "model": model, "messages": messages}
        self.decide_sync(model, request_kwargs, messages)
        target = self._target(model, request_kwargs)
        try:
            response = router.completion(model=target or model, messages=messages, **kwargs)
        except BaseException:
            self._release(kwargs["metadata"])
            raise
        return self._settle_response(kwargs["metadata"], response)

    # -- settlement ---------------------------------------------------------------------
    def _first_settlement(self, request_id: str) -> bool:
        """True exactly once per request id (the hook and the success callback both try)."""
        with self._settled_lock:
            if request_id in self._settled:
                return False
            self._settled[request_id] = None
            if len(self._settled) > _SETTLED_MEMORY:
                self._settled.popitem(last=False)
            return True

    def _settle(self, stashed: Mapping[str, Any], sid: str, cost: Any, response: Any = None) -> None:
        """Count a request's cost once: settle its reservation with the actual cost (or add it), with the
        response's token counts."""
        request_id = stashed.get("request_id") if isinstance(stashed, Mapping) else None
        if isinstance(request_id, str) and request_id and not self._first_settlement(request_id):
            return
        micros = min(cost_micros(float(cost)), MAX_MICROS) if type(cost) in (int, float) else 0
        rid = stashed.get("reservation_id", "") if isinstance(stashed, Mapping) else ""
        rid = rid if isinstance(rid, str) else ""
        if sid and (micros or rid):
            self._tell(Cost(sid, micros, rid, *_usage(response)))

    def _settle_response(self, metadata: Mapping[str, Any], response: Any) -> Any:
        stashed = metadata.get(DECISION_KEY)
        if not isinstance(stashed, Mapping) or stashed.get("hook") != self.instance_id:
            return response
        hidden = getattr(response, "_hidden_params", None)
        if isinstance(hidden, dict):
            hidden[HIDDEN_KEY] = {k: v for k, v in stashed.items() if k != "request_id"}
            cost = hidden.get("response_cost")
            if cost is not None:
                self._settle(stashed, stashed.get("session_id") or "", cost, response)
        return response

    def _release(self, metadata: Mapping[str, Any]) -> None:
        stashed = metadata.get(DECISION_KEY)
        if (not isinstance(stashed, Mapping) or stashed.get("hook") != self.instance_id
                or not stashed.get("reservation_id") or not stashed.get("session_id")):
            return  # no reservation, or another hook's
        # Not marked settled: a retry or fallback that then succeeds still counts its cost (the
        # reservation is gone, so the cost is added); a second release finds nothing to release.
        self._tell(Release(stashed["session_id"], stashed["reservation_id"]))

    def _pinned(self, model: str, kwargs: Mapping[str, Any] | None, kinds: frozenset[str]) -> str:
        """The session id when this request is served by its session's pinned group with a decision
        of one of ``kinds``; "" otherwise (a bypass, a fallback group, no decision)."""
        stashed = self._own_stash(kwargs)
        if (stashed is None or stashed.get("kind") not in kinds
                or stashed.get("model") != model or not isinstance(stashed.get("session_id"), str)):
            return ""
        return stashed["session_id"]

    async def async_filter_deployments(self, model: str, healthy_deployments: list, messages: list | None,
                                       request_kwargs: dict | None = None,
                                       parent_otel_span: Any = None) -> list[dict]:
        """Apply the routing turn's affinity to the healthy deployments: keep (or put first) the one the
        session recorded serving this decision (``RouteDecision.served_deployment``), placed by the core's
        own ``engine.core.affinity.place``; log a switch when it is gone."""
        if self.affinity == "off" or not healthy_deployments:
            return healthy_deployments
        # A retained pin returns to the deployment of its group; a bypass (SIMPLE follow-up, budget
        # downgrade, strategy none) to the one pinned for its own model group and tier.
        sid = self._pinned(model, request_kwargs, _RETAINED | _BYPASSED)
        if not sid:
            return healthy_deployments
        stashed = _metadata(request_kwargs)[DECISION_KEY]
        served = stashed.get("served_deployment")
        if not isinstance(served, str) or not served:
            return healthy_deployments
        ids = [deployment_id(d) for d in healthy_deployments]
        failed = failed_in_request(request_kwargs, stashed, healthy_deployments)
        if failed:
            # A retry of this request: the deployments that already failed it are not tried again (as
            # LiteLLM's own affinity checks do), so a pinned deployment answering 500 fails over at once.
            kept = [(i, d) for i, d in zip(ids, healthy_deployments, strict=True) if i not in failed]
            if kept:
                ids, healthy_deployments = [i for i, _ in kept], [d for _, d in kept]
        first, order, gone = place(served, tuple(ids))
        if not gone:
            if self.affinity == "only":
                return [healthy_deployments[ids.index(first)]]
            return [healthy_deployments[ids.index(i)] for i in order]
        # Gone: LiteLLM picks another (the pre-call hook records it); a retained pin logs the switch, once
        # per request however many retries follow (its stashed kind is then "switch").
        if switches(stashed.get("kind"), gone):
            stashed["switched"], stashed["kind"] = served, Kind.SWITCH.value
            why = ("failed in this request; retried on another" if served in failed
                   else "is not a healthy candidate; LiteLLM picks another")
            self._tell(Decision(sid, Kind.SWITCH.value, model=model[:256],
                                reason=f"{SWITCHED}: the deployment that served the session {why}",
                                deployment=served[:256]))
        return healthy_deployments

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, object], call_type: Any) -> dict | None:
        """Remember the deployment LiteLLM picked for the decided group, before the call, so that the
        session's next request (often sent before this one's success is logged) returns to it: the pin's
        deployment or the bypass's group pin, as ``engine.core.affinity.served_record`` records either."""
        metadata = _metadata(kwargs)
        group = metadata.get("model_group")
        if not isinstance(group, str):
            return None
        info = metadata.get("model_info") or kwargs.get("model_info")
        deployment = _compose(metadata.get("deployment"), info.get("id") if isinstance(info, Mapping) else None)
        stashed = metadata.get(DECISION_KEY)
        if isinstance(stashed, dict) and deployment:
            # The attempts of this request, in order: a retry that comes back to the filter failed on them.
            tried = stashed.setdefault("tried", [])
            if deployment not in tried:
                tried.append(deployment[:256])
        sid = self._pinned(group, kwargs, _PINNING | _BYPASSED)
        if sid and deployment:
            tier = stashed.get("tier") if isinstance(stashed, dict) else None
            record = served_record(sid, deployment, stashed.get("kind") if isinstance(stashed, dict) else "",
                                   group, tier if tier in _TIER_VALUES else None)
            if record is not None:
                self._tell(record)
        return None

    # -- the LiteLLM proxy server -------------------------------------------------------
    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict,
                                  call_type: str) -> dict | Exception | str | None:
        """The proxy's hook: route ``data["model"]`` per the policy; a refusal becomes LiteLLM's budget
        error (``budget_http_error``: HTTP 422, not retried)."""
        model = data.get("model")
        if call_type not in CHAT_CALL_TYPES or not isinstance(model, str) or not model:
            return data
        # The caller is the proxy's authenticated key, never anything the request body says.
        tenant = self.proxy_tenant(user_api_key_dict)
        try:
            await self.decide(model, data, data.get("messages"), tenant=tenant)
        except BudgetExceeded as exc:
            raise budget_http_error(exc) from exc
        target = self._target(model, data)
        if target:
            data["model"] = target
        return data

    async def async_post_call_response_headers_hook(self, data: dict, user_api_key_dict: Any, response: Any,
                                                    request_headers: dict[str, str] | None = None,
                                                    litellm_call_info: dict[str, object] | None = None,
                                                    ) -> dict[str, str] | None:
        """The proxy's response headers (success and refusal): this hook's decision as
        ``x-session-engine-*`` (``decision_headers``); None for requests it did not decide."""
        stashed = self._own_stash(data)
        if stashed is None:
            return None
        return decision_headers(stashed, _response_cost(response), self.policy.options.strategy.value)

    # -- outcomes -------------------------------------------------------------------------
    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any,
                                      end_time: Any) -> None:
        """Record the call's ``response_cost`` (USD) in micros, unless the hook already settled it."""
        try:
            params = kwargs.get("litellm_params") or {}
            source = params if _metadata(params) else kwargs
            sid, _ = self.session_of({**source, "litellm_session_id": params.get("litellm_session_id")
                                      or kwargs.get("litellm_session_id")})
            if not sid:
                return
            stashed = _metadata(source).get(DECISION_KEY)
            if not isinstance(stashed, Mapping):  # not decided here: key it by LiteLLM's call id
                stashed = {"request_id": kwargs.get("litellm_call_id") or ""}
            self._settle(stashed, sid, kwargs.get("response_cost"), response_obj)
        except Exception as exc:  # logging must never break LiteLLM's call path
            log.warning("session-engine litellm: outcome not recorded (%s)", type(exc).__name__)

    async def async_log_failure_event(self, kwargs: dict, response_obj: Any, start_time: Any,
                                      end_time: Any) -> None:
        """A failed call (the proxy's path; the SDK path releases in ``acompletion``): give back the
        budget its decision reserved, once."""
        try:
            params = kwargs.get("litellm_params") or {}
            self._release(_metadata(params) or _metadata(kwargs))
        except Exception as exc:  # logging must never break LiteLLM's call path
            log.warning("session-engine litellm: reservation not released (%s)", type(exc).__name__)

    def _tell(self, event: SessionEvent) -> None:
        self.policy._tell([event])  # the policy's own path: a closed store is logged, never raised


def _usage(response: Any) -> tuple[int, int]:
    """(prompt, completion) tokens of a LiteLLM response's ``usage``; 0 for what it does not say."""
    usage = getattr(response, "usage", None)
    out = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(usage, name, None) if usage is not None else None
        out.append(value if type(value) is int and 0 <= value <= MAX_MICROS else 0)
    return out[0], out[1]


def _max_tokens(kwargs: Mapping[str, Any]) -> int:
    for key in ("max_tokens", "max_completion_tokens"):
        value = kwargs.get(key)
        if type(value) is int and value > 0:
            return value
    return 0


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
