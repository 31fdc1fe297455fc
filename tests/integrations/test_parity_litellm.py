"""Parity through a real ``litellm.Router`` (``mock_response`` deployments): what LiteLLM 1.110's own
session affinity does, done here at least as well (docs/policy.md, docs/identity.md)."""

from __future__ import annotations

import asyncio
import json
import os
import warnings
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before LiteLLM is imported: never fetch a price map

import pytest
from litellm import Router

from events import SetDeployment
from tests.conftest import read_log
from tests.integrations import test_litellm
from tests.integrations.test_litellm import ask

make_hook = test_litellm.make_hook  # the registered-hook fixture, shared with tests/integrations/test_litellm.py

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
    for d in router.registry().all():
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


# -- point 2: the stall detector --------------------------------------------------------------------
def agent_turns(task: str, steps: list[tuple[str, dict[str, Any], str]]) -> list[list[dict[str, Any]]]:
    """The requests an agent loop sends for one task: the task, then one request per tool call answered
    (each resends the whole conversation, as every agent client does)."""
    messages: list[dict[str, Any]] = ask(task)
    requests = [list(messages)]
    for n, (name, arguments, result) in enumerate(steps):
        call = {"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        messages += [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": f"call_{n}", "content": result}]
        requests.append(list(messages))
    return requests


def run_agent(hook: Any, sid: str, requests: list[list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """(decision kind, model group that served) of each request, through a real Router."""
    async def run() -> list[tuple[str, str]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            router = Router(model_list=test_litellm.model_list())
        out = []
        for messages in requests:
            response = await hook.acompletion(router, model="mid", messages=messages, metadata={"session_id": sid})
            out.append((response._hidden_params["session_engine"]["kind"], test_litellm.served_group(response)))
        return out

    return asyncio.run(run())


def test_an_agent_reading_different_files_makes_progress_and_is_not_escalated(make_hook):
    # Before: the hash held tool names only, so three read_file calls in one task were "identical".
    requests = agent_turns("find where the config is parsed", [
        ("read_file", {"path": f"src/{name}.py"}, f"contents of {name}") for name in ("main", "cli", "config", "io")])
    served = run_agent(make_hook(), "reader", requests)
    assert served == [("initialize", "mid")] + [("retain", "mid")] * 4


def test_a_retry_loop_broken_by_one_lookup_is_a_stall_and_escalates(make_hook):
    # Before: the lookup broke the run of identical hashes and of failing calls: never escalated.
    failing = ("run_tests", {"suite": "all"}, "Error: 3 failed (test_parse, test_load, test_save)")
    requests = agent_turns("make the tests pass", [failing, failing, ("search", {"q": "test_parse"}, "tests/x.py:4"),
                                                   failing])
    hook = make_hook()
    served = run_agent(hook, "looper", requests)
    assert served[:4] == [("initialize", "mid"), ("retain", "mid"), ("retain", "mid"), ("retain", "mid")]
    assert served[4] == ("escalate", "strong")
    decision = [r for r in read_log(Path(hook._owned.config.event_log)) if r["event"] == "decision.made"][-1]
    assert decision["tool_repeats"] == 3 and "same tool call and result 3 times" in decision["reason"]


def test_with_stall_lift_the_session_leaves_the_escalation_once_the_agent_moves_on(make_hook):
    same = ("read_file", {"path": "src/main.py"}, "def main(): ...")
    requests = agent_turns("why does main hang", [same, same, same, ("read_file", {"path": "src/io.py"}, "import os")])
    hook = make_hook(stall_lift=True)
    served = run_agent(hook, "lifter", requests)
    assert served[3] == ("bypass", "strong")  # the third identical call: one configured tier up, pin kept
    assert served[4] == ("retain", "mid")  # the agent moved on: back on its pin
    entry = hook.policy.store.store.get_session("lifter")
    assert (entry.model, entry.tier, entry.escalated) == ("mid", test_litellm.Tier.MEDIUM, False)
    # Without the option the escalation latches, as the seed's does.
    latched = run_agent(make_hook(), "latched", requests)
    assert latched[3:] == [("escalate", "strong"), ("retain", "strong")]
