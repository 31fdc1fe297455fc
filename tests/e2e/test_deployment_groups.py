"""Deployment pins per (model group, tier): a SIMPLE bypass and strategy none return
to the deployment that served them last, so the cheap model's provider prefix cache stays warm; the
retained pin's deployment (``Entry.deployment``) keeps its meaning. Through the public API, the log,
replay, a restart and the backtest."""

from __future__ import annotations

from pathlib import Path

from engine import Config, SessionStore, Tier, replay
from engine.policy import Kind, Options, Policy, Request, deployment_key
from engine.tools.backtest import backtest
from tests.conftest import read_log

MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3"}
CHEAP_A, CHEAP_B = deployment_key("openai", "sk-cheap-a"), deployment_key("openai", "sk-cheap-b")
STRONG = deployment_key("openai", "sk-strong")


def ask(tier: Tier, text: str, candidates: list[str]) -> Request:
    return Request(model=MODELS[tier], tier=tier, session_id="s", candidates=candidates,
                   messages=[{"role": "user", "content": text}])


def test_simple_bypasses_return_to_their_own_deployment_and_the_pin_keeps_its_own(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log))) as store:
        policy = Policy(store, MODELS, Options(deadline_s=5.0))
        pin = policy.route(ask(Tier.COMPLEX, "design the schema", [STRONG]))
        policy.record_response("s", micros=10, deployment=STRONG, decision=pin)
        first = policy.route(ask(Tier.SIMPLE, "thanks", [CHEAP_A, CHEAP_B]))
        assert (first.kind, first.deployment) == (Kind.BYPASS, CHEAP_A)
        # LiteLLM served it from the other cheap deployment: that one is the (cheap, SIMPLE) pin now.
        policy.record_response("s", micros=1, deployment=CHEAP_B, decision=first)
        kinds = []
        for text in ("ok", "great", "thanks again"):
            d = policy.route(ask(Tier.SIMPLE, text, [CHEAP_A, CHEAP_B]))
            kinds.append(d.kind)
            assert (d.deployment, d.candidates, d.served_deployment) == (CHEAP_B, (CHEAP_B, CHEAP_A), CHEAP_B)
            policy.record_response("s", micros=1, deployment=d.deployment, decision=d)
        assert kinds == [Kind.BYPASS] * 3
        back = policy.route(ask(Tier.COMPLEX, "next step", [STRONG]))
        assert (back.kind, back.deployment) == (Kind.RETAIN, STRONG)
        live = store.get_session("s")
        assert live.deployment == STRONG  # the retained pin's deployment, as before
        assert live.deployments == (("openai/gpt-4o-mini", "SIMPLE", CHEAP_B),)
    records = read_log(log)
    grouped = [r for r in records if r["event"] == "deployment.group_set"]
    assert [(r["group_deployment"], r["previous"]) for r in grouped] == [(CHEAP_A, ""), (CHEAP_B, CHEAP_A)]
    assert [r["deployment"] for r in records if r["event"] == "deployment.set"] == [STRONG]
    # Replayed and restored as it was live; the backtest without changes reproduces every decision.
    assert replay(log)["s"] == live
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log))) as again:
        assert again.get_session("s") == live
    result = backtest(log).to_json()
    assert result["decisions"] == 6 and result["decisions_changed"] == 0 and result["variant"] == result["baseline"]


def test_strategy_none_keeps_the_deployment_that_served_each_model_group(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    mid_a, mid_b = deployment_key("openai", "sk-mid-a"), deployment_key("openai", "sk-mid-b")
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log))) as store:
        policy = Policy(store, MODELS, Options(strategy="none", deadline_s=5.0))
        first = policy.route(ask(Tier.SIMPLE, "hi", [CHEAP_A, CHEAP_B]))
        assert (first.kind, first.deployment) == (Kind.BYPASS, CHEAP_A)
        policy.record_response("s", deployment=CHEAP_B, decision=first)
        mid = policy.route(ask(Tier.MEDIUM, "write it", [mid_a, mid_b]))
        policy.record_response("s", deployment=mid_b, decision=mid)
        cheap = policy.route(ask(Tier.SIMPLE, "thanks", [CHEAP_A, CHEAP_B]))
        again = policy.route(ask(Tier.MEDIUM, "more", [mid_a, mid_b]))
        assert (cheap.deployment, again.deployment) == (CHEAP_B, mid_b)
        live = store.get_session("s")
        # Strategy none pins no model: the entry holds only the deployment pins.
        assert (live.model, live.deployment) == ("", "")
        assert set(live.deployments) == {("openai/gpt-4o-mini", "SIMPLE", CHEAP_B), ("openai/gpt-4o", "MEDIUM", mid_b)}
    created = [r for r in read_log(log) if r["event"] == "session.created"]
    assert [r["cause"] for r in created] == ["deployment"]
    assert replay(log)["s"] == live
    result = backtest(log).to_json()
    assert result["decisions"] == 4 and result["decisions_changed"] == 0
