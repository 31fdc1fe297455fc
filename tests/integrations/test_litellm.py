"""The LiteLLM integration through a real ``litellm.Router`` with several deployments, offline.

Every deployment answers with ``mock_response`` (LiteLLM's mock usage is 10
prompt + 20 completion tokens), so no network is touched; the local cost map
is forced before LiteLLM is imported so it never fetches one either.
"""

from __future__ import annotations

import asyncio
import os
import warnings

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm import Router
from litellm.caching.dual_cache import DualCache
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

from engine import Config, Tier
from engine.integrations.litellm import DECISION_KEY, SessionEngineCallback, deployment_id
from engine.policy import BudgetExceeded, Options
from tests.conftest import read_log

#: LiteLLM's pydantic models warn about ReadOnly TypedDict items the first time a Router builds them.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")

MODELS = {Tier.SIMPLE: "cheap", Tier.MEDIUM: "mid", Tier.COMPLEX: "strong"}
#: Per-token prices chosen so that one mocked call on "mid" costs exactly $0.005 (5,000 micros).
MID_PRICE = {"input_cost_per_token": 0.0001, "output_cost_per_token": 0.0002}


def model_list() -> list[dict[str, Any]]:
    return [
        {"model_name": "cheap", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "k-cheap",
                                                   "mock_response": "from cheap"}},
        {"model_name": "mid", "litellm_params": {"model": "openai/gpt-4.1-mini", "api_key": "k-mid-1",
                                                 "mock_response": "from mid", **MID_PRICE}},
        {"model_name": "mid", "litellm_params": {"model": "openai/gpt-4.1-mini", "api_key": "k-mid-2",
                                                 "api_base": "http://127.0.0.1:9/v1",
                                                 "mock_response": "from mid", **MID_PRICE}},
        {"model_name": "strong", "litellm_params": {"model": "openai/gpt-4o", "api_key": "k-strong",
                                                    "mock_response": "from strong"}},
    ]


class Recording(SessionEngineCallback):
    """Lets a test await the success callback, which LiteLLM runs after the response returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded = 0
        self._changed: asyncio.Event | None = None

    async def async_log_success_event(self, kwargs: dict, response_obj: Any, start_time: Any, end_time: Any) -> None:
        await super().async_log_success_event(kwargs, response_obj, start_time, end_time)
        self.recorded += 1
        if self._changed is not None:
            self._changed.set()

    async def wait_recorded(self, count: int) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        async with asyncio.timeout(10):
            while self.recorded < count:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
def make_hook(tmp_path: Path) -> Iterator[Callable[..., Recording]]:
    """A registered callback with its own store; unregistered and closed afterwards."""
    hooks: list[Recording] = []

    def make(**options: Any) -> Recording:
        options.setdefault("deadline_s", 5.0)  # a loaded CI box must not turn decisions into "unavailable"
        config = Config(enabled=True, tick_ms=0, event_log=str(tmp_path / f"audit{len(hooks)}.jsonl"))
        hook = Recording.create(MODELS, config, Options(**options))
        hooks.append(hook)
        litellm.callbacks.append(hook)
        return hook

    yield make
    for hook in hooks:
        unregister(hook)
        hook.close()


def unregister(hook: SessionEngineCallback) -> None:
    # LiteLLM copies callbacks into several lists of its own; leave none behind for the next test.
    litellm.logging_callback_manager.remove_callback_from_all_lists(hook)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": text}]


def served_group(response: Any) -> str:
    return response._hidden_params["additional_headers"]["x-litellm-model-group"]


def test_same_conversation_keeps_its_model_never_downgrades_and_simple_follow_ups_bypass():
    turns = (("strong", "design the schema"), ("mid", "now write it"), ("cheap", "thanks!"), ("mid", "add tests"))

    async def run(hook: Recording) -> list[tuple[str, str]]:
        router = Router(model_list=model_list())
        served = []
        for model, text in turns:
            response = await hook.acompletion(router, model=model, messages=ask(text),
                                              metadata={"session_id": "conv-1"})
            served.append((served_group(response), response.choices[0].message.content))
        await hook.wait_recorded(len(turns))
        return served

    with _hook() as hook:
        served = asyncio.run(run(hook))
        entry = hook.policy.store.store.get_session("conv-1")
    # The SIMPLE "thanks!" goes to the cheap group; the pin stays on the strong one.
    assert served == [("strong", "from strong"), ("strong", "from strong"), ("cheap", "from cheap"),
                      ("strong", "from strong")]
    assert entry.model == "strong" and entry.tier is Tier.COMPLEX and entry.request_count == 4


def test_third_identical_request_escalates_one_tier(make_hook):
    hook = make_hook()

    async def run() -> list[str]:
        router = Router(model_list=model_list())
        out = []
        for _ in range(3):
            response = await hook.acompletion(router, model="mid", messages=ask("fix the failing test"),
                                              metadata={"session_id": "stuck"})
            out.append(served_group(response))
        await hook.wait_recorded(3)
        return out

    assert asyncio.run(run()) == ["mid", "mid", "strong"]
    entry = hook.policy.store.store.get_session("stuck")
    assert entry.escalated and entry.tier is Tier.COMPLEX and entry.model == "strong"
    decisions = [r["kind"] for r in read_log(Path(hook._owned.config.event_log)) if r["event"] == "decision.made"]
    assert decisions == ["initialize", "retain", "escalate"]


def test_strict_budget_refuses_before_any_deployment_is_called(make_hook):
    # The default estimate: LiteLLM's token count of the prompt at the group's input price, plus
    # max_tokens (20, the mock's usage) at its output price: about $0.006 a call on "mid".
    hook = make_hook(max_cost_usd=0.008, budget_mode="strict")

    async def run() -> BudgetExceeded:
        router = Router(model_list=model_list())
        await hook.acompletion(router, model="mid", messages=ask("first"), metadata={"session_id": "capped"},
                               max_tokens=20)
        await hook.wait_recorded(1)
        with pytest.raises(BudgetExceeded) as refused:
            await hook.acompletion(router, model="mid", messages=ask("second"), metadata={"session_id": "capped"},
                                   max_tokens=20)
        return refused.value

    refusal = asyncio.run(run())
    assert refusal.spent_usd == pytest.approx(0.005)  # settled: the actual cost replaced the estimate
    assert 0.003 < refusal.estimate_usd < 0.008
    assert refusal.limit_usd == 0.008
    assert hook.recorded == 1  # the refused request never reached a deployment


def test_response_cost_is_recorded_in_micros(make_hook):
    hook = make_hook()

    async def run() -> None:
        router = Router(model_list=model_list())
        for text in ("one", "two"):
            await hook.acompletion(router, model="mid", messages=ask(text), metadata={"session_id": "spend"})
        await hook.wait_recorded(2)

    asyncio.run(run())
    assert hook.policy.store.store.get_session("spend").session_cost_micros == 10_000
    costs = [r["micros"] for r in read_log(Path(hook._owned.config.event_log)) if r["event"] == "cost.added"]
    assert costs == [5_000, 5_000]


def test_the_deployment_that_served_the_session_keeps_serving_it(make_hook):
    hook = make_hook()

    async def run() -> tuple[list[str], str]:
        router = Router(model_list=model_list())
        ids = []
        for i in range(8):
            response = await hook.acompletion(router, model="mid", messages=ask(f"step {i}"),
                                              metadata={"session_id": "cache-warm"})
            ids.append(response._hidden_params["model_id"])
        # The deployment that served the session is removed: another takes over, and a switch is logged.
        with warnings.catch_warnings():  # newer LiteLLM prefers apply(ChangeSet(...)); older has only this
            warnings.simplefilter("ignore", DeprecationWarning)
            router.delete_deployment(id=ids[0])
        response = await hook.acompletion(router, model="mid", messages=ask("step 8"),
                                          metadata={"session_id": "cache-warm"})
        await hook.wait_recorded(9)
        return ids, response._hidden_params["model_id"]

    ids, after = asyncio.run(run())
    assert len(set(ids)) == 1  # eight calls, one deployment (a shuffle of two would almost surely vary)
    assert after != ids[0]
    entry = hook.policy.store.store.get_session("cache-warm")
    assert entry.deployment == f"openai/gpt-4.1-mini#{after[:12]}"
    records = read_log(Path(hook._owned.config.event_log))
    switches = [r for r in records if r["event"] == "decision.made" and r["kind"] == "switch"]
    assert len(switches) == 1 and switches[0]["deployment"] == f"openai/gpt-4.1-mini#{ids[0][:12]}"


def test_proxy_pre_call_hook_routes_and_answers_a_refusal_as_litellms_budget_error(make_hook):
    hook = make_hook(max_cost_usd=0.01, budget_mode="strict")
    auth = UserAPIKeyAuth(token="hashed-key-1")
    sid = f"{hook.proxy_tenant(auth)}:proxy-1"  # the session is scoped by the caller's key

    def request(text: str) -> dict[str, Any]:
        return {"model": "cheap", "messages": ask(text), "metadata": {},
                "proxy_server_request": {"headers": {"X-Session-Id": "proxy-1"}}}

    async def run() -> tuple[dict[str, Any], ProxyException]:
        first = await hook.async_pre_call_hook(auth, DualCache(), request("hi"), "acompletion")
        await hook.policy.record_cost(sid, 0.02)
        with pytest.raises(ProxyException) as refused:
            await hook.async_pre_call_hook(auth, DualCache(), request("more"), "acompletion")
        return first, refused.value

    first, refused = asyncio.run(run())
    assert first["model"] == "cheap" and first["metadata"][DECISION_KEY]["session_id"] == sid
    # LiteLLM's own budget errors: 422 (not a 429 that the OpenAI SDKs would retry), type budget_exceeded.
    assert refused.code == "422" and refused.headers["x-should-retry"] == "false"
    error = refused.to_dict()
    assert error["type"] == "budget_exceeded"
    assert error["provider_specific_fields"]["spent_usd"] == pytest.approx(0.02)


def test_proxy_hook_rewrites_the_model_to_the_pinned_group(make_hook):
    hook = make_hook()
    auth = UserAPIKeyAuth(token="hashed-key-1")

    async def run() -> list[str]:
        out = []
        for model in ("strong", "mid"):
            data = {"model": model, "messages": ask(model), "metadata": {"session_id": "proxy-2"}}
            out.append((await hook.async_pre_call_hook(auth, DualCache(), data, "completion"))["model"])
        return out

    assert asyncio.run(run()) == ["strong", "strong"]


def test_a_request_without_a_session_goes_where_it_asked(make_hook):
    hook = make_hook()

    async def run() -> str:
        router = Router(model_list=model_list())
        response = await hook.acompletion(router, model="cheap", messages=ask("hello"))
        await hook.wait_recorded(1)
        return served_group(response)

    assert asyncio.run(run()) == "cheap"
    assert hook.policy.store.store.get_stats().count == 0


def test_a_retry_or_fallback_of_a_decided_request_is_not_decided_again(make_hook):
    hook = make_hook()

    async def run() -> tuple[Any, Any, Any]:
        kwargs: dict[str, Any] = {"metadata": {"session_id": "fb"}}
        first = await hook.async_pre_routing_hook("strong", kwargs, ask("x"))
        again = await hook.async_pre_routing_hook("mid", kwargs, ask("x"))  # a fallback group
        pinned = await hook.async_pre_routing_hook("mid", {"metadata": {"session_id": "fb"}}, ask("y"))
        return first, again, pinned

    first, again, pinned = asyncio.run(run())
    assert first is None  # first turn: the router's choice is the pin
    assert again is None  # the fallback is LiteLLM's to make
    assert pinned.model == "strong"
    assert hook.policy.store.store.get_session("fb").request_count == 2


def test_deployment_id_names_model_and_key_scoped_id():
    deployment = {"litellm_params": {"model": "openai/gpt-4o"}, "model_info": {"id": "abcdef0123456789"}}
    assert deployment_id(deployment) == "openai/gpt-4o#abcdef012345"


class _hook:
    """A registered callback for tests that do not need the fixture's options."""

    def __enter__(self) -> Recording:
        self.hook = Recording.create(MODELS, Config(enabled=True, tick_ms=0), Options(deadline_s=5.0))
        litellm.callbacks.append(self.hook)
        return self.hook

    def __exit__(self, *exc: object) -> None:
        unregister(self.hook)
        self.hook.close()
