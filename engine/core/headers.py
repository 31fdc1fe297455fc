"""A routing decision as HTTP response headers: one format, ``x-session-engine-*``, for every surface.

``RouteDecision.headers`` (an application's own HTTP front, docs/examples/asgi_router.py) and the LiteLLM
hook's ``decision_headers`` (the proxy's response headers) both call ``decision_headers`` here; each passes
what it knows. Pure (the standard library only).

| header | value |
|---|---|
| ``x-session-engine-decision`` | the decision's kind |
| ``x-session-engine-model`` | the model (group) the decision chose |
| ``x-session-engine-tier`` | its tier |
| ``x-session-engine-reason`` | why, in words |
| ``x-session-engine-strategy`` | the policy's strategy |
| ``x-session-engine-session-source`` | where the session id came from |
| ``x-session-engine-session-id`` | the session id (``RouteDecision.headers`` only: the proxy never echoes it) |
| ``x-session-engine-cost-usd`` | this response's cost, when given |
| ``x-session-engine-budget-limit-usd`` | the cap, when one applies |
| ``x-session-engine-budget-remaining-usd`` | limit - spent before this request - its cost (not a refusal's) |

``RouteDecision.headers`` also writes ``DEPRECATED_ALIASES``, the ``x-session-*`` names it wrote before,
with the same values; they are deprecated and go in the next release.
"""

from __future__ import annotations

__all__ = ["DEPRECATED_ALIASES", "PREFIX", "decision_headers", "with_deprecated_aliases"]

#: The prefix of every decision header.
PREFIX = "x-session-engine-"
#: Deprecated names (``x-session-*``) ``RouteDecision.headers`` writes too, for one release: header -> alias.
DEPRECATED_ALIASES: dict[str, str] = {
    PREFIX + "session-id": "x-session-id",
    PREFIX + "decision": "x-session-decision",
    PREFIX + "reason": "x-session-reason",
    PREFIX + "strategy": "x-session-strategy",
    PREFIX + "session-source": "x-session-source",
    PREFIX + "model": "x-session-model",
    PREFIX + "tier": "x-session-tier",
    PREFIX + "cost-usd": "x-session-cost-usd",
}


def _number(value: object) -> bool:
    return type(value) in (int, float)


def decision_headers(kind: str, model: str = "", tier: str | None = None, source: str = "", *, reason: str = "",
                     strategy: str = "", session_id: str = "", limit_usd: float | None = None,
                     spent_usd: float | None = None, cost_usd: float | None = None) -> dict[str, str]:
    """The decision's headers (ASCII-safe; a field with no value is left out). ``spent_usd``: settled plus
    reserved before this request; with ``limit_usd`` it gives the budget headers."""
    values: dict[str, object] = {"decision": kind, "model": model, "tier": tier, "reason": reason,
                                 "strategy": strategy, "session-source": source, "session-id": session_id}
    if _number(cost_usd):
        values["cost-usd"] = f"{cost_usd:.6f}"
    if _number(limit_usd) and _number(spent_usd):
        spent_now = cost_usd if kind != "refuse" and _number(cost_usd) else 0.0
        values["budget-remaining-usd"] = f"{limit_usd - spent_usd - spent_now:.6f}"  # type: ignore[operator]
        values["budget-limit-usd"] = f"{limit_usd:.6f}"
    return {PREFIX + k: v.encode("ascii", "replace").decode() for k, v in values.items() if isinstance(v, str) and v}


def with_deprecated_aliases(headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus their deprecated ``x-session-*`` names (``DEPRECATED_ALIASES``), same values."""
    return {**headers, **{DEPRECATED_ALIASES[k]: v for k, v in headers.items() if k in DEPRECATED_ALIASES}}
