"""An OpenAI-compatible router with session memory, as a small Starlette app.

    POST /v1/chat/completions   route with engine.policy, answer from a fake upstream
    GET  /v1/sessions/{id}      what the engine remembers about one of the caller's sessions
    GET  /metrics               Prometheus metrics (engine.metrics)

Every ``/v1`` request authenticates with ``Authorization: Bearer <key>``
against a configured set of API keys (``api_keys``, or ``SESSION_API_KEYS``
as ``name=key,name=key``); an unknown key is HTTP 401. The caller's tenant is
derived from the principal the key names (``Scope.tenant``, keyed by
``SESSION_ENGINE_SECRET``) and every session id is scoped by it, so two
callers sending the same ``x-session-id`` get two sessions; no request header
can name a tenant. ``scope=False`` turns scoping off for a trusted
single-tenant deployment (docs/identity.md).

The router's own choice comes from a toy classifier (or the ``x-router-tier``
header, for demos and tests); ``"model": "auto"`` lets it choose, a model of
the tier table pins that model as the user's explicit choice. The session id
comes from ``x-session-id`` or the identity chain (docs/identity.md), the
decision goes back in ``x-session-engine-*`` response headers (``RouteDecision.headers``; the deprecated
``x-session-*`` names come with them for this release), and a budget refusal is
HTTP 422 with an OpenAI-style JSON error (the status LiteLLM gives its own budget errors:
the OpenAI SDKs retry 408, 409, 429 and 5xx, so a 429 would be sent three times). With ``event_log`` set, sessions
survive a restart: the store restores them from the log.

Run it (``pip install 'session-engine[asgi]' uvicorn``)::

    export SESSION_ENGINE_SECRET=$(python -c 'import secrets; print(secrets.token_hex(32))')
    SESSION_API_KEYS=demo=sk-demo-1 SESSION_LOG=sessions.jsonl \\
        uvicorn --factory asgi_router:create_app --app-dir docs/examples
    curl -s localhost:8000/v1/chat/completions -H 'authorization: Bearer sk-demo-1' -H 'x-session-id: demo' \\
         -d '{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}' -D -
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine import Config, Tier
from engine.aio import AsyncSessionStore
from engine.identity import SECRET_ENV, IdentityResolver, Scope, message_text, split
from engine.metrics import Metrics
from engine.policy import AsyncPolicy, Kind, Options, Request, TierModels
from engine.store import SessionStore
from events import InvalidEvent, parse_tier

MODELS: dict[Tier, str] = {
    Tier.SIMPLE: "openai/gpt-4o-mini",
    Tier.MEDIUM: "anthropic/claude-haiku-4.5",
    Tier.COMPLEX: "anthropic/claude-sonnet-4.5",
    Tier.REASONING: "openai/o3",
}
#: USD per million (input, output) tokens, for the fake upstream's bill and the budget's estimate.
PRICES: dict[str, tuple[float, float]] = {
    "openai/gpt-4o-mini": (0.15, 0.60),
    "anthropic/claude-haiku-4.5": (1.0, 5.0),
    "anthropic/claude-sonnet-4.5": (3.0, 15.0),
    "openai/o3": (2.0, 8.0),
}
COMPLETION_TOKENS = 50  # the fake upstream always answers with this many tokens
_THANKS = ("thanks", "thank you", "ok", "great", "cool", "perfect")
_REASONING = ("prove", "step by step", "derive", "why exactly")


def prompt_tokens(messages: Sequence[Any]) -> int:
    """A rough token count (4 characters a token), enough for a demo bill."""
    return max(1, sum(len(message_text(m.get("content"))) for m in messages if isinstance(m, Mapping)) // 4)


def price(model: str, tokens_in: int, tokens_out: int) -> float:
    cost_in, cost_out = PRICES.get(model, (1.0, 5.0))
    return (tokens_in * cost_in + tokens_out * cost_out) / 1_000_000


def classify(messages: Sequence[Any], tools: Sequence[Any]) -> Tier:
    """The router's own tier for a request: a toy stand-in for a real classifier."""
    last = ""
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            last = message_text(message.get("content")).strip().lower()
            break
    if tools or len(last) > 2_000:
        return Tier.COMPLEX
    if any(word in last for word in _REASONING):
        return Tier.REASONING
    if len(last) < 40 and last.startswith(_THANKS):
        return Tier.SIMPLE
    return Tier.MEDIUM


def estimate(model: str, request: Request) -> float:
    """``Options.estimator``: what this request would cost on ``model`` (the fake upstream's bill)."""
    return price(model, prompt_tokens(request.messages), COMPLETION_TOKENS)


class FakeUpstream:
    """Stands in for the providers: answers every call, and counts them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def complete(self, model: str, body: Mapping[str, Any]) -> tuple[dict[str, Any], float]:
        self.calls.append(model)
        tokens_in = prompt_tokens(body.get("messages") or ())
        reply = {
            "id": f"chatcmpl-fake-{len(self.calls)}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": f"[{model}] fake answer"}}],
            "usage": {"prompt_tokens": tokens_in, "completion_tokens": COMPLETION_TOKENS,
                      "total_tokens": tokens_in + COMPLETION_TOKENS},
        }
        return reply, price(model, tokens_in, COMPLETION_TOKENS)


def openai_error(status: int, message: str, type_: str, code: str, headers: Mapping[str, str] | None = None,
                 **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code, **extra}},
                        status_code=status, headers=dict(headers or {}))


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_api_keys(text: str) -> dict[str, str]:
    """``name=key,name=key`` (``SESSION_API_KEYS``) as ``{key: name}``."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, key = item.partition("=")
        if not sep or not name.strip() or not key.strip():
            raise InvalidEvent("SESSION_API_KEYS", "must be name=key pairs separated by commas")
        keys[key.strip()] = name.strip()
    return keys


class Authenticator:
    """API keys -> the caller's tenant. Keys are kept as SHA-256 digests and looked up by digest,
    so a lookup's time does not depend on how much of a key matched."""

    def __init__(self, api_keys: Mapping[str, str], scope: Scope | None) -> None:
        if not api_keys:
            raise InvalidEvent("api_keys", "must name at least one key (SESSION_API_KEYS=name=key,...)")
        self._principals = {_key_digest(key): name for key, name in api_keys.items()}
        self._scope = scope

    def tenant(self, request: HttpRequest) -> str | None:
        """The caller's tenant ("" with scoping off); None when the request is not authenticated."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        name = self._principals.get(_key_digest(key.strip())) if scheme.lower() == "bearer" else None
        if name is None:
            return None
        return self._scope.tenant("principal:" + name) if self._scope is not None else ""


def create_app(config: Config | None = None, *, models: TierModels = MODELS, options: Options | None = None,
               identity: IdentityResolver | None = None, upstream: FakeUpstream | None = None,
               api_keys: Mapping[str, str] | None = None, scope: bool = True,
               secret: str | bytes | None = None) -> Starlette:
    """Build the app; it owns its store and closes it at shutdown (or on ``app.state.close()``).

    Without a config, ``SESSION_LOG`` names the audit log (durable sessions) when set.
    ``api_keys``: key -> principal name (default: ``SESSION_API_KEYS``). ``scope``: scope sessions
    by the principal (default), keyed by ``secret`` (default: ``SESSION_ENGINE_SECRET``).
    """
    if config is None:
        config = Config(enabled=True, event_log=os.environ.get("SESSION_LOG") or None)
    if api_keys is None:
        api_keys = parse_api_keys(os.environ.get("SESSION_API_KEYS", ""))
    auth = Authenticator(api_keys, Scope.from_env(secret) if scope else None)
    options = options or Options(estimator=estimate)
    # One operator secret keys the tenants and the fingerprints (docs/identity.md).
    identity = identity or IdentityResolver(secret=secret if secret is not None else os.environ.get(SECRET_ENV, ""))
    upstream = upstream or FakeUpstream()
    metrics = Metrics()
    store = SessionStore(config, observer=metrics)
    # The identity chain runs here, at the HTTP edge, so the policy gets no resolver of its own: an
    # invalid explicit id must give no session, not a fingerprint.
    policy = AsyncPolicy(AsyncSessionStore(store), models, options)
    by_model: dict[str, Tier] = {}  # model -> the tier it is listed under (a user naming it pins that)
    for key, listed in models.items():
        for name in (listed,) if isinstance(listed, str) else listed:
            by_model.setdefault(name, parse_tier(key, "models") or Tier.MEDIUM)

    def unauthorized() -> JSONResponse:
        return openai_error(401, "a valid API key is required (Authorization: Bearer <key>)",
                            "invalid_request_error", "invalid_api_key", {"www-authenticate": "Bearer"})

    async def chat_completions(request: HttpRequest) -> Response:
        tenant = auth.tenant(request)
        if tenant is None:
            return unauthorized()
        try:
            body = await request.json()
        except ValueError:
            return openai_error(400, "request body is not JSON", "invalid_request_error", "invalid_json")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            return openai_error(400, "messages must be a non-empty list", "invalid_request_error", "invalid_messages")
        tools = body.get("tools") or ()
        asked = body.get("model") or "auto"
        forced = request.headers.get("x-router-tier")
        try:
            if asked in by_model:  # the user named a model: an explicit pin
                tier, model, explicit = by_model[asked], asked, True
            elif asked == "auto":
                tier = parse_tier(forced.upper(), "x-router-tier") if forced else classify(messages, tools)
                model, explicit = policy_model(models, tier), False
            else:
                return openai_error(404, f"unknown model {asked[:64]!r}", "invalid_request_error", "model_not_found")
        except InvalidEvent as exc:
            return openai_error(400, str(exc), "invalid_request_error", "invalid_tier")
        session_id, source = identity.resolve(request.headers, body, tenant=tenant)
        routed = Request(model=model, tier=tier, session_id=session_id, messages=messages, tools=tools,
                         user_explicit=explicit, source=source[:64], tenant=tenant,
                         estimate_usd=price(model, prompt_tokens(messages), COMPLETION_TOKENS))
        # One ask: the session's turn decides, applies the pin and reserves the estimate under a cap.
        decision = await policy.decide(routed)
        if decision.kind is Kind.UNAVAILABLE:
            metrics.count_unavailable(decision.reason.rsplit(" ", 1)[-1])
        def reply_headers(cost: float | None = None) -> dict[str, str]:
            headers = decision.headers(cost)
            for name in ("x-session-engine-session-id", "x-session-id"):  # the id and its deprecated alias
                if name in headers:  # the caller's own id, as it sent it: its scope is implied by its key
                    headers[name] = split(headers[name])[1]
            return headers

        headers = reply_headers()
        if decision.refused:
            return JSONResponse(decision.budget_error().error_body(decision.reason), status_code=422,
                                headers={**headers, "x-should-retry": "false"})
        try:
            reply, cost = await upstream.complete(decision.model, body)
        except Exception:
            await policy.release(decision)  # no answer, no cost: give back the budget the route reserved
            raise
        if decision.session_id:
            await policy.record_response(decision.session_id, cost_usd=cost, decision=decision)
        return JSONResponse(reply, headers=reply_headers(cost))  # with the cost and what remains of a budget

    async def session(request: HttpRequest) -> Response:
        tenant = auth.tenant(request)
        if tenant is None:
            return unauthorized()
        # The caller names its own id; the scope makes it the caller's session, never another's.
        session_id, _ = identity.explicit(request.path_params["session_id"], "path", tenant)
        entry = await policy.store.get_session(session_id) if session_id else None
        if entry is None:
            return openai_error(404, "no such session", "invalid_request_error", "session_not_found")
        return JSONResponse({
            "model": entry.model, "tier": entry.tier.value if entry.tier else None,
            "request_count": entry.request_count, "strikes": entry.strikes, "escalated": entry.escalated,
            "user_explicit": entry.user_explicit, "cost_usd": entry.session_cost_micros / 1_000_000,
            "cache_sticky": entry.cache_sticky, "provider": entry.provider,
        })

    async def prometheus(request: HttpRequest) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        store.close()

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/sessions/{session_id}", session, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.store, app.state.policy, app.state.metrics, app.state.upstream = store, policy, metrics, upstream
    app.state.close = store.close
    return app


def policy_model(models: TierModels, tier: Tier) -> str:
    """The tier's default model (the first listed)."""
    value = models.get(tier) or models.get(tier.value)  # type: ignore[call-overload]
    if value is None:
        raise InvalidEvent("x-router-tier", f"no model for tier {tier.value}")
    return value if isinstance(value, str) else value[0]


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(create_app(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
