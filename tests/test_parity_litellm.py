"""Issue 16 through a real ``litellm.Router`` (``mock_response`` deployments): what LiteLLM 1.110's own
session affinity does, done here at least as well (docs/policy.md, docs/identity.md)."""

from __future__ import annotations

import asyncio
import os
import warnings
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before LiteLLM is imported: never fetch a price map

import pytest
from litellm import Router

from events import SetDeployment
from tests import test_litellm
from tests.conftest import read_log
from tests.test_litellm import ask

make_hook = test_litellm.make_hook  # the registered-hook fixture, shared with tests/test_litellm.py

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")


def failing_pair() -> list[dict[str, Any]]:
    """Group "mid" with one deployment answering HTTP 500 and one that works; "cheap" and "strong" too."""
    return [
        {"model_name": "cheap", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "k-cheap",
                                                   "mock_response": "from cheap"}},
        {"model_name": "mid", "litellm_params": {"model": "openai/gpt-4.1-mini", "api_key": "k-bad",
                                                 "mock_response": "litellm.InternalServerError"}},
        {"model_name": "mid", "litellm_params": {"model": "openai/gpt-4.1-mini", "api_key": "k-good",
                                                 "api_base": "http://127.0.0.1:9/v1", "mock_response": "from mid"}},
        {"model_name": "strong", "litellm_params": {"model": "openai/gpt-4o", "api_key": "k-strong",
                                                    "mock_response": "from strong"}},
    ]


def _ids(router: Router, key: str) -> str:
    for d in router.get_model_list() or ():
        if d["litellm_params"].get("api_key") == key:
            return d["model_info"]["id"]
    raise AssertionError(key)


def test_a_pinned_deployment_that_fails_is_dropped_for_the_retries_of_the_same_request(make_hook):
    hook = make_hook()
    sid = "failover"

    async def run() -> tuple[Any, str, str]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            router = Router(model_list=failing_pair(), num_retries=2, retry_after=0)
        bad, good = _ids(router, "k-bad"), _ids(router, "k-good")
        # The session is pinned to group "mid" and to its deployment that now answers 500.
        await hook.acompletion(router, model="mid", messages=ask("pin me"), metadata={"session_id": sid},
                               mock_response="warm-up")
        hook.policy.store.store.ask(SetDeployment(sid, f"openai/gpt-4.1-mini#{bad[:12]}"))
        response = await hook.acompletion(router, model="mid", messages=ask("then this"),
                                          metadata={"session_id": sid})
        return response, bad, good

    response, bad, good = asyncio.run(run())
    assert response._hidden_params["model_id"] == good  # the first retry went elsewhere and succeeded
    assert response.choices[0].message.content == "from mid"
    entry = hook.policy.store.store.get_session(sid)
    assert entry.deployment == f"openai/gpt-4.1-mini#{good[:12]}"  # the deployment that served is pinned
    records = read_log(Path(hook._owned.config.event_log))
    switches = [r for r in records if r["event"] == "decision.made" and r["kind"] == "switch"]
    assert len(switches) == 1 and switches[0]["deployment"] == f"openai/gpt-4.1-mini#{bad[:12]}"
    assert "failed in this request" in switches[0]["reason"]
    assert response._hidden_params["session_engine"]["kind"] == "switch"


def two_cheap() -> list[dict[str, Any]]:
    """Group "cheap" with two working deployments; "strong" with one."""
    return [
        *({"model_name": "cheap", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": key,
                                                     "mock_response": "from cheap"}} for key in ("k-c1", "k-c2")),
        {"model_name": "strong", "litellm_params": {"model": "openai/gpt-4o", "api_key": "k-strong",
                                                    "mock_response": "from strong"}},
    ]


def test_simple_bypasses_keep_one_deployment_of_their_group_and_tier(make_hook):
    hook = make_hook()
    sid = "bypass-pin"

    async def run() -> tuple[list[str], Router]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            router = Router(model_list=two_cheap())
        await hook.acompletion(router, model="strong", messages=ask("design the schema"),
                               metadata={"session_id": sid})
        served = []
        for text in ("thanks", "ok", "great", "cool", "nice", "thanks again", "fine", "good"):
            response = await hook.acompletion(router, model="cheap", messages=ask(text), metadata={"session_id": sid})
            assert response._hidden_params["session_engine"]["kind"] == "bypass"
            served.append(response._hidden_params["model_id"])
        return served, router

    served, router = asyncio.run(run())
    # LiteLLM alone spreads the eight follow-ups over both cheap deployments (simple-shuffle).
    assert len(set(served)) == 1 and served[0] in (_ids(router, "k-c1"), _ids(router, "k-c2"))
    entry = hook.policy.store.store.get_session(sid)
    assert entry.deployment == f"openai/gpt-4o#{_ids(router, 'k-strong')[:12]}"  # the pin's own, untouched
    assert entry.deployments == (("cheap", "SIMPLE", f"openai/gpt-4o-mini#{served[0][:12]}"),)


def test_strategy_none_keeps_one_deployment_per_model_group(make_hook):
    hook = make_hook(strategy="none")
    sid = "none-pin"

    async def run() -> tuple[list[str], Router]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            router = Router(model_list=two_cheap())
        served = []
        for n in range(8):
            response = await hook.acompletion(router, model="cheap", messages=ask(f"step {n}"),
                                              metadata={"session_id": sid})
            served.append(response._hidden_params["model_id"])
        return served, router

    served, _ = asyncio.run(run())
    assert len(set(served)) == 1
    assert hook.policy.store.store.get_session(sid).deployments == (
        ("cheap", "SIMPLE", f"openai/gpt-4o-mini#{served[0][:12]}"),)
