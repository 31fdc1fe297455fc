"""The LiteLLM hook's call path with the routing turn: budgets that hold, costs that land before the
call returns (counted once), the sync ``completion``, and the decision on the response."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before LiteLLM is imported: never fetch a price map

import pytest
from litellm import Router

from engine.integrations.litellm import HIDDEN_KEY, LiteLLMEstimator
from engine.policy import BudgetExceeded, Request
from tests.conftest import read_log
from tests.integrations import test_litellm
from tests.integrations.test_litellm import Recording, ask, model_list, served_group

make_hook = test_litellm.make_hook  # the registered-hook fixture, shared with tests/integrations/test_litellm.py

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")

@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    """conftest's check, except LiteLLM's own process-wide logging pool, which its sync ``completion``
    starts once and keeps (it is not the engine's to stop)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()
              and not t.name.startswith("litellm-logging")]
    assert not leaked, f"threads leaked by the test: {leaked}"


#: One mocked call on "mid" costs $0.005; its default estimate with max_tokens=20 is about $0.006.
CALL = 5_000


def entry(hook: Recording, sid: str) -> Any:
    return hook.policy.store.store.get_session(sid)


def test_the_default_estimate_prices_prompt_tokens_and_max_tokens_per_group(make_hook):
    hook = make_hook()
    hook._router = Router(model_list=model_list())
    estimator = hook.policy.options.estimator
    assert isinstance(estimator, LiteLLMEstimator)
    request = Request(model="mid", session_id="e", messages=ask("price me"), max_tokens=20)
    tokens = estimator.prompt_tokens("mid", request)
    assert 5 < tokens < 50
    assert estimator("mid", request) == pytest.approx(tokens * 0.0001 + 20 * 0.0002)
    assert estimator("cheap", request) < estimator("mid", request)  # gpt-4o-mini from LiteLLM's price map
    default = Request(model="mid", session_id="e", messages=ask("price me"))
    assert estimator("mid", default) == pytest.approx(tokens * 0.0001 + 1024 * 0.0002)
    assert estimator("no-such-group", Request(model="x", estimate_usd=0.25)) == 0.25


@pytest.mark.parametrize("mode", ["strict", "graceful"])
def test_sequential_calls_see_their_cost_right_after_await_and_the_cap_holds(make_hook, mode):
    hook = make_hook(max_cost_usd=0.02, budget_mode=mode)

    async def run() -> tuple[list[int], list[str], BaseException | None]:
        router = Router(model_list=model_list())
        seen, groups = [], []
        try:
            for i in range(5):
                response = await hook.acompletion(router, model="mid", messages=ask(f"step {i}"),
                                                  metadata={"session_id": "seq"}, max_tokens=20)
                seen.append(entry(hook, "seq").session_cost_micros)  # no wait for the success callback
                groups.append(served_group(response))
        except BudgetExceeded as exc:
            return seen, groups, exc
        return seen, groups, None

    seen, groups, refused = asyncio.run(run())
    assert seen[:3] == [CALL, 2 * CALL, 3 * CALL]  # each call's cost is in before the next one is decided
    assert groups[:3] == ["mid"] * 3
    if mode == "strict":  # the 4th would pass the cap ($0.015 + ~$0.006 > $0.02): refused, never made
        assert refused is not None and len(seen) == 3
    else:  # graceful: the 4th is served by the cheapest group, the pin stays
        assert refused is None or len(groups) > 3
        assert groups[3] == "cheap" and entry(hook, "seq").model == "mid"
    assert entry(hook, "seq").session_cost_micros <= 20_000


def test_concurrent_calls_through_the_hook_never_overspend(make_hook):
    hook = make_hook(max_cost_usd=0.02, budget_mode="strict")

    async def one(router: Router, i: int) -> bool:
        try:
            await hook.acompletion(router, model="mid", messages=ask(f"c{i}"), metadata={"session_id": "conc"},
                                   max_tokens=20)
        except BudgetExceeded:
            return False
        return True

    async def run() -> list[bool]:
        router = Router(model_list=model_list())
        return await asyncio.gather(*(one(router, i) for i in range(8)))

    served = asyncio.run(run())
    estimate = hook.policy.options.estimator("mid", Request(model="mid", messages=ask("c0"), max_tokens=20))
    assert 0 < sum(served) <= int(0.02 / estimate)
    e = entry(hook, "conc")
    assert e.session_cost_micros == sum(served) * CALL <= 20_000 and e.reservations == ()


class _CallbackFirst:
    """A Router whose ``acompletion`` returns only after LiteLLM's success callback has run."""

    def __init__(self, router: Router, hook: Recording) -> None:
        self._router, self._hook = router, hook

    def registry(self) -> Any:
        return self._router.registry()

    async def acompletion(self, **kwargs: Any) -> Any:
        done = self._hook.recorded
        response = await self._router.acompletion(**kwargs)
        await self._hook.wait_recorded(done + 1)
        return response


@pytest.mark.parametrize("order", ["hook first", "callback first"])
def test_each_calls_cost_counts_once_whichever_settles_first(make_hook, order):
    hook = make_hook()

    async def run() -> None:
        router = Router(model_list=model_list())
        target = router if order == "hook first" else _CallbackFirst(router, hook)
        for i in range(3):
            await hook.acompletion(target, model="mid", messages=ask(f"n{i}"), metadata={"session_id": "once"})
        await hook.wait_recorded(3)

    asyncio.run(run())
    assert entry(hook, "once").session_cost_micros == 3 * CALL
    costs = [r for r in read_log(Path(hook._owned.config.event_log)) if r["event"] == "cost.added"]
    assert [r["micros"] for r in costs] == [CALL] * 3
    # LiteLLM's mock usage: 10 prompt and 20 completion tokens, logged with the settlement.
    assert {(r["prompt_tokens"], r["completion_tokens"]) for r in costs} == {(10, 20)}


def test_the_response_carries_the_decision_in_its_hidden_params(make_hook):
    hook = make_hook(max_cost_usd=1.0)

    async def run() -> Any:
        router = Router(model_list=model_list())
        return await hook.acompletion(router, model="mid", messages=ask("hi"), metadata={"session_id": "seen"})

    hidden = asyncio.run(run())._hidden_params[HIDDEN_KEY]
    assert hidden["kind"] == "initialize" and hidden["model"] == "mid" and hidden["requested"] == "mid"
    assert hidden["session_id"] == "seen" and hidden["tier"] == "MEDIUM" and hidden["limit_usd"] == 1.0
    assert hidden["reservation_id"] and hidden["estimate_usd"] > 0


def test_sync_completion_has_the_same_semantics(make_hook):
    hook = make_hook(max_cost_usd=0.02, budget_mode="strict")
    router = Router(model_list=model_list())
    first = hook.completion(router, model="strong", messages=ask("design"), metadata={"session_id": "sync"},
                            max_tokens=20)
    second = hook.completion(router, model="mid", messages=ask("write it"), metadata={"session_id": "sync"},
                             max_tokens=20)
    assert served_group(first) == served_group(second) == "strong"  # pinned, never downgraded
    assert second._hidden_params[HIDDEN_KEY]["kind"] == "retain"
    e = entry(hook, "sync")
    assert e.model == "strong" and e.request_count == 2 and e.reservations == ()
    assert e.session_cost_micros == 2 * round(first._hidden_params["response_cost"] * 1_000_000)


def test_a_failed_call_releases_its_reservation(make_hook):
    hook = make_hook(max_cost_usd=0.02, budget_mode="strict")

    async def run() -> None:
        router = Router(model_list=model_list(), num_retries=0)
        with pytest.raises(Exception, match="upstream down"):
            await hook.acompletion(router, model="mid", messages=ask("x"), metadata={"session_id": "fail"},
                                   mock_response=Exception("upstream down"), max_tokens=20)

    asyncio.run(run())
    e = entry(hook, "fail")
    assert e.reservations == () and e.session_cost_micros == 0
    assert any(r["event"] == "budget.released" for r in read_log(Path(hook._owned.config.event_log)))


def test_eight_concurrent_first_requests_through_the_hook_get_one_pin(make_hook):
    hook = make_hook()

    async def run() -> list[str]:
        router = Router(model_list=model_list())
        replies = await asyncio.gather(*(
            hook.acompletion(router, model=group, messages=ask(f"start {i}"), metadata={"session_id": "herd"})
            for i, group in enumerate(["strong", "mid"] * 4)))
        return [r._hidden_params[HIDDEN_KEY]["kind"] for r in replies]

    kinds = asyncio.run(run())
    assert sorted(kinds).count("initialize") == 1
    e = entry(hook, "herd")
    records = read_log(Path(hook._owned.config.event_log))
    assert [r["event"] for r in records if r["session_id"] == "herd"].count("session.created") == 1
    assert e.request_count == 8 and e.model in ("strong", "mid")
