"""Backtest on a log the real ``litellm.Router`` wrote through the LiteLLM hook (mocked responses)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before LiteLLM is imported: never fetch a price map

import pytest
from litellm import Router

from engine.policy import BudgetExceeded
from engine.tools.backtest import backtest
from tests.conftest import read_log
from tests.integrations import test_litellm
from tests.integrations.test_litellm import ask, model_list
from tests.integrations.test_litellm_route import no_thread_leaks  # noqa: F401  (its autouse fixture, for these tests too)

make_hook = test_litellm.make_hook  # the registered-hook fixture, shared with tests/integrations/test_litellm.py

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")


def _traffic(hook: test_litellm.Recording) -> Path:
    """Three sessions: one stuck on the same ask (strikes escalate), one running past its cap (graceful
    downgrades to the cheap group), one SIMPLE; then the store is closed so its log is complete."""
    async def run() -> None:
        router = Router(model_list=model_list())
        turns = [("stuck", "mid", "it still fails")] * 5 + [("long", "mid", f"step {i}") for i in range(9)]
        turns += [("thanks", "cheap", "thanks!"), ("long", "strong", "now the hard part")]
        for sid, group, text in turns:
            with contextlib.suppress(BudgetExceeded):  # a refusal is part of the recorded traffic
                await hook.acompletion(router, model=group, messages=ask(text), metadata={"session_id": sid},
                                       max_tokens=20)

    asyncio.run(run())
    log = Path(hook._owned.config.event_log)
    hook.close()
    return log


def test_no_change_reproduces_every_decision_of_a_litellm_log(make_hook) -> None:
    log = _traffic(make_hook(max_cost_usd=0.03, budget_mode="graceful"))
    records = read_log(log)
    kinds = {r["kind"] for r in records if r["event"] == "decision.made"}
    assert {"initialize", "retain", "escalate", "bypass"} <= kinds
    result = backtest(log).to_json()
    assert result["decisions"] == sum(r["event"] == "decision.made" for r in records) >= 16
    assert result["decisions_changed"] == 0 and result["not_rerun"] == 0
    assert result["variant"] == result["baseline"]
    assert result["baseline"]["escalations"] >= 1 and result["baseline"]["downgrades"] >= 1


def test_on_a_litellm_log_a_higher_strike_limit_escalates_less_and_a_smaller_cap_spends_less(make_hook) -> None:
    log = _traffic(make_hook(max_cost_usd=0.03, budget_mode="graceful"))
    strikes = backtest(log, ["strike_limit=10"])
    assert strikes.variant.escalations < strikes.baseline.escalations
    cap = backtest(log, ["max_cost_usd=0.01"])
    assert cap.variant.refusals + cap.variant.downgrades > cap.baseline.refusals + cap.baseline.downgrades
    assert cap.variant.cost_micros < cap.baseline.cost_micros
