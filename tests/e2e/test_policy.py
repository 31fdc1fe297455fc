"""The pure routing decision: each rule of docs/policy.md, with the events it implies."""

from __future__ import annotations

import pytest

from engine import Config, Entry, Tier
from engine.policy import (
    BudgetExceeded,
    Kind,
    Options,
    Request,
    decide,
    deployment_key,
    request_hash,
)
from events import Decision, Escalate, Hash, InvalidEvent, SetCacheSticky, SetDeployment, SetSession, Touch

MODELS = {
    Tier.SIMPLE: "openai/gpt-4o-mini",
    Tier.MEDIUM: "openai/gpt-4o",
    Tier.COMPLEX: ["openai/o3", "anthropic/claude-sonnet"],
    "REASONING": "anthropic/claude-opus",
}


def ask(tier: Tier, text: str = "next step", sid: str = "s", **kw) -> Request:
    model = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3",
             Tier.REASONING: "anthropic/claude-opus"}[tier]
    return Request(model=model, tier=tier, session_id=sid, messages=[{"role": "user", "content": text}], **kw)


def pinned(model: str, tier: Tier | None, **kw) -> Entry:
    return Entry(model, tier, 1_000, 1_000, kw.pop("request_count", 1), **kw)


def kinds(decision) -> list[str]:
    return [type(e).__name__ for e in decision.events]


def test_first_turn_pins_the_routers_choice():
    d = decide(ask(Tier.MEDIUM), None, MODELS)
    assert (d.kind, d.model, d.tier, d.provider) == (Kind.INITIALIZE, "openai/gpt-4o", Tier.MEDIUM, "openai")
    assert kinds(d) == ["SetSession", "Hash", "Decision"]
    assert d.events[-1].kind == "initialize" and d.events[-1].reason == d.reason


def test_lower_or_equal_router_tier_keeps_the_pinned_model():
    state = pinned("openai/o3", Tier.COMPLEX)
    for tier in (Tier.MEDIUM, Tier.COMPLEX):
        d = decide(ask(tier), state, MODELS)
        assert (d.kind, d.model, d.tier) == (Kind.RETAIN, "openai/o3", Tier.COMPLEX)
        assert isinstance(d.events[0], Touch)  # counted, pin untouched


def test_higher_router_tier_upgrades_the_session():
    d = decide(ask(Tier.COMPLEX), pinned("openai/gpt-4o", Tier.MEDIUM), MODELS)
    assert (d.kind, d.model, d.tier) == (Kind.UPGRADE, "openai/o3", Tier.COMPLEX)
    assert d.events[0] == SetSession("s", "openai/o3", Tier.COMPLEX)


def test_simple_follow_up_uses_the_cheap_model_without_moving_the_pin():
    state = pinned("openai/o3", Tier.COMPLEX)
    d = decide(ask(Tier.SIMPLE, "thanks"), state, MODELS)
    assert (d.kind, d.model, d.tier) == (Kind.BYPASS, "openai/gpt-4o-mini", Tier.SIMPLE)
    assert not any(isinstance(e, SetSession) for e in d.events)
    off = decide(ask(Tier.SIMPLE, "thanks"), state, MODELS, Options(simple_bypass=False))
    assert (off.kind, off.model) == (Kind.RETAIN, "openai/o3")


def test_user_explicit_pin_wins_over_every_router_tier():
    explicit = decide(ask(Tier.SIMPLE, user_explicit=True), None, MODELS)
    assert explicit.kind is Kind.INITIALIZE
    assert explicit.events[0] == SetSession("s", "openai/gpt-4o-mini", Tier.SIMPLE, True)
    state = pinned("openai/gpt-4o-mini", Tier.SIMPLE, user_explicit=True)
    for tier in (Tier.REASONING, Tier.SIMPLE):
        d = decide(ask(tier), state, MODELS)
        assert (d.kind, d.model, d.reason) == (Kind.RETAIN, "openai/gpt-4o-mini", "user-explicit pin")


def test_strike_limit_escalates_one_tier_and_uses_that_tiers_model():
    h = request_hash([{"role": "user", "content": "still broken"}])
    state = pinned("openai/gpt-4o", Tier.MEDIUM, recent_hashes=(h, h), strikes=1, request_count=2)
    d = decide(ask(Tier.MEDIUM, "still broken"), state, MODELS)
    assert (d.kind, d.model, d.tier) == (Kind.ESCALATE, "openai/o3", Tier.COMPLEX)
    assert kinds(d)[:3] == ["Hash", "Escalate", "SetSession"]
    assert "strike limit" in d.reason


def test_auto_escalating_store_is_not_escalated_twice_by_the_strikes_detector():
    h = request_hash([{"role": "user", "content": "again"}])
    state = pinned("openai/gpt-4o", Tier.MEDIUM, recent_hashes=(h, h), strikes=1, request_count=2)
    d = decide(ask(Tier.MEDIUM, "again"), state, MODELS, Options(stall_detector="strikes"),
               config=Config(auto_escalate=True))
    assert d.kind is Kind.ESCALATE
    assert not any(isinstance(e, Escalate) for e in d.events)  # the Hash event escalates by itself


def test_under_the_window_detector_the_rules_escalate_and_the_stores_auto_escalation_stays_out(make_store):
    # Two separate double repeats bring the cumulative strikes to the store's limit: the seed's
    # auto-escalation would fire on the second; the window detector sees no stall there, and the
    # route's turn records the hash without auto-escalating. The third identical request escalates once.
    from engine.policy import Policy

    store = make_store(auto_escalate=True, strike_limit=2)
    policy = Policy(store, MODELS)
    for text in ("a", "a", "b", "b", "c"):
        assert policy.route(ask(Tier.MEDIUM, text, "w")).kind in (Kind.INITIALIZE, Kind.RETAIN)
    entry = store.get_session("w")
    assert (entry.strikes, entry.escalated, entry.tier) == (2, False, Tier.MEDIUM)
    policy.route(ask(Tier.MEDIUM, "c", "w"))
    d = policy.route(ask(Tier.MEDIUM, "c", "w"))
    assert (d.kind, d.tier) == (Kind.ESCALATE, Tier.COMPLEX)
    entry = store.get_session("w")
    assert (entry.escalated, entry.tier, entry.model) == (True, Tier.COMPLEX, "openai/o3")


def test_user_explicit_pin_is_never_escalated():
    h = request_hash([{"role": "user", "content": "again"}])
    state = pinned("m/x", Tier.MEDIUM, recent_hashes=(h, h), strikes=1, user_explicit=True)
    d = decide(ask(Tier.MEDIUM, "again"), state, MODELS)  # the third identical request
    assert (d.kind, d.model, d.tier) == (Kind.RETAIN, "m/x", Tier.MEDIUM)
    assert not any(type(e).__name__ == "Escalate" for e in d.events)


def test_request_hash_reads_last_user_message_and_last_assistant_tool_calls():
    user = {"role": "user", "content": "run the tests"}
    calls = {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "bash"}}]}
    other = {"role": "assistant", "content": [{"type": "tool_use", "name": "edit", "input": {}}]}
    base = request_hash([user])
    assert request_hash([calls, user]) != base
    assert request_hash([calls, user]) != request_hash([other, user])
    assert request_hash([{"role": "user", "content": "older"}, calls, user]) == request_hash([calls, user])
    assert request_hash([user, {"role": "assistant", "content": "ok"}]) == base


def test_sticky_keeps_the_pin_when_the_router_asks_for_more():
    d = decide(ask(Tier.REASONING), pinned("openai/gpt-4o", Tier.MEDIUM), MODELS, Options(strategy="sticky"))
    assert (d.kind, d.model, d.strategy.value) == (Kind.RETAIN, "openai/gpt-4o", "sticky")


def test_strategy_none_follows_the_router_and_pins_nothing():
    d = decide(ask(Tier.SIMPLE), pinned("openai/o3", Tier.COMPLEX), MODELS, Options(strategy="none"))
    assert (d.kind, d.model) == (Kind.BYPASS, "openai/gpt-4o-mini")
    assert kinds(d) == ["Decision"]


def test_warmup_turns_follow_the_router_then_commit():
    opts = Options(warmup_turns=2)
    first = decide(ask(Tier.COMPLEX), None, MODELS, opts)
    second = decide(ask(Tier.SIMPLE), pinned("openai/o3", Tier.COMPLEX, request_count=1), MODELS, opts)
    commit = decide(ask(Tier.MEDIUM), pinned("openai/gpt-4o-mini", Tier.SIMPLE, request_count=2), MODELS, opts)
    assert [first.kind, second.kind, commit.kind] == [Kind.BYPASS, Kind.BYPASS, Kind.INITIALIZE]
    assert second.model == "openai/gpt-4o-mini"  # no never-downgrade during warmup
    assert "warmup turn 2 of 2" in second.reason
    assert commit.model == "openai/gpt-4o"


def test_long_context_pins_the_provider_and_upgrades_stay_with_it():
    long = [{"role": "user", "content": "x" * 9_000}]
    d = decide(Request("anthropic/claude-sonnet", Tier.COMPLEX, "s", long), None, MODELS)
    assert SetCacheSticky("s", "anthropic") in d.events
    state = pinned("anthropic/claude-haiku", Tier.MEDIUM, cache_sticky=True, cache_sticky_at=1_000,
                   provider="anthropic")
    up = decide(ask(Tier.COMPLEX), state, MODELS)  # the router picked openai/o3
    assert (up.kind, up.model, up.provider) == (Kind.UPGRADE, "anthropic/claude-sonnet", "anthropic")
    assert "cache pin anthropic" in up.reason


def test_strict_budget_refuses_as_soon_as_the_projection_passes_the_cap():
    state = pinned("openai/gpt-4o", Tier.MEDIUM, session_cost_micros=900_000)
    d = decide(ask(Tier.SIMPLE, estimate_usd=0.2), state, MODELS, Options(max_cost_usd=1.0, budget_mode="strict"))
    assert d.kind is Kind.REFUSE and d.refused
    assert (d.spent_usd, d.estimate_usd, d.limit_usd) == (0.9, 0.2, 1.0)
    assert kinds(d) == ["Decision"]  # a refused request changes no session state
    err = d.budget_error()
    assert isinstance(err, BudgetExceeded)
    assert (err.spent_usd, err.estimate_usd, err.limit_usd, err.session_id) == (0.9, 0.2, 1.0, "s")


def test_graceful_budget_downgrades_to_the_cheapest_tier_but_keeps_the_pin():
    state = pinned("openai/gpt-4o", Tier.MEDIUM, session_cost_micros=900_000)
    prices = {"openai/gpt-4o": 0.2, "openai/gpt-4o-mini": 0.01}
    opts = Options(max_cost_usd=1.0, estimator=lambda model, request: prices[model])
    d = decide(ask(Tier.MEDIUM), state, MODELS, opts)
    assert (d.kind, d.model, d.tier, d.estimate_usd) == (Kind.BYPASS, "openai/gpt-4o-mini", Tier.SIMPLE, 0.01)
    assert "budget" in d.reason
    assert not any(isinstance(e, SetSession) for e in d.events)


@pytest.mark.parametrize("request_", [ask(Tier.COMPLEX, estimate_usd=0.5),
                                      ask(Tier.MEDIUM, estimate_usd=0.5, tools=[{"type": "function"}])],
                         ids=["complex", "tool-using"])
def test_graceful_budget_refuses_work_it_cannot_serve_within_budget(request_):
    state = pinned("openai/gpt-4o", Tier.MEDIUM, session_cost_micros=800_000)
    d = decide(request_, state, MODELS, Options(max_cost_usd=1.0))
    assert d.kind is Kind.REFUSE


def test_graceful_budget_refuses_when_even_the_cheapest_model_does_not_fit():
    state = pinned("openai/gpt-4o", Tier.MEDIUM, session_cost_micros=999_999)
    d = decide(ask(Tier.MEDIUM, estimate_usd=0.5), state, MODELS, Options(max_cost_usd=1.0))
    assert d.kind is Kind.REFUSE


def test_deployment_that_served_the_session_goes_first():
    a, b = deployment_key("openai", "sk-a"), deployment_key("openai", "sk-b")
    state = pinned("openai/gpt-4o", Tier.MEDIUM, deployment=b)
    d = decide(ask(Tier.MEDIUM, candidates=[a, b]), state, MODELS)
    assert (d.kind, d.deployment, d.candidates) == (Kind.RETAIN, b, (b, a))
    assert not any(isinstance(e, SetDeployment) for e in d.events)


def test_gone_deployment_switches_and_records_the_new_one():
    a, b, c = (deployment_key("openai", k) for k in ("sk-a", "sk-b", "sk-c"))
    d = decide(ask(Tier.MEDIUM, candidates=[a, c]), pinned("openai/gpt-4o", Tier.MEDIUM, deployment=b), MODELS)
    assert (d.kind, d.deployment) == (Kind.SWITCH, a)
    assert SetDeployment("s", a) in d.events
    assert isinstance(d.events[-1], Decision) and d.events[-1].deployment == a


def test_deployment_keys_never_hold_the_api_key():
    key = deployment_key("openai", "sk-secret-123", "https://api.example.com/v1")
    assert "sk-secret" not in key and key.startswith("openai:") and key.endswith("@https://api.example.com/v1")


def test_no_session_id_serves_the_routers_choice_without_events():
    d = decide(ask(Tier.MEDIUM, sid=""), None, MODELS)
    assert (d.kind, d.model, d.events) == (Kind.BYPASS, "openai/gpt-4o", ())


def test_decision_headers_report_kind_strategy_and_source():
    d = decide(ask(Tier.MEDIUM, source="header:x-session-id"), None, MODELS)
    h = d.headers()
    assert h["x-session-engine-decision"] == "initialize"
    assert h["x-session-engine-strategy"] == "adaptive"
    assert h["x-session-engine-session-source"] == "header:x-session-id"
    # The deprecated names, for this release: the same values.
    assert (h["x-session-decision"], h["x-session-strategy"], h["x-session-source"]) == (
        "initialize", "adaptive", "header:x-session-id")


@pytest.mark.parametrize(("kwargs", "field"), [({"strategy": "random"}, "strategy"),
                                               ({"warmup_turns": -1}, "warmup_turns"),
                                               ({"budget_mode": "lenient"}, "budget_mode"),
                                               ({"max_cost_usd": -1}, "max_cost_usd"),
                                               ({"deadline_s": 0}, "deadline_s")])
def test_bad_options_name_the_field(kwargs, field):
    with pytest.raises(InvalidEvent) as err:
        Options(**kwargs)
    assert err.value.field == field


def test_hash_event_is_always_recorded_for_a_message():
    d = decide(ask(Tier.MEDIUM), pinned("openai/gpt-4o", Tier.MEDIUM), MODELS)
    assert Hash("s", request_hash([{"role": "user", "content": "next step"}])) in d.events


def test_bypass_leaves_the_pinned_models_deployment_alone():
    pin, cheap = deployment_key("openai", "sk-pin"), deployment_key("openai", "sk-cheap")
    state = pinned("openai/o3", Tier.COMPLEX, deployment=pin)
    d = decide(ask(Tier.SIMPLE, "thanks", candidates=[cheap]), state, MODELS)
    assert (d.kind, d.deployment) == (Kind.BYPASS, cheap)
    # The bypass pins its own (model group, tier) deployment, never the pinned model's.
    assert [e for e in d.events if isinstance(e, SetDeployment)] == [
        SetDeployment("s", cheap, "openai/gpt-4o-mini", Tier.SIMPLE)]
    back = decide(ask(Tier.COMPLEX, candidates=[pin]), state, MODELS)
    assert (back.kind, back.deployment) == (Kind.RETAIN, pin)  # not a switch


def test_a_new_pin_records_its_deployment_without_calling_it_a_switch():
    old, new = deployment_key("openai", "sk-mid"), deployment_key("openai", "sk-strong")
    d = decide(ask(Tier.COMPLEX, candidates=[new]), pinned("openai/gpt-4o", Tier.MEDIUM, deployment=old), MODELS)
    assert (d.kind, d.deployment) == (Kind.UPGRADE, new)
    assert SetDeployment("s", new) in d.events and "switched" not in d.reason


def test_the_routers_candidates_serve_another_model_only_through_the_deployment_recorded_serving_it():
    # The router asks for its OpenAI model with its own deployments; the session is pinned to an Anthropic
    # model (escalated there, say): the router's candidates serve the router's model, not the pin's.
    mine = deployment_key("anthropic", "sk-a")
    state = pinned("anthropic/claude-opus", Tier.REASONING, deployment=mine)
    theirs = [deployment_key("openai", "sk-1"), deployment_key("openai", "sk-2")]
    d = decide(ask(Tier.MEDIUM, candidates=theirs), state, MODELS)
    assert (d.kind, d.model, d.deployment, d.candidates) == (Kind.RETAIN, "anthropic/claude-opus", "", ())
    assert not any(isinstance(e, SetDeployment) for e in d.events)
    # A key naming the pin's provider is no fact that it serves the pin's model: still none.
    other = deployment_key("anthropic", "sk-b")
    d = decide(ask(Tier.MEDIUM, candidates=[*theirs, other]), state, MODELS)
    assert (d.kind, d.deployment, d.candidates) == (Kind.RETAIN, "", ())
    # The deployment recorded serving the pin's model, listed by the router: that one, whatever its name.
    d = decide(ask(Tier.MEDIUM, candidates=[*theirs, mine]), state, MODELS)
    assert (d.kind, d.deployment, d.candidates) == (Kind.RETAIN, mine, (mine,))


def test_a_gone_deployment_switches_whatever_its_key_names():
    state = pinned("anthropic/claude-opus", Tier.REASONING, deployment=deployment_key("openai", "sk-1"))
    for key in ("rack-2", deployment_key("openrouter", "sk-or"), deployment_key("anthropic", "sk-a")):
        d = decide(Request(model="anthropic/claude-opus", tier=Tier.REASONING, session_id="s",
                           messages=[{"role": "user", "content": "go on"}], candidates=[key]), state, MODELS)
        assert (d.kind, d.deployment) == (Kind.SWITCH, key) and SetDeployment("s", key) in d.events


def test_a_pin_that_moves_to_another_model_without_its_deployments_leaves_the_old_one_behind():
    mid = deployment_key("openai", "sk-mid")
    state = pinned("openai/gpt-4o", Tier.MEDIUM, deployment=mid)
    up = decide(ask(Tier.MEDIUM, "LITELLM ESCALATE", candidates=[mid]), state, MODELS)
    assert (up.kind, up.model, up.deployment, up.candidates) == (Kind.ESCALATE, "openai/o3", "", ())
    assert up.events[-2] == SetDeployment("s", "")  # the pin has no deployment for o3 yet
    # Recorded so, the first deployment of the new model is recorded without calling it a switch.
    there = pinned("openai/o3", Tier.COMPLEX)
    new = deployment_key("openai", "sk-strong")
    d = decide(ask(Tier.COMPLEX, candidates=[new]), there, MODELS)
    assert (d.kind, d.deployment) == (Kind.RETAIN, new) and SetDeployment("s", new) in d.events
