"""The policy over a real store: decisions in the audit log, and requests that never fail."""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime

import pytest
from freezegun import freeze_time

import engine.shell.shard
from engine import Config, SessionStore, Tier
from engine.aio import AsyncSessionStore
from engine.core.transitions import apply as real_apply
from engine.identity import IdentityResolver, Scope
from engine.policy import AsyncPolicy, BudgetExceeded, Kind, Options, Policy, Request, deployment_key
from events import GetSession, Touch
from tests.conftest import read_log

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
MODELS = {
    Tier.SIMPLE: "openai/gpt-4o-mini",
    Tier.MEDIUM: "openai/gpt-4o",
    Tier.COMPLEX: ["openai/o3", "anthropic/claude-sonnet"],
    Tier.REASONING: "anthropic/claude-opus",
}
ROUTER = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3",
          Tier.REASONING: "anthropic/claude-opus"}


def req(sid: str, tier: Tier, text: str, **kw) -> Request:
    return Request(ROUTER[tier], tier, sid, [{"role": "user", "content": text}], **kw)


class Faults:
    """Stands in for the shard's ``apply``: stalls or crashes chosen sessions on purpose."""

    def __init__(self) -> None:
        self.stall: set[str] = set()
        self.crash: set[str] = set()
        self.release = threading.Event()
        self.stalled = threading.Event()

    def apply(self, state, event, now, config):
        sid = event.session_id
        if sid in self.crash:
            self.crash.discard(sid)
            raise RuntimeError("injected fault")
        if sid in self.stall and not self.release.is_set():
            self.stalled.set()
            self.release.wait(10)  # bounded: a forgotten release cannot hang the suite
        return real_apply(state, event, now, config)


@pytest.fixture
def faults(monkeypatch):
    """Shards bind ``apply`` when they start, so build stores after requesting this fixture."""
    f = Faults()
    monkeypatch.setattr(engine.shell.shard, "apply", f.apply)
    yield f
    f.release.set()


def decision_records(path, sid=None):
    return [r for r in read_log(path) if r["event"] == "decision.made" and (sid is None or r["session_id"] == sid)]


def ids_on_shards(store: SessionStore, base: str) -> tuple[str, str]:
    """One id on the same shard as ``base`` and one on another shard."""
    rt = store._rt
    same = next(f"peer-{i}" for i in range(1000) if rt.shard_of(f"peer-{i}") == rt.shard_of(base))
    other = next(f"far-{i}" for i in range(1000) if rt.shard_of(f"far-{i}") != rt.shard_of(base))
    return same, other


def test_every_decision_kind_reaches_the_audit_log_with_its_reason(make_store, log_path, faults):
    with freeze_time(T0):
        store = make_store(event_log=str(log_path), shards=2)
        policy = Policy(store, MODELS, Options(max_cost_usd=1.0, deadline_s=5.0))
        for tier, text in [(Tier.MEDIUM, "start"), (Tier.MEDIUM, "next"), (Tier.COMPLEX, "harder"),
                           (Tier.SIMPLE, "thanks"), (Tier.COMPLEX, "stuck"), (Tier.COMPLEX, "stuck"),
                           (Tier.COMPLEX, "stuck")]:
            policy.route(req("a", tier, text))
        k1, k2 = deployment_key("openai", "sk-1"), deployment_key("openai", "sk-2")
        policy.route(req("d", Tier.MEDIUM, "one", candidates=[k1, k2]))
        policy.route(req("d", Tier.MEDIUM, "two", candidates=[k2]))
        policy.record_cost("b", 1.0)
        with pytest.raises(BudgetExceeded) as refused:
            policy.route(req("b", Tier.COMPLEX, "big job", estimate_usd=0.5))
        assert (refused.value.spent_usd, refused.value.estimate_usd, refused.value.limit_usd) == (1.0, 0.5, 1.0)
        faults.stall.add("u")
        store.tell(Touch("u"))
        assert faults.stalled.wait(5)
        quick = Policy(store, MODELS, Options(deadline_s=0.05))
        assert quick.route(req("u", Tier.MEDIUM, "hello")).kind is Kind.UNAVAILABLE
        faults.release.set()
        store.ask(GetSession("u"), timeout=5)
        store.close()
    records = decision_records(log_path)
    assert {r["kind"] for r in records} == {k.value for k in Kind}
    assert [r["kind"] for r in records if r["session_id"] == "a"] == [
        "initialize", "retain", "upgrade", "bypass", "retain", "retain", "escalate"]
    assert all(r["reason"] and r["strategy"] for r in records)
    escalation = next(r for r in records if r["kind"] == "escalate")
    assert (escalation["tier"], escalation["model"]) == ("REASONING", "anthropic/claude-opus")
    assert any(r["event"] == "session.escalated" and r["session_id"] == "a" for r in read_log(log_path))


def test_stalled_shard_answers_within_the_deadline_then_recovers(make_store, log_path, faults, caplog):
    caplog.set_level(logging.WARNING, logger="engine.policy")
    with freeze_time(T0):
        store = make_store(event_log=str(log_path), shards=2)
        peer, far = ids_on_shards(store, "stalled")
        Policy(store, MODELS, Options(deadline_s=5.0)).route(req("stalled", Tier.MEDIUM, "start"))
        policy = Policy(store, MODELS, Options(deadline_s=0.1))

        faults.stall.add("stalled")
        store.tell(Touch("stalled"))
        assert faults.stalled.wait(5), "the shard never reached the stall"
        served = [policy.route(req("stalled", Tier.COMPLEX, f"turn {i}")) for i in range(5)]
        neighbour = policy.route(req(peer, Tier.MEDIUM, "hi"))  # queued behind the stall
        # another shard keeps working (a generous deadline: a loaded machine may take > 0.1 s to schedule it)
        elsewhere = Policy(store, MODELS, Options(deadline_s=5.0)).route(req(far, Tier.MEDIUM, "hi"))

        assert [d.kind for d in served] == [Kind.UNAVAILABLE] * 5
        assert all((d.model, d.tier) == ("openai/o3", Tier.COMPLEX) for d in served)  # the router's own choice
        assert neighbour.kind is Kind.UNAVAILABLE
        assert elsewhere.kind is Kind.INITIALIZE
        assert policy.unavailable_count == 6
        assert sum("engine unavailable" in r.getMessage() or "timeout" in r.getMessage()
                   for r in caplog.records if r.name == "engine.policy") == 6

        faults.release.set()
        # The Routes the callers stopped waiting for are still applied in the session's turn when the
        # shard gets to them (docs/policy.md): the first of them upgraded the pin, as the router asked.
        assert store.ask(GetSession("stalled"), timeout=5).model == "openai/o3"
        after = policy.route(req("stalled", Tier.COMPLEX, "after"))
        assert (after.kind, after.model) == (Kind.RETAIN, "openai/o3")
        assert policy.unavailable_count == 6
        store.close()
    kinds = [r["kind"] for r in decision_records(log_path, "stalled")]
    assert kinds == ["initialize", *["upgrade", "unavailable"], *["retain", "unavailable"] * 4, "retain"]


def test_crashing_shard_answers_unavailable_and_the_supervisor_restarts_it(make_store, log_path, faults):
    with freeze_time(T0):
        store = make_store(event_log=str(log_path), shards=2)
        policy = Policy(store, MODELS, Options(deadline_s=5.0))
        policy.route(req("c", Tier.MEDIUM, "start"))
        store.ask(GetSession("c"), timeout=5)  # the told events are applied before the fault is armed
        faults.crash.add("c")
        crashed = policy.route(req("c", Tier.COMPLEX, "boom"))
        assert crashed.kind is Kind.UNAVAILABLE and "ShardFailed" in crashed.reason
        # The mailbox outlives the shard: this ask is answered by the restarted incarnation.
        assert store.ask(GetSession("c"), timeout=5).model == "openai/gpt-4o"
        again = policy.route(req("c", Tier.COMPLEX, "boom again"))
        assert (again.kind, again.model) == (Kind.UPGRADE, "openai/o3")
        assert store._rt.restarts == 1
        store.close()
    log = read_log(log_path)
    assert any(r["event"] == "shard.restarted" for r in log)
    assert [r["kind"] for r in decision_records(log_path, "c")] == ["initialize", "unavailable", "upgrade"]


def test_adaptive_and_sticky_differ_on_the_same_conversation(make_store):
    with freeze_time(T0):
        store = make_store()
        adaptive = Policy(store, MODELS, Options(deadline_s=5.0))
        sticky = Policy(store, MODELS, Options(strategy="sticky", deadline_s=5.0))
        turns = [(Tier.MEDIUM, "plan"), (Tier.COMPLEX, "refactor"), (Tier.SIMPLE, "thanks"), (Tier.MEDIUM, "more")]
        got = {name: [p.route(req(name, t, text)).model for t, text in turns]
               for name, p in (("adaptive", adaptive), ("sticky", sticky))}
        assert got["adaptive"] == ["openai/gpt-4o", "openai/o3", "openai/gpt-4o-mini", "openai/o3"]
        assert got["sticky"] == ["openai/gpt-4o"] * 4
        assert store.get_session("adaptive").tier is Tier.COMPLEX
        assert store.get_session("sticky").tier is Tier.MEDIUM


def test_warmup_turns_stay_unpinned_then_commit(make_store):
    with freeze_time(T0):
        store = make_store()
        policy = Policy(store, MODELS, Options(warmup_turns=2, simple_bypass=False, deadline_s=5.0))
        turns = [(Tier.COMPLEX, "a"), (Tier.SIMPLE, "b"), (Tier.MEDIUM, "c"), (Tier.SIMPLE, "d")]
        decisions = [policy.route(req("w", t, text)) for t, text in turns]
        assert [d.kind for d in decisions] == [Kind.BYPASS, Kind.BYPASS, Kind.INITIALIZE, Kind.RETAIN]
        assert [d.model for d in decisions] == ["openai/o3", "openai/gpt-4o-mini", "openai/gpt-4o", "openai/gpt-4o"]
        entry = store.get_session("w")
        assert (entry.model, entry.tier, entry.request_count) == ("openai/gpt-4o", Tier.MEDIUM, 4)


def test_deployment_affinity_follows_what_served_and_switches_when_it_is_gone(make_store):
    a, b = deployment_key("openai", "sk-a"), deployment_key("openai", "sk-b", "https://eu.example")
    with freeze_time(T0):
        store = make_store()
        policy = Policy(store, MODELS, Options(deadline_s=5.0))
        first = policy.route(req("k", Tier.MEDIUM, "1", candidates=[a, b]))
        assert first.candidates == (a, b)
        policy.record_response("k", cost_usd=0.001, deployment=b)  # the router's fallback served it
        second = policy.route(req("k", Tier.MEDIUM, "2", candidates=[a, b]))
        assert (second.kind, second.candidates) == (Kind.RETAIN, (b, a))
        third = policy.route(req("k", Tier.MEDIUM, "3", candidates=[a]))  # b was removed
        assert (third.kind, third.deployment) == (Kind.SWITCH, a)
        assert store.get_session("k").deployment == a
        cheap = policy.route(req("k", Tier.SIMPLE, "thanks", candidates=[b]))
        policy.record_response("k", deployment=b, decision=cheap)  # a bypass served it: the pin keeps a
        assert store.get_session("k").deployment == a


def test_cost_is_recorded_in_micros_and_feeds_the_budget(make_store):
    with freeze_time(T0):
        store = make_store()
        policy = Policy(store, MODELS, Options(max_cost_usd=0.05, budget_mode="strict", deadline_s=5.0))
        first = policy.route(req("m", Tier.MEDIUM, "1", estimate_usd=0.01))
        assert store.get_session("m").reserved_micros == 10_000  # the estimate is held until settled
        policy.record_response("m", cost_usd=0.0123, decision=first)  # settles: replaces the estimate
        policy.record_response("m", micros=30_000)
        entry = store.get_session("m")
        assert (entry.session_cost_micros, entry.reserved_micros) == (42_300, 0)
        second = policy.route(req("m", Tier.MEDIUM, "2", estimate_usd=0.007))
        assert second.kind is Kind.RETAIN
        with pytest.raises(BudgetExceeded):  # 42,300 spent + 7,000 held + 800 > 50,000
            policy.route(req("m", Tier.MEDIUM, "3", estimate_usd=0.0008))
        policy.release(second)  # the call failed: its hold is given back
        assert policy.route(req("m", Tier.MEDIUM, "3", estimate_usd=0.0077)).kind is Kind.RETAIN


def test_missing_session_header_uses_a_keyed_fingerprint(make_store):
    with freeze_time(T0):
        store = make_store()
        policy = Policy(store, MODELS, Options(deadline_s=5.0), identity=IdentityResolver(secret="k"))
        scope = Scope("policy-test-secret-0123")
        x = policy.route(Request("openai/gpt-4o", Tier.MEDIUM, messages=[{"role": "user", "content": "hi"}],
                                 tenant=scope.tenant("alice")))
        y = policy.route(Request("openai/gpt-4o", Tier.MEDIUM, messages=[{"role": "user", "content": "hi"}],
                                 tenant=scope.tenant("bob")))
        assert x.source == y.source == "fingerprint"
        assert x.session_id != y.session_id
        assert x.kind is y.kind is Kind.INITIALIZE  # bob did not inherit alice's session


def test_disabled_store_serves_the_routers_choice():
    with SessionStore(Config()) as store:
        d = Policy(store, MODELS).route(req("s", Tier.COMPLEX, "x"))
    assert (d.kind, d.model, d.reason) == (Kind.BYPASS, "openai/o3", "session store disabled")


def test_async_policy_routes_and_survives_a_stalled_shard(faults):
    async def main() -> list[Kind]:
        async with AsyncSessionStore(SessionStore(Config(enabled=True, tick_ms=0, shards=2))) as a:
            policy = AsyncPolicy(a, MODELS, Options(deadline_s=0.1))
            kinds = [(await policy.route(req("s", Tier.MEDIUM, "1"))).kind,
                     (await policy.route(req("s", Tier.MEDIUM, "2"))).kind]
            faults.stall.add("s")
            a.store.tell(Touch("s"))
            await asyncio.to_thread(faults.stalled.wait, 5)
            kinds.append((await policy.route(req("s", Tier.MEDIUM, "3"))).kind)
            faults.release.set()
            await a.ask(GetSession("s"), timeout=5)
            kinds.append((await policy.route(req("s", Tier.COMPLEX, "4"))).kind)
            await policy.record_cost("s", 0.5)
            assert (await a.get_session("s")).session_cost_micros == 500_000
            assert policy.unavailable_count == 1
            return kinds

    assert asyncio.run(main()) == [Kind.INITIALIZE, Kind.RETAIN, Kind.UNAVAILABLE, Kind.UPGRADE]


def test_rejected_explicit_id_is_not_replaced_by_a_fingerprint(make_store):
    from engine.identity import IdentityResolver
    from engine.policy import Policy, Request

    store = make_store()
    policy = Policy(store, {"SIMPLE": "cheap", "MEDIUM": "mid", "COMPLEX": "big", "REASONING": "deep"},
                    identity=IdentityResolver())
    request = Request(model="mid", tier="MEDIUM", messages=({"role": "user", "content": "hi"},),
                      source="invalid:header")
    decision = policy.route(request)
    assert decision.session_id == ""
    assert store.get_stats().count == 0


def test_policy_fingerprint_matches_the_identity_chain_for_anthropic_bodies(make_store):
    from engine.identity import IdentityResolver
    from engine.policy import Policy, Request

    resolver = IdentityResolver(secret=b"k")
    body = {"system": "You are terse.", "messages": [{"role": "user", "content": "fix the bug"}]}
    chain_id, source = resolver.resolve({}, body)
    assert source == "fingerprint"
    policy = Policy(make_store(), {"MEDIUM": "mid"}, identity=resolver)
    decision = policy.route(Request(model="mid", tier="MEDIUM", messages=body["messages"], system=body["system"]))
    assert decision.session_id == chain_id


def test_a_timed_out_route_under_a_cap_releases_its_reservation_when_applied_late(make_store, log_path, faults):
    with freeze_time(T0):
        store = make_store(event_log=str(log_path))
        Policy(store, MODELS, Options(deadline_s=5.0)).route(req("late", Tier.MEDIUM, "start"))
        policy = Policy(store, MODELS, Options(max_cost_usd=1.0, deadline_s=0.05))
        faults.stall.add("late")
        store.tell(Touch("late"))
        assert faults.stalled.wait(5), "the shard never reached the stall"
        d = policy.route(req("late", Tier.MEDIUM, "again", estimate_usd=0.4))
        assert d.kind is Kind.UNAVAILABLE and d.reservation_id == ""
        faults.release.set()
        entry = store.ask(GetSession("late"), timeout=5)
        assert entry.reservations == () and entry.request_count == 3  # applied late, nothing held
        store.close()
    names = [r["event"] for r in read_log(log_path) if r["session_id"] == "late"]
    assert names.index("budget.reserved") < names.index("budget.released")
