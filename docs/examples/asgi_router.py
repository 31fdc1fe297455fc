"""An OpenAI-compatible router with session memory, as a small Starlette app.

    POST /v1/chat/completions   route with engine.policy, answer from a fake upstream
    GET  /v1/sessions/{id}      what the engine remembers about a session
    GET  /metrics               Prometheus metrics (engine.metrics)

The router's own choice comes from a toy classifier (or the ``x-router-tier``
header, for demos and tests); ``"model": "auto"`` lets it choose, a model of
the tier table pins that model as the user's explicit choice. The session id
comes from ``x-session-id`` or the identity chain (docs/identity.md), the
decision goes back in ``x-session-*`` response headers, and a budget refusal is
HTTP 429 with an OpenAI-style JSON error. With ``event_log`` set, sessions
survive a restart: the store restores them from the log.

Run it (``pip install 'session-engine[asgi]' uvicorn``)::

    SESSION_LOG=sessions.jsonl uvicorn --factory asgi_router:create_app --app-dir docs/examples
    curl -s localhost:8000/v1/chat/completions -H 'x-session-id: demo' \\
         -d '{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}' -D -
"""

from __future__ import annotations

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
from engine.identity import IdentityResolver, message_text
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


def create_app(config: Config | None = None, *, models: TierModels = MODELS, options: Options | None = None,
               identity: IdentityResolver | None = None, upstream: FakeUpstream | None = None) -> Starlette:
    """Build the app; it owns its store and closes it at shutdown (or on ``app.state.close()``).

    Without a config, ``SESSION_LOG`` names the audit log (durable sessions) when set.
    """
    if config is None:
        config = Config(enabled=True, event_log=os.environ.get("SESSION_LOG") or None)
    options = options or Options(estimator=estimate)
    identity = identity or IdentityResolver(secret=os.environ.get("SESSION_SECRET", ""))
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

    async def chat_completions(request: HttpRequest) -> Response:
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
        tenant = request.headers.get("x-tenant", "")
        session_id, source = identity.resolve(request.headers, body, tenant=tenant)
        routed = Request(model=model, tier=tier, session_id=session_id, messages=messages, tools=tools,
                         user_explicit=explicit, source=source[:64], tenant=tenant,
                         estimate_usd=price(model, prompt_tokens(messages), COMPLETION_TOKENS))
        # One ask: the session's turn decides, applies the pin and reserves the estimate under a cap.
        decision = await policy.decide(routed)
        if decision.kind is Kind.UNAVAILABLE:
            metrics.count_unavailable(decision.reason.rsplit(" ", 1)[-1])
        headers = decision.headers()
        if decision.refused:
            return JSONResponse(decision.budget_error().error_body(decision.reason), status_code=429,
                                headers=headers)
        try:
            reply, cost = await upstream.complete(decision.model, body)
        except Exception:
            await policy.release(decision)  # no answer, no cost: give back the budget the route reserved
            raise
        if decision.session_id:
            await policy.record_response(decision.session_id, cost_usd=cost, decision=decision)
        headers["x-session-cost-usd"] = f"{cost:.6f}"
        return JSONResponse(reply, headers=headers)

    async def session(request: HttpRequest) -> Response:
        entry = await policy.store.get_session(request.path_params["session_id"])
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
