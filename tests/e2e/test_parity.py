"""Parity through the public API: what LiteLLM 1.110's session features do, done here at least as
well (budget ledger that outlives idling, refusal at the cap, escalation to the next configured tier,
escalation keywords, session-id carriers). The LiteLLM Router half is tests/integrations/test_parity_litellm.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from freezegun import freeze_time

from engine import Tier, replay
from engine.policy import BudgetExceeded, Kind, Options, Policy, Request
from tests.conftest import read_log

T0 = "2025-03-01 09:00:00"
MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3"}
MINUTE = 60_000


def req(sid: str, text: str = "hi", model: str = "openai/gpt-4o", tier: Tier | None = Tier.MEDIUM,
        **kw) -> Request:
    return Request(model=model, tier=tier, session_id=sid, messages=[{"role": "user", "content": text}], **kw)


# -- the budget ledger ----------------------------------------------------------------------------
def test_waiting_out_the_idle_timeout_does_not_buy_a_fresh_budget(make_store, log_path):
    with freeze_time(T0) as frozen:
        store = make_store(event_log=str(log_path))  # timeout 30 min, budget window 60 min (defaults)
        policy = Policy(store, MODELS, Options(max_cost_usd=0.01, budget_mode="strict", deadline_s=10.0,
                                               reservation_ttl_ms=3_600_000))
        d = policy.route(req("b", estimate_usd=0.004))
        policy.record_response("b", cost_usd=0.009, decision=d)
        open_one = policy.route(req("b", "2", estimate_usd=0.001))  # never settled: its reservation holds
        frozen.tick(timedelta(minutes=31))
        store.tick()
        ledger = store.get_session("b")
        assert ledger is not None and ledger.model == "" and ledger.request_count == 0  # the session ended...
        assert ledger.session_cost_micros == 9_000 and ledger.reserved_micros == 1_000  # ...its ledger did not
        with pytest.raises(BudgetExceeded) as refused:
            policy.route(req("b", "after the break", estimate_usd=0.001))
        assert refused.value.spent_usd == pytest.approx(0.01)
        live = store.get_session("b")
        store.close()
        assert replay(log_path)["b"] == live  # the ledger is logged and replayed
        restarted = make_store(event_log=str(log_path))
        assert restarted.get_session("b") == live  # and restored on restart
        frozen.tick(timedelta(minutes=30))  # 61 min after the first request: the window is over
        restarted.tick()
        assert restarted.get_session("b") is None
        assert Policy(restarted, MODELS, Options(max_cost_usd=0.01, deadline_s=10.0)).route(
            req("b", "new hour", estimate_usd=0.001)).kind is Kind.INITIALIZE
    assert open_one.reservation_id
    records = [r for r in read_log(log_path) if r["session_id"] == "b"]
    names = [r["event"] for r in records]
    at = names.index("session.expired")
    assert names[at + 1] == "session.created" and records[at + 1]["cause"] == "budget_ledger"


def test_the_budget_window_is_configurable_and_zero_ends_the_ledger_with_the_session(make_store):
    with freeze_time(T0) as frozen:
        store = make_store(budget_window_ms=0)
        policy = Policy(store, MODELS, Options(max_cost_usd=0.01, deadline_s=10.0))
        policy.record_response("z", cost_usd=0.01, decision=policy.route(req("z", estimate_usd=0.001)))
        frozen.tick(timedelta(minutes=31))
        assert store.get_session("z") is None
        long = make_store(budget_window_ms=3 * 3_600_000)
        policy = Policy(long, MODELS, Options(max_cost_usd=0.01, deadline_s=10.0))
        policy.record_response("y", cost_usd=0.01, decision=policy.route(req("y", estimate_usd=0.001)))
        frozen.tick(timedelta(minutes=150))
        assert long.get_session("y").session_cost_micros == 10_000


def test_a_session_exactly_at_its_cap_is_refused_even_with_no_estimate(make_store):
    store = make_store()
    for mode in ("strict", "graceful"):
        sid = f"cap-{mode}"
        policy = Policy(store, MODELS, Options(max_cost_usd=0.01, budget_mode=mode, deadline_s=10.0))
        policy.record_response(sid, cost_usd=0.01, decision=policy.route(req(sid, model="openai/gpt-4o-mini",
                                                                             tier=Tier.SIMPLE)))
        with pytest.raises(BudgetExceeded) as refused:
            policy.route(req(sid, "one more", model="openai/gpt-4o-mini", tier=Tier.SIMPLE))
        assert "committed >= " in refused.value.decision.reason


# -- escalation: the next configured tier, and on request -----------------------------------------
def test_strikes_escalate_past_a_tier_with_no_model_and_keep_the_pin_at_the_top(make_store):
    store = make_store()
    gap = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.COMPLEX: "openai/o3"}  # no MEDIUM model
    policy = Policy(store, gap, Options(strategy="sticky", deadline_s=10.0))
    kinds = [policy.route(req("up", "same", model="openai/gpt-4o-mini", tier=Tier.SIMPLE)) for _ in range(3)]
    assert [d.kind for d in kinds] == [Kind.INITIALIZE, Kind.RETAIN, Kind.ESCALATE]
    assert (kinds[2].model, kinds[2].tier) == ("openai/o3", Tier.COMPLEX)
    top = Policy(store, {Tier.SIMPLE: "openai/gpt-4o-mini"}, Options(strategy="sticky", deadline_s=10.0))
    last = [top.route(req("top", "same", model="openai/gpt-4o-mini", tier=Tier.SIMPLE)) for _ in range(3)][-1]
    assert (last.kind, last.model, last.tier) == (Kind.RETAIN, "openai/gpt-4o-mini", Tier.SIMPLE)
    assert "top configured tier" in last.reason
    assert store.get_session("top").tier is Tier.SIMPLE  # no tier claimed that no model serves


def test_escalation_keywords_move_the_pin_one_configured_tier_up_and_are_logged(make_store, log_path):
    store = make_store(event_log=str(log_path))
    policy = Policy(store, MODELS, Options(deadline_s=10.0))
    policy.route(req("kw", "start", model="openai/gpt-4o-mini", tier=Tier.SIMPLE))
    d = policy.route(req("kw", "this is wrong. LITELLM ESCALATE", model="openai/gpt-4o-mini", tier=Tier.SIMPLE))
    assert (d.kind, d.model, d.tier) == (Kind.ESCALATE, "openai/gpt-4o", Tier.MEDIUM)
    assert "LITELLM ESCALATE" in d.reason
    assert store.get_session("kw").model == "openai/gpt-4o"  # the pin moved up
    lower = policy.route(req("kw", "litellm escalate", model="openai/gpt-4o-mini", tier=Tier.SIMPLE))
    assert lower.kind is not Kind.ESCALATE  # case-sensitive, as LiteLLM matches
    own = Policy(store, MODELS, Options(escalation_keywords=("HARDER",), deadline_s=10.0))
    assert own.route(req("kw", "try HARDER", model="openai/gpt-4o-mini", tier=Tier.SIMPLE)).tier is Tier.COMPLEX
    off = Policy(store, MODELS, Options(escalation_keywords=(), deadline_s=10.0))
    assert off.route(req("kw2", "LITELLM ESCALATE", model="openai/gpt-4o-mini",
                         tier=Tier.SIMPLE)).kind is Kind.INITIALIZE
    store.close()
    made = [r for r in read_log(log_path) if r["event"] == "decision.made" and r.get("keyword")]
    assert [r["keyword"] for r in made] == ["LITELLM ESCALATE", "HARDER"]
    escalated = [r for r in read_log(log_path) if r["event"] == "session.escalated"]
    assert [r["reason"] for r in escalated] == ["keyword", "keyword"]
