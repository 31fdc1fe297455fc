"""One header format for one decision: ``RouteDecision.headers`` and the LiteLLM hook's proxy headers both
write ``x-session-engine-*`` from ``engine.core.headers.decision_headers``; the deprecated ``x-session-*`` names
come with ``RouteDecision.headers`` only, for this release."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from engine.core.headers import DEPRECATED_ALIASES, PREFIX, decision_headers
from engine.integrations.litellm import DECISION_KEY
from engine.integrations.litellm import decision_headers as hook_headers
from tests.integrations import test_litellm

make_hook = test_litellm.make_hook


@pytest.mark.parametrize(("options", "cost"), [({}, None), ({}, 0.002), ({"max_cost_usd": 1.0}, 0.25),
                                               ({"max_cost_usd": 0.0, "budget_mode": "strict"}, None)])
def test_the_hook_and_route_decision_write_the_same_headers(make_hook, options: dict[str, Any],
                                                            cost: float | None) -> None:
    hook = make_hook(**options)
    kwargs: dict[str, Any] = {"metadata": {"session_id": "h"}, "messages": test_litellm.ask("write a parser")}

    async def run() -> Any:
        try:
            return await hook.decide("mid", kwargs, kwargs["messages"])
        except Exception as exc:  # a refusal: the decision travels with the error
            return exc.decision  # type: ignore[attr-defined]

    decision = asyncio.run(run())
    stashed = kwargs["metadata"][DECISION_KEY]
    proxy = hook_headers(stashed, cost, hook.policy.options.strategy.value)
    own = decision.headers(cost)
    assert proxy == {k: v for k, v in own.items() if k.startswith(PREFIX) and k != PREFIX + "session-id"}
    assert proxy[PREFIX + "decision"] == decision.kind.value and proxy[PREFIX + "model"] == decision.model
    assert (PREFIX + "budget-limit-usd" in proxy) == ("max_cost_usd" in options)
    assert not any(k in proxy for k in DEPRECATED_ALIASES.values())  # the proxy never wrote the old names
    assert own[PREFIX + "session-id"] == own["x-session-id"] == decision.session_id
    assert all(own[alias] == own[name] for name, alias in DEPRECATED_ALIASES.items() if name in own)


def test_the_budget_headers_count_the_response_unless_refused() -> None:
    served = decision_headers("retain", "m", "MEDIUM", limit_usd=1.0, spent_usd=0.25, cost_usd=0.5)
    assert (served[PREFIX + "budget-remaining-usd"], served[PREFIX + "cost-usd"]) == ("0.250000", "0.500000")
    refused = decision_headers("refuse", "m", limit_usd=1.0, spent_usd=1.25, cost_usd=0.5)
    assert refused[PREFIX + "budget-remaining-usd"] == "-0.250000"
    assert decision_headers("bypass", "m", reason="caf\u00e9")[PREFIX + "reason"] == "caf?"  # ASCII-safe
    assert set(decision_headers("bypass")) == {PREFIX + "decision"}  # a field with no value is left out
