"""Deployment affinity decided on what the session recorded, never on how a deployment key is named.

Ported from ClawRouter's session-pinning scenarios (BlockRunAI/ClawRouter, src/proxy.session-pinning.test.ts):
each test is named after the scenario it ports, restated for this engine, where a session pins a model and
the deployment that served it. Routers serve ``moonshot/kimi`` through an OpenAI-compatible deployment
(``openai:``-keyed), OpenRouter or Azure: the key's provider prefix says nothing about which model it served.
Every scenario also checks that replay, a restart and the backtest rebuild what the live store decided.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from engine import Config, SessionStore, Tier, replay
from engine.policy import Kind, Options, Policy, Request, deployment_key
from engine.tools.backtest import backtest
from events import Route, RouteRules
from tests.conftest import read_log
from tests.integrations import test_litellm

make_hook = test_litellm.make_hook  # the registered-hook fixture, shared with tests/integrations/test_litellm.py

KIMI = "moonshot/kimi-k2"
OPUS = "anthropic/claude-opus"
MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: KIMI, Tier.COMPLEX: OPUS}
#: Deployments serving kimi whose key names another provider than the model's: an OpenAI-compatible
#: endpoint, an OpenRouter key, an Azure deployment.
HOSTS = {
    "openai": (deployment_key("openai", "sk-kimi-1", "https://api.moonshot.ai/v1"),
               deployment_key("openai", "sk-kimi-2", "https://api.moonshot.ai/v1")),
    "openrouter": (deployment_key("openrouter", "sk-or-1"), deployment_key("openrouter", "sk-or-2")),
    "azure": (deployment_key("azure", "az-1", "https://eu.openai.azure.com"),
              deployment_key("azure", "az-2", "https://us.openai.azure.com")),
}


def ask(model: str, tier: Tier, text: str, candidates: tuple[str, ...] | list[str] = (), **kw) -> Request:
    return Request(model=model, tier=tier, session_id="s", candidates=candidates,
                   messages=[{"role": "user", "content": text}], **kw)


def same_after_replay_restart_and_backtest(log: Path, store: SessionStore, decisions: int) -> None:
    live = store.get_session("s")
    store.close()
    assert replay(log)["s"] == live
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log))) as again:
        assert again.get_session("s") == live
    result = backtest(log).to_json()
    assert (result["decisions"], result["decisions_changed"]) == (decisions, 0)
    assert result["variant"] == result["baseline"]


@pytest.fixture
def store(tmp_path: Path):
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=str(tmp_path / "audit.jsonl"))) as s:
        yield s


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_does_not_reinsert_a_sticky_model_removed_by_a_hard_capacity_filter(tmp_path: Path, store, host: str):
    # The session pins kimi, served by deployment D; a request asking 20,000 output tokens finds D removed by
    # the host's capacity filter: the pin moves to the remaining candidate (switch), which is recorded, and D
    # is never put back among the candidates.
    d, e = HOSTS[host]
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    pin = policy.route(ask(KIMI, Tier.MEDIUM, "pin this model", [d, e], user_explicit=True))
    assert (pin.kind, pin.deployment) == (Kind.INITIALIZE, d)
    policy.record_response("s", micros=10, deployment=d, decision=pin)
    long = policy.route(ask(KIMI, Tier.MEDIUM, "produce a long answer", [e], max_tokens=20_000))
    assert (long.kind, long.model, long.deployment, long.candidates) == (Kind.SWITCH, KIMI, e, (e,))
    assert "deployment gone, switched" in long.reason
    assert store.get_session("s").deployment == e
    after = policy.route(ask(KIMI, Tier.MEDIUM, "and a short one", [d, e]))
    assert (after.kind, after.deployment, after.candidates) == (Kind.RETAIN, e, (e, d))  # e served last
    records = read_log(tmp_path / "audit.jsonl")
    assert [r["deployment"] for r in records if r["event"] == "deployment.set"] == [d, e]
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 3)


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_keeps_the_pin_on_its_deployment_while_it_stays_and_switches_when_it_is_gone(tmp_path: Path, store,
                                                                                   host: str):
    # The router-chosen variant of the scenario above: kimi pinned by the router, not by the user.
    d, e = HOSTS[host]
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    first = policy.route(ask(KIMI, Tier.MEDIUM, "one", [d, e]))
    assert (first.kind, first.deployment) == (Kind.INITIALIZE, d)
    kept = policy.route(ask(KIMI, Tier.MEDIUM, "two", [e, d]))
    assert (kept.kind, kept.deployment, kept.candidates) == (Kind.RETAIN, d, (d, e))
    gone = policy.route(ask(KIMI, Tier.MEDIUM, "three", [e]))
    assert (gone.kind, gone.deployment) == (Kind.SWITCH, e)
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 3)


def test_keeps_the_user_explicit_pin_after_a_routed_follow_up_falls_back(tmp_path: Path, store):
    # The explicit pin's deployment fails one follow-up (the call is released, the router's fallback serves
    # it elsewhere): the next follow-up returns to the explicit model and to its deployment.
    d, e = HOSTS["openrouter"]
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    pin = policy.route(ask(KIMI, Tier.MEDIUM, "pin this model", [d, e], user_explicit=True))
    policy.record_response("s", micros=10, deployment=d, decision=pin)
    failed = policy.route(ask("openai/gpt-4o-mini", Tier.SIMPLE, "simple follow-up", [d, e]))
    assert (failed.kind, failed.model) == (Kind.RETAIN, KIMI)
    policy.release(failed)  # 503 from the pinned deployment: nothing recorded
    again = policy.route(ask("openai/gpt-4o-mini", Tier.SIMPLE, "another follow-up", [d, e]))
    assert (again.kind, again.model, store.get_session("s").deployment) == (Kind.RETAIN, KIMI, d)
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 3)


def test_emits_one_decision_when_reusing_a_user_explicit_session_pin(tmp_path: Path, store):
    d, _ = HOSTS["azure"]
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    policy.route(ask(KIMI, Tier.MEDIUM, "pin this model", [d], user_explicit=True))
    policy.route(ask("openai/gpt-4o-mini", Tier.SIMPLE, "simple follow-up", [d]))
    made = [r for r in read_log(tmp_path / "audit.jsonl") if r["event"] == "decision.made"]
    assert [(r["kind"], r["model"]) for r in made] == [("initialize", KIMI), ("retain", KIMI)]
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 2)


def test_every_candidate_removed_by_the_capacity_filter_names_no_deployment(tmp_path: Path, store):
    # ClawRouter answers a clear error without an upstream attempt; here the pin stays, no deployment is named
    # and none is recorded (no switch to a deployment that is not there).
    d, _ = HOSTS["openai"]
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    policy.route(ask(KIMI, Tier.MEDIUM, "pin", [d]))
    none = policy.route(ask(KIMI, Tier.MEDIUM, "a huge answer", [], max_tokens=200_000))
    assert (none.kind, none.deployment, none.candidates) == (Kind.RETAIN, "", ())
    assert store.get_session("s").deployment == d
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 2)


def test_an_escalation_to_another_providers_model_records_its_first_deployment_without_a_switch(
        tmp_path: Path, store):
    # kimi (served by an openai:-keyed deployment) escalates to opus on the keyword; the router still asks for
    # kimi with kimi's deployments, which cannot serve opus: none is named, and the kimi deployment stays
    # with the model it served. When opus's own deployments come, the first is recorded: not "gone, switched".
    d, e = HOSTS["openai"]
    opus = deployment_key("openrouter", "sk-or-opus")
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    policy.route(ask(KIMI, Tier.MEDIUM, "start", [d, e]))
    up = policy.route(ask(KIMI, Tier.MEDIUM, "LITELLM ESCALATE please", [d, e]))
    assert (up.kind, up.model, up.deployment, up.candidates) == (Kind.ESCALATE, OPUS, "", ())
    assert store.get_session("s").deployment == ""  # the kimi deployment left with kimi
    there = policy.route(ask(OPUS, Tier.COMPLEX, "go on", [opus]))
    assert (there.kind, there.deployment) == (Kind.RETAIN, opus) and "switched" not in there.reason
    assert store.get_session("s").deployment == opus
    gone = policy.route(ask(OPUS, Tier.COMPLEX, "and on", [deployment_key("anthropic", "sk-a")]))
    assert gone.kind is Kind.SWITCH  # opus's own deployment removed: a switch
    records = read_log(tmp_path / "audit.jsonl")
    assert [r["deployment"] for r in records if r["event"] == "deployment.set"] == [
        d, "", opus, deployment_key("anthropic", "sk-a")]
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 4)


def test_an_upgrade_with_the_new_models_candidates_records_its_first_deployment(tmp_path: Path, store):
    d, _ = HOSTS["azure"]
    opus = deployment_key("openrouter", "sk-or-opus")
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    policy.route(ask(KIMI, Tier.MEDIUM, "start", [d]))
    up = policy.route(ask(OPUS, Tier.COMPLEX, "harder now", [opus]))
    assert (up.kind, up.deployment) == (Kind.UPGRADE, opus) and "switched" not in up.reason
    assert store.get_session("s").deployment == opus
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 2)


def test_a_simple_follow_up_keeps_its_own_group_pin_and_the_pin_its_own(tmp_path: Path, store):
    d, _ = HOSTS["openai"]
    cheap_a, cheap_b = HOSTS["openrouter"]
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    policy.route(ask(OPUS, Tier.COMPLEX, "design it", [d]))
    cheap = policy.route(ask("openai/gpt-4o-mini", Tier.SIMPLE, "thanks", [cheap_a, cheap_b]))
    assert (cheap.kind, cheap.deployment) == (Kind.BYPASS, cheap_a)
    gone = policy.route(ask("openai/gpt-4o-mini", Tier.SIMPLE, "ok", [cheap_b]))
    assert (gone.kind, gone.deployment) == (Kind.BYPASS, cheap_b)  # its own group pin moves, never a switch
    back = policy.route(ask(OPUS, Tier.COMPLEX, "next step", [d]))
    assert (back.kind, back.deployment) == (Kind.RETAIN, d)
    live = store.get_session("s")
    assert (live.deployment, live.deployments) == (d, (("openai/gpt-4o-mini", "SIMPLE", cheap_b),))
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 4)


def test_a_pin_served_by_a_key_of_another_provider_is_not_served_by_the_routers_other_model_candidates(
        tmp_path: Path, store):
    # The router asks for its own cheaper model while the pin holds opus: its candidates serve that model.
    # Only the deployment the session recorded serving opus may be used among them, whatever the keys' names.
    mine = deployment_key("openrouter", "sk-or-opus")
    policy = Policy(store, MODELS, Options(deadline_s=5.0))
    policy.route(ask(OPUS, Tier.COMPLEX, "design it", [mine]))
    theirs = [deployment_key("anthropic", "sk-kimi-proxy"), deployment_key("openai", "sk-1")]
    other = policy.route(ask(KIMI, Tier.MEDIUM, "next", theirs))
    assert (other.kind, other.model, other.deployment, other.candidates) == (Kind.RETAIN, OPUS, "", ())
    listed = policy.route(ask(KIMI, Tier.MEDIUM, "more", [*theirs, mine]))
    assert (listed.kind, listed.deployment, listed.candidates) == (Kind.RETAIN, mine, (mine,))
    same_after_replay_restart_and_backtest(tmp_path / "audit.jsonl", store, 3)


def test_a_log_decided_by_key_names_is_re_run_as_it_was_decided(tmp_path: Path) -> None:
    # Logs written before affinity_by_record (their rules lack it) called kimi's openai:-keyed deployment
    # "moved to another provider" and retained the pin when it was gone: the backtest reproduces that.
    log = tmp_path / "audit.jsonl"
    d, e = HOSTS["openai"]
    table = (("MEDIUM", (KIMI,)),)
    rules = {"old": RouteRules(table, affinity_by_record=False), "new": RouteRules(table)}
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log))) as store:
        for sid, kind in (("old", "retain"), ("new", "switch")):
            store.ask(Route(sid, KIMI, Tier.MEDIUM, rules[sid], request_hash="h1", candidates=(d, e)))
            gone = store.ask(Route(sid, KIMI, Tier.MEDIUM, rules[sid], request_hash="h2", candidates=(e,)))
            assert (gone.kind, gone.deployment) == (kind, e)
    records = read_log(log)
    for record in records:
        if record.get("session_id") == "old":
            record.get("rules", {}).pop("affinity_by_record", None)  # as such a log was written
    older = tmp_path / "older.jsonl"
    older.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    assert backtest(older).decisions_changed == 0
    assert backtest(log).decisions_changed == 0


def test_does_not_reinsert_a_sticky_deployment_removed_by_a_hard_capacity_filter_through_litellm(make_hook):
    # The same scenario through a real litellm.Router: kimi served by two OpenAI-compatible deployments of the
    # "mid" group; the one that served the session is removed, the hook's filter moves the pin (switch) to
    # the other, which is recorded, and the removed one never comes back.
    import asyncio
    import warnings

    from litellm import Router

    from tests.integrations.test_litellm import ask as chat

    kimi = [{"model_name": "mid", "litellm_params": {"model": "openai/kimi-k2", "api_key": key,
                                                     "api_base": "https://api.moonshot.ai/v1",
                                                     "mock_response": "from kimi"}} for key in ("k-1", "k-2")]
    hook = make_hook()

    async def run() -> tuple[list[tuple[str, str]], Router]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            router = Router(model_list=kimi)
        served = []
        for n in range(3):
            response = await hook.acompletion(router, model="mid", messages=chat(f"step {n}"),
                                              metadata={"session_id": "kimi"})
            served.append((response._hidden_params["session_engine"]["kind"], response._hidden_params["model_id"]))
            if n == 0:
                with warnings.catch_warnings():  # newer LiteLLM prefers apply(ChangeSet(...)); older has only this
                    warnings.simplefilter("ignore", DeprecationWarning)
                    router.delete_deployment(id=served[0][1])  # the capacity filter
        return served, router

    served, _ = asyncio.run(run())
    (first_kind, first), (second_kind, second), (third_kind, third) = served
    assert (first_kind, second_kind, third_kind) == ("initialize", "switch", "retain")
    assert first != second == third
    assert hook.policy.store.store.get_session("kimi").deployment.endswith(second[:12])
