"""Several session-engine hooks in one process, and a hook created after another was closed.

LiteLLM de-duplicates callbacks by class name plus public str/int/bool
attributes, and copies a registered callback into several lists of its own;
these tests hold the hooks to separate books through a real ``litellm.Router``
(``mock_response`` deployments, local price map: no network).
"""

from __future__ import annotations

import asyncio
import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm import Router

from engine import Config, Tier
from engine.integrations.litellm import SessionEngineCallback
from engine.policy import BudgetExceeded, Options
from tests.conftest import read_log

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")

MODELS = {Tier.SIMPLE: "cheap", Tier.MEDIUM: "mid", Tier.COMPLEX: "strong"}
#: One mocked call (10 prompt + 20 completion tokens) on any group costs exactly $0.005.
PRICE = {"input_cost_per_token": 0.0001, "output_cost_per_token": 0.0002}
_LISTS = ("callbacks", "input_callback", "success_callback", "failure_callback", "_async_success_callback",
          "_async_failure_callback", "service_callback")


def router() -> Router:
    return Router(model_list=[{"model_name": group, "litellm_params": {
        "model": "openai/gpt-4o", "api_key": f"k-{group}", "mock_response": f"from {group}", **PRICE}}
        for group in ("cheap", "mid", "strong")])


class Counting(SessionEngineCallback):
    """Lets a test await its success callback, which LiteLLM runs after the response returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = 0
        self._changed = asyncio.Event()

    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await super().async_log_success_event(kwargs, response_obj, start_time, end_time)
        self.seen += 1
        self._changed.set()

    async def wait_seen(self, count: int) -> None:
        async with asyncio.timeout(10):
            while self.seen < count:
                self._changed.clear()
                await self._changed.wait()


def make(tmp_path: Path, name: str, **options: Any) -> Counting:
    hook = Counting.create(MODELS, Config(enabled=True, tick_ms=0, event_log=str(tmp_path / f"{name}.jsonl")),
                           Options(deadline_s=5.0, **options))
    litellm.callbacks.append(hook)
    return hook


def registered(hook: SessionEngineCallback) -> list[str]:
    return [name for name in _LISTS if any(c is hook for c in getattr(litellm, name))]


def costs(hook: SessionEngineCallback) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for record in read_log(Path(hook._owned.config.event_log)):
        if record["event"] == "cost.added":
            out.setdefault(record["session_id"], []).append(record["micros"])
    return out


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_two_live_hooks_keep_separate_correct_books(tmp_path: Path):
    a, b = make(tmp_path, "a"), make(tmp_path, "b")
    try:
        async def run() -> None:
            r = router()
            await a.acompletion(r, model="mid", messages=ask("a1"), metadata={"session_id": "conv-a"})
            await b.acompletion(r, model="strong", messages=ask("b1"), metadata={"session_id": "conv-b"})
            await b.acompletion(r, model="mid", messages=ask("b2"), metadata={"session_id": "conv-b"})
            await asyncio.gather(a.wait_seen(3), b.wait_seen(3))  # each hook sees every call's success

        asyncio.run(run())
        # Both are registered everywhere LiteLLM calls them (neither was taken for a duplicate of the other).
        assert registered(a) == registered(b) and "_async_success_callback" in registered(a)
        assert costs(a) == {"conv-a": [5_000]}
        assert costs(b) == {"conv-b": [5_000, 5_000]}
        assert a.policy.store.store.get_session("conv-b") is None
        assert b.policy.store.store.get_session("conv-a") is None
        assert b.policy.store.store.get_session("conv-b").model == "strong"  # b's pin, in b's store
    finally:
        a.close()
        b.close()


def test_close_unregisters_and_a_new_hook_records_cost_and_enforces_its_budget(tmp_path: Path):
    old = make(tmp_path, "old")
    old.close()
    assert registered(old) == []

    new = make(tmp_path, "new", max_cost_usd=0.008, budget_mode="strict")
    try:
        async def run() -> BudgetExceeded:
            r = router()
            await new.acompletion(r, model="mid", messages=ask("one"), max_tokens=20, metadata={"session_id": "after"})
            await new.wait_seen(1)
            with pytest.raises(BudgetExceeded) as refused:
                # Spent $0.005 + the estimate (20 output tokens alone: $0.004) > $0.008.
                await new.acompletion(r, model="mid", messages=ask("two"), max_tokens=20,
                                      metadata={"session_id": "after"})
            return refused.value

        refusal = asyncio.run(run())
        assert costs(new) == {"after": [5_000]}
        assert refusal.spent_usd == pytest.approx(0.005)
        assert not any(r["event"] == "cost.added" for r in read_log(Path(old._owned.config.event_log)))
    finally:
        new.close()
    assert registered(new) == []
