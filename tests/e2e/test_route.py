"""The routing turn: decide, reserve and settle in the session's own turn."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Config, Entry, Tier, replay
from engine.aio import AsyncSessionStore
from engine.core.rules import RULES, Draft, budget, decide_route, first_pin, never_downgrade
from engine.policy import (
    STALL_ERRORS,
    AsyncPolicy,
    BudgetExceeded,
    Kind,
    Options,
    Policy,
    Request,
    tool_error_run,
)
from events import Route, RouteRules, SetSession
from tests.conftest import read_log

T0 = "2025-03-01 09:00:00"
MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3"}
N = 8


def req(sid: str, tier: Tier = Tier.MEDIUM, text: str = "hi", **kw) -> Request:
    model = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3"}[tier]
    return Request(model=model, tier=tier, session_id=sid, messages=[{"role": "user", "content": text}], **kw)


def decisions(log: Path, sid: str) -> list[dict]:
    return [r for r in read_log(log) if r["event"] == "decision.made" and r["session_id"] == sid]


# -- concurrency: one session, many first requests --------------------------------------------
def test_eight_threads_routing_a_first_request_at_once_pin_once(make_store, log_path):
    store = make_store(event_log=str(log_path), shards=2)
    policy = Policy(store, MODELS, Options(deadline_s=10.0))
    start = threading.Barrier(N)
    kinds: list[Kind] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        start.wait()
        d = policy.route(req("race", Tier.MEDIUM, f"request {i}"))
        with lock:
            kinds.append(d.kind)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pinned = store.get_session("race")
    store.close()
    assert sorted(kinds) == sorted([Kind.INITIALIZE] + [Kind.RETAIN] * (N - 1))
    records = read_log(log_path)
    assert [r["event"] for r in records if r["session_id"] == "race"].count("session.created") == 1
    assert sum(1 for r in records if r["session_id"] == "race" and "model" in r
               and r["event"] in ("session.created", "session.updated")) == 1  # one pin, never moved
    assert [d["kind"] for d in decisions(log_path, "race")].count("initialize") == 1
    assert pinned.request_count == N and pinned.model == next(
        d["model"] for d in decisions(log_path, "race") if d["kind"] == "initialize")


def test_eight_asyncio_tasks_routing_a_first_request_at_once_pin_once(make_store, log_path):
    store = make_store(event_log=str(log_path))
    policy = AsyncPolicy(AsyncSessionStore(store), MODELS, Options(deadline_s=10.0))

    async def run() -> list[Kind]:
        out = await asyncio.gather(*(policy.route(req("tasks", Tier.MEDIUM, f"r{i}")) for i in range(N)))
        return [d.kind for d in out]

    kinds = asyncio.run(run())
    entry = store.get_session("tasks")
    store.close()
    assert sorted(kinds) == sorted([Kind.INITIALIZE] + [Kind.RETAIN] * (N - 1))
    assert entry.model == "openai/gpt-4o" and entry.request_count == N
    assert [d["kind"] for d in decisions(log_path, "tasks")].count("initialize") == 1


# -- budget reservations ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["strict", "graceful"])
def test_concurrent_calls_never_serve_more_than_the_cap_holds(make_store, mode):
    cap, estimate = 0.02, 0.005  # room for exactly 4 calls
    store = make_store(shards=2)
    policy = Policy(store, {Tier.MEDIUM: "openai/gpt-4o"}, Options(max_cost_usd=cap, budget_mode=mode,
                                                                  deadline_s=10.0))
    start = threading.Barrier(N)
    served: list = []
    refused: list = []
    lock = threading.Lock()

    def one(i: int) -> None:
        start.wait()
        try:
            d = policy.route(req("capped", Tier.MEDIUM, f"r{i}", estimate_usd=estimate))
        except BudgetExceeded:
            with lock:
                refused.append(i)
            return
        with lock:
            served.append(d)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(served) == int(cap / estimate) and len(refused) == N - len(served)
    for d in served:  # each call costs at most its estimate
        policy.record_response("capped", cost_usd=0.004, decision=d)
    entry = store.get_session("capped")
    assert entry.session_cost_micros == 16_000 <= 20_000 and entry.reservations == ()


def test_sequential_calls_refuse_the_one_that_would_pass_the_cap(make_store):
    store = make_store()
    policy = Policy(store, MODELS, Options(max_cost_usd=0.02, budget_mode="strict", deadline_s=10.0))
    served = 0
    with pytest.raises(BudgetExceeded) as refused:
        for i in range(10):
            d = policy.route(req("seq", Tier.MEDIUM, f"r{i}", estimate_usd=0.005))
            policy.record_response("seq", cost_usd=0.005, decision=d)
            served += 1
    assert served == 4 and refused.value.spent_usd == pytest.approx(0.02)
    assert store.get_session("seq").session_cost_micros == 20_000


def test_graceful_budget_downgrades_with_per_model_estimates_and_holds_the_cheap_estimate(make_store):
    prices = {"openai/o3": 0.01, "openai/gpt-4o": 0.004, "openai/gpt-4o-mini": 0.001}
    store = make_store()
    policy = Policy(store, MODELS, Options(max_cost_usd=0.01, estimator=lambda m, r: prices[m], deadline_s=10.0))
    first = policy.route(req("g", Tier.MEDIUM, "one"))
    second = policy.route(req("g", Tier.MEDIUM, "two"))
    third = policy.route(req("g", Tier.MEDIUM, "three"))  # 0.008 held + 0.004 > 0.01: the cheap tier fits
    assert (first.kind, second.kind) == (Kind.INITIALIZE, Kind.RETAIN)
    assert (third.kind, third.model, third.estimate_usd) == (Kind.BYPASS, "openai/gpt-4o-mini", 0.001)
    entry = store.get_session("g")
    assert entry.model == "openai/gpt-4o" and entry.reserved_micros == 9_000  # pin kept, cheap estimate held


def test_an_unsettled_reservation_lapses_after_its_ttl_and_frees_the_budget(make_store, log_path):
    with freeze_time(T0) as frozen:
        store = make_store(event_log=str(log_path))
        policy = Policy(store, MODELS, Options(max_cost_usd=0.01, budget_mode="strict", reservation_ttl_ms=60_000,
                                               deadline_s=10.0))
        policy.route(req("crash", Tier.MEDIUM, "1", estimate_usd=0.01))  # the caller crashes: never settled
        with pytest.raises(BudgetExceeded):
            policy.route(req("crash", Tier.MEDIUM, "2", estimate_usd=0.01))
        frozen.tick(timedelta(milliseconds=60_000))
        assert policy.route(req("crash", Tier.MEDIUM, "3", estimate_usd=0.01)).kind is Kind.RETAIN  # lapsed lazily
        frozen.tick(timedelta(milliseconds=60_000))
        store.tick()  # and by the clock's deadline heap
        assert store.get_session("crash").reservations == ()
        store.close()
    lapses = [r for r in read_log(log_path) if r["event"] == "budget.lapsed"]
    assert [r["micros"] for r in lapses] == [10_000, 10_000] and lapses[0]["reservations"] == []


def test_a_failed_call_releases_its_reservation_and_a_late_settle_just_adds(make_store):
    store = make_store()
    policy = Policy(store, MODELS, Options(max_cost_usd=1.0, deadline_s=10.0))
    d = policy.route(req("f", Tier.MEDIUM, estimate_usd=0.5))
    policy.release(d)
    assert store.get_session("f").reserved_micros == 0
    policy.record_response("f", cost_usd=0.1, decision=d)  # its reservation is gone: the cost still counts
    assert store.get_session("f").session_cost_micros == 100_000


def test_without_a_cap_nothing_is_reserved(make_store, log_path):
    store = make_store(event_log=str(log_path))
    policy = Policy(store, MODELS, Options(deadline_s=10.0))
    d = policy.route(req("free", Tier.MEDIUM, estimate_usd=0.5))
    store.close()
    assert d.reservation_id == "" and d.limit_usd is None
    assert not any(r["event"].startswith("budget.") for r in read_log(log_path))


def test_replay_and_restart_with_open_reservations_match_the_live_store(make_store, log_path):
    with freeze_time(T0) as frozen:
        store = make_store(event_log=str(log_path))
        policy = Policy(store, MODELS, Options(max_cost_usd=1.0, reservation_ttl_ms=60_000, deadline_s=10.0))
        done = policy.route(req("r", Tier.MEDIUM, "1", estimate_usd=0.1))
        policy.route(req("r", Tier.MEDIUM, "2", estimate_usd=0.2))  # stays open
        policy.record_response("r", cost_usd=0.05, decision=done)
        policy.route(req("other", Tier.COMPLEX, "x", estimate_usd=0.3))
        live = {sid: store.get_session(sid) for sid in ("r", "other")}
        store.close()
        assert live["r"].reserved_micros == 200_000 and live["r"].session_cost_micros == 50_000
        assert replay(log_path) == live
        restarted = make_store(event_log=str(log_path))
        assert {sid: restarted.get_session(sid) for sid in live} == live
        frozen.tick(timedelta(milliseconds=60_001))
        restarted.tick()  # restored reservations keep their deadlines
        assert restarted.get_session("r").reservations == () and restarted.get_session("other").reservations == ()


def test_audit_shows_open_reservations(make_store, log_path):
    from engine.tools.audit import lives, timeline

    store = make_store(event_log=str(log_path))
    Policy(store, MODELS, Options(max_cost_usd=1.0, deadline_s=10.0)).route(req("a", estimate_usd=0.25))
    store.close()
    (life,) = lives(read_log(log_path))
    assert life.to_json()["reserved_micros"] == 250_000 and life.reservations[0][1] == 250_000
    assert any("budget reserved: $0.25" in step["text"] for step in timeline(read_log(log_path), "a"))


# -- stall signals -----------------------------------------------------------------------
def failing_tool_turns(n: int, name: str = "run_tests", args: str = '{"path": "."}') -> list[dict]:
    messages: list[dict] = [{"role": "user", "content": "fix the build"}]
    for i in range(n):
        messages.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": args}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": "Error: 3 tests failed"})
    return messages


def test_the_same_tool_call_failing_n_times_in_a_row_is_a_stall():
    assert tool_error_run(failing_tool_turns(STALL_ERRORS)) == STALL_ERRORS
    assert tool_error_run(failing_tool_turns(2)) == 2
    mixed = failing_tool_turns(2) + failing_tool_turns(1, args='{"path": "src"}')[1:]
    assert tool_error_run(mixed) == 1  # another call (other arguments) breaks the run
    ok = [*failing_tool_turns(3)[:-1], {"role": "tool", "tool_call_id": "c2", "content": "all passed"}]
    assert tool_error_run(ok) == 0
    anthropic = [{"role": "user", "content": "go"}]
    for i in range(3):
        anthropic += [{"role": "assistant", "content": [{"type": "tool_use", "id": f"t{i}", "name": "sh",
                                                         "input": {"cmd": "make"}}]},
                      {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{i}",
                                                    "is_error": True, "content": "exit 2"}]}]
    assert tool_error_run(anthropic) == 3


def test_a_stall_signal_counts_a_strike_even_with_a_new_hash(make_store):
    store = make_store()
    policy = Policy(store, MODELS, Options(deadline_s=10.0, strike_limit=1))
    policy.route(req("stall", Tier.MEDIUM, "start"))
    stalled = Request(model="openai/gpt-4o", tier=Tier.MEDIUM, session_id="stall",
                      messages=failing_tool_turns(STALL_ERRORS))
    d = policy.route(stalled)
    assert d.kind is Kind.ESCALATE and d.tier is Tier.COMPLEX
    assert store.get_session("stall").strikes == 1


# -- the rules, alone and as properties ---------------------------------------------------------
RULES_TABLE = RouteRules(models=(("SIMPLE", ("s",)), ("MEDIUM", ("m",)), ("COMPLEX", ("c",))))


def route(**kw) -> Route:
    fields = {"session_id": "p", "model": "m", "tier": "MEDIUM", "rules": RULES_TABLE}
    fields.update(kw)
    return Route(**fields)


def test_the_rules_run_in_one_visible_order():
    names = [rule.__name__ for _, rules in RULES for rule in rules]
    assert names == ["strategy_none", "explicit_pin", "keyword", "warmup", "first_pin", "strikes", "never_downgrade",
                     "cache_stickiness", "budget", "deployment_affinity"]


def test_first_pin_rule_alone():
    d = Draft()
    assert first_pin(route(), None, d, Config())
    assert (d.kind, d.model, [type(e) for e in d.events]) == ("initialize", "m", [SetSession])
    assert not first_pin(route(), None, Draft(pinned=Entry("c", Tier.COMPLEX, 0, 0, 1), turn=2), Config())


def test_never_downgrade_rule_alone_keeps_a_higher_pin():
    d = Draft(pinned=Entry("c", Tier.COMPLEX, 0, 0, 1), turn=2)
    assert never_downgrade(route(), d.pinned, d, Config())
    assert (d.kind, d.model) == ("retain", "c")


def test_budget_rule_alone_counts_open_reservations():
    state = Entry("m", Tier.MEDIUM, 0, 0, 1, session_cost_micros=300, reservations=(("x", 600, 10),))
    rules = RouteRules(models=RULES_TABLE.models, max_cost_micros=1_000, budget_mode="strict")
    d = Draft(kind="retain", model="m", tier=Tier.MEDIUM, pinned=state)
    budget(route(rules=rules, estimates=(("", 200),), reservation_id="r"), state, d, Config())
    assert d.refused and d.kind == "refuse" and d.events == []


entries = st.builds(
    Entry, st.sampled_from(["", "s", "m", "c"]), st.sampled_from([None, Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX]),
    st.just(0), st.just(0), st.integers(0, 5), recent_hashes=st.lists(st.sampled_from("ab"), max_size=3).map(tuple),
    strikes=st.integers(0, 3), escalated=st.booleans(), user_explicit=st.booleans(),
    session_cost_micros=st.integers(0, 2_000),
    reservations=st.lists(st.tuples(st.just("o"), st.integers(1, 500), st.just(10**9)), max_size=3).map(tuple))
routes = st.builds(
    route, model=st.sampled_from(["s", "m", "c"]), tier=st.sampled_from(["SIMPLE", "MEDIUM", "COMPLEX"]),
    rules=st.builds(RouteRules, models=st.just(RULES_TABLE.models),
                    strategy=st.sampled_from(["sticky", "adaptive", "none"]), warmup_turns=st.integers(0, 2),
                    max_cost_micros=st.sampled_from([-1, 0, 1_000, 3_000]),
                    budget_mode=st.sampled_from(["graceful", "strict"])),
    user_explicit=st.booleans(), request_hash=st.sampled_from(["", "a", "b"]), stall=st.booleans(),
    tools=st.booleans(), estimates=st.lists(st.tuples(st.sampled_from(["", "s", "m", "c"]),
                                                       st.integers(0, 1_500)), max_size=4).map(tuple),
    reservation_id=st.just("r"))


@settings(max_examples=300, deadline=None)
@given(state=st.one_of(st.none(), entries), ev=routes)
def test_rule_properties(state, ev):
    routed, events = decide_route(state, ev, Config())
    limit = ev.rules.max_cost_micros
    committed = (state.session_cost_micros + state.reserved_micros) if state is not None else 0
    if routed.kind == "refuse":
        assert events == [] and limit >= 0  # a refusal changes nothing, and only a budget refuses
    elif limit >= 0:
        assert committed + routed.estimate_micros <= limit  # nothing served past the cap
    if ev.rules.strategy == "none":
        assert routed.kind in ("bypass", "refuse") and not any(type(e) is SetSession for e in events)
    if (routed.kind == "bypass" and state is not None and state.model
            and state.request_count >= ev.rules.warmup_turns):
        assert not any(type(e) is SetSession for e in events)  # a bypass after warmup keeps the pin


def test_the_route_transition_applies_the_decisions_events_in_the_same_turn(make_store, log_path):
    store = make_store(event_log=str(log_path))
    out = store.ask(route(session_id="turn", request_hash="a"))
    store.close()
    assert out.kind == "initialize"
    names = [r["event"] for r in read_log(log_path) if r["session_id"] == "turn"]
    assert names == ["session.created", "hash.recorded", "decision.made"]
    seqs = [r["seq"] for r in read_log(log_path)]
    assert seqs == sorted(seqs)


def test_a_bad_route_event_is_rejected_naming_the_field():
    from events import InvalidEvent

    with pytest.raises(InvalidEvent, match="reservation_id"):
        route(rules=RouteRules(max_cost_micros=10))
    with pytest.raises(InvalidEvent, match="estimates"):
        route(estimates=(("m", -1),))
    with pytest.raises(InvalidEvent, match="rules"):
        route(rules={"strategy": "none"})


def test_an_absurd_or_failing_estimator_never_fails_the_request(make_store):
    store = make_store()

    def broken(model: str, request: Request) -> float:
        if model == "openai/gpt-4o-mini":
            raise RuntimeError("price service down")
        return 1e30 if model == "openai/o3" else float("nan")

    policy = Policy(store, MODELS, Options(max_cost_usd=1.0, estimator=broken, deadline_s=10.0))
    d = policy.decide(req("est", Tier.MEDIUM, estimate_usd=0.01))
    assert d.kind is Kind.INITIALIZE and d.estimate_usd == 0.01  # nan: the request's own estimate
    assert policy.decide(req("est", Tier.COMPLEX)).kind is Kind.REFUSE  # a billion dollars never fits


def test_a_log_of_routed_turns_settlements_and_releases_passes_strict_verification(make_store, log_path):
    from engine.log.verify import verify

    store = make_store(event_log=str(log_path))
    policy = Policy(store, MODELS, Options(max_cost_usd=1.0, deadline_s=10.0))
    first = policy.route(req("v", Tier.MEDIUM, tools=[{"type": "function"}], estimate_usd=0.1,
                             candidates=["d1", "d2"]))
    policy.record_response("v", cost_usd=0.0, decision=first, prompt_tokens=3, completion_tokens=4)  # a free call
    policy.release(policy.route(req("v", Tier.MEDIUM, estimate_usd=0.1)))
    store.close()
    report = verify(log_path)
    assert report.to_json()["ok"], report.to_json()["problem"]
    names = {r["event"] for r in read_log(log_path)}
    assert {"budget.reserved", "budget.released", "cost.added", "decision.made"} <= names
