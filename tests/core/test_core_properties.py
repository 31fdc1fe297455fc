"""Property tests of the pure core, ``engine.core.transitions.apply``: random sequences of every session event under a
moving clock.

Every property asserts on every step it names, never inside an ``if`` that could skip it: a step's
precondition is part of the asserted implication and each example must meet it at least once (``assume``),
so no property passes on examples that never exercise it. ``test_the_strategies_reach_every_event_and_outcome``
checks that the strategies produce every event type of ``events.SESSION_EVENTS`` and the outcomes the
properties are about (each decision kind, a switch, a refusal, a reservation released and lapsed, an
eviction kept and done, an expiry); ``event()`` reports them in hypothesis' statistics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from engine.core.config import Config
from engine.core.entry import Entry
from engine.core.kinds import Kind
from engine.core.transitions import Outcome, apply
from events import (
    SESSION_EVENTS,
    Clear,
    Cost,
    Decision,
    Escalate,
    Evict,
    Expire,
    GetCost,
    GetSession,
    Hash,
    IsCacheSticky,
    Release,
    Route,
    RouteRules,
    SessionEvent,
    SetCacheSticky,
    SetDeployment,
    SetSession,
    Tier,
    Touch,
)

SID = "s"
MODELS = ("m1", "m2", "vllm/x")
DEPLOYMENTS = ("d1", "d2", "d3")
tiers = st.sampled_from([None, *Tier])
#: The tier table every Route carries: one model per tier, so SetSession's models are the table's too.
TABLE = ((Tier.SIMPLE.value, ("m1",)), (Tier.MEDIUM.value, ("m2",)), (Tier.COMPLEX.value, ("vllm/x",)),
         (Tier.REASONING.value, ("m2", "m1")))
rules = st.builds(
    RouteRules, st.just(TABLE), strategy=st.sampled_from(["adaptive", "adaptive", "adaptive", "sticky", "none"]),
    simple_bypass=st.booleans(), warmup_turns=st.sampled_from([0, 0, 1]),
    max_cost_micros=st.sampled_from([-1, -1, -1, 0, 2_000, 50_000]),
    budget_mode=st.sampled_from(["graceful", "strict"]),
    reservation_ttl_ms=st.sampled_from([600_000, 1_000]), stall_detector=st.sampled_from(["window", "strikes"]))
routes = st.builds(
    Route, st.just(SID), st.sampled_from(MODELS), st.sampled_from([Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX,
                                                                   Tier.REASONING, None]), rules,
    user_explicit=st.sampled_from([False, False, False, True]),
    request_hash=st.sampled_from(["", "h1", "h1", "h2"]), tools=st.booleans(),
    # A deployment that served may be gone from the next turn's candidates (a switch).
    candidates=st.sampled_from([("d1",), ("d1", "d2"), ("d2",), ("d2", "d3"), ("d3",), ()]),
    estimates=st.sampled_from([(("", 1_000),), (), (("", 30_000),)]), reservation_id=st.just("route"),
    keyword=st.sampled_from(["", "", "", "LITELLM ESCALATE"]))
#: Evict's last_used_at: -1 (unconditional), or a placeholder ``run`` replaces with what the evictor saw:
#: EVICT_CURRENT the session's own (it goes), EVICT_STALE an older one (used since: it stays).
EVICT_CURRENT, EVICT_STALE = 0, 1
#: A reservation id ``run`` replaces with the oldest one the session holds (when it holds one).
HELD = "held"
set_sessions = st.builds(SetSession, st.just(SID), st.sampled_from(MODELS), tiers, st.booleans())
#: Every session event; Route four times over, as the routing turn is most of a session's life (one_of would
#: take each strategy once).
EVENT_STRATEGIES = (
    routes, routes, routes, routes, set_sessions,
    st.builds(GetSession, st.just(SID)),
    st.builds(Touch, st.just(SID)),
    st.builds(Hash, st.just(SID), st.sampled_from(["a", "b"]), st.booleans()),
    st.builds(Escalate, st.just(SID)),
    st.builds(Cost, st.just(SID), st.integers(0, 10**6), st.sampled_from(["", HELD, "r1", "r9"])),
    st.builds(GetCost, st.just(SID)),
    st.builds(SetCacheSticky, st.just(SID), st.sampled_from(["openai", "vllm"])),
    st.builds(IsCacheSticky, st.just(SID)),
    st.builds(SetDeployment, st.just(SID), st.sampled_from(DEPLOYMENTS),
              st.sampled_from(["", "", *MODELS]), tiers),
    st.builds(Decision, st.just(SID), st.sampled_from([k.value for k in Kind]), st.sampled_from(["", *MODELS])),
    st.builds(Expire, st.just(SID)),
    st.builds(Clear, st.just(SID)),
    st.builds(Evict, st.just(SID), st.sampled_from([-1, EVICT_CURRENT, EVICT_STALE])),
    st.builds(Release, st.just(SID), st.sampled_from([HELD, "r9"])),
    st.builds(Release, st.just(SID), st.just(HELD)),  # twice: a reservation is often settled or lapsed first
)
events = st.sampled_from(range(len(EVENT_STRATEGIES))).flatmap(EVENT_STRATEGIES.__getitem__)
# Some gaps pass a cache pin's TTL (300 s or 600 s) and some the longest timeout below: without them no
# cache pin or session ever expired and the properties about endings held vacuously.
gaps = st.sampled_from([0, 1_000, 60_000, 200_000, 400_000, 700_000, 3_600_001]) | st.integers(0, 4_000_000)
steps = st.lists(st.tuples(events, gaps), min_size=12, max_size=40)
#: Steps that start with a pin (a user-explicit one with ``explicit_steps``): properties about a session's
#: life need one, and a random prefix would mostly end it first.
pinned_steps = st.tuples(st.tuples(set_sessions, gaps), steps).map(lambda t: [t[0], *t[1]])
explicit_steps = st.tuples(st.tuples(st.builds(SetSession, st.just(SID), st.sampled_from(MODELS), tiers,
                                               st.just(True)), st.just(0)), steps).map(lambda t: [t[0], *t[1]])
configs = st.builds(Config, enabled=st.just(True), timeout_ms=st.sampled_from([1_000_000, 3_600_000]),
                    auto_escalate=st.booleans(), strike_limit=st.integers(1, 3))
ENDINGS = {"session.expired", "session.cleared", "session.evicted"}
READS = (GetSession, GetCost, IsCacheSticky, Expire)


def run(config: Config, sequence: list[tuple[SessionEvent, int]]
        ) -> Iterator[tuple[Entry | None, SessionEvent, int, Outcome]]:
    """Yield (before, event, now, outcome) along one session's life, time moving forward."""
    state, now = None, 1_700_000_000_000
    for step, (ev, gap) in enumerate(sequence):
        now += gap
        if type(ev) is Route:  # each request's reservation has its own id, as the policy's do
            ev = replace(ev, reservation_id=f"route-{step}")
        if type(ev) is Evict and ev.last_used_at >= 0:
            seen = state.last_used_at if state is not None else 0
            ev = Evict(SID, seen if ev.last_used_at == EVICT_CURRENT else seen - 1)
        if type(ev) in (Release, Cost) and ev.reservation_id == HELD and state is not None and state.reservations:
            rid = state.reservations[0][0]
            ev = Release(SID, rid) if type(ev) is Release else Cost(SID, ev.micros, rid)
        out = apply(state, ev, now, config)
        for label in sorted(labels(state, ev, now, out)):
            event(label)  # hypothesis' statistics show what each property's examples exercised
        yield state, ev, now, out
        state = out.state


def settled(before: Entry | None, now: int, config: Config) -> Entry | None:
    """The session as an event at ``now`` finds it (idle expiry, a cache pin's end, lapsed reservations
    applied first): what a read returns."""
    return apply(before, GetSession(SID), now, config).state


def same_life(before: Entry | None, out: Outcome) -> bool:
    """The step kept the session it found: not ended (an idle expiry may keep a budget ledger, and its
    ``created_at``, for the session's next life), nor created anew."""
    return (before is not None and out.state is not None and out.state.created_at == before.created_at
            and not any(name in ENDINGS for name, _ in out.records))


def labels(before: Entry | None, ev: SessionEvent, now: int, out: Outcome) -> set[str]:
    """What one step did, as coverage labels (also reported with ``event()``)."""
    names = {name for name, _ in out.records}
    found = {type(ev).__name__} | {f"record:{n}" for n in names}
    if type(ev) is Route and hasattr(out.result, "kind"):
        found.add(f"route:{out.result.kind.value}")
    if type(ev) is Release:
        found.add(f"release:{'open' if out.result else 'none'}")
    if type(ev) is Evict:
        found.add("evict:ended" if before is not None and out.state is None else
                  "evict:kept" if out.state is not None and before is not None else "evict:none")
    if same_life(before, out):
        found.add("same-life")
    return found


@settings(max_examples=120, deadline=None)
@given(configs, steps)
def test_cost_strikes_turns_and_use_never_decrease_within_a_session(config, sequence):
    checked = 0
    for before, ev, _now, out in run(config, sequence):
        same = same_life(before, out)
        checked += same
        assert not same or out.state.session_cost_micros >= before.session_cost_micros, ev
        assert not same or out.state.strikes >= before.strikes, ev
        assert not same or out.state.request_count >= before.request_count, ev
        assert not same or out.state.last_used_at >= before.last_used_at, ev
    assume(checked)


@settings(max_examples=120, deadline=None)
@given(configs, pinned_steps)
def test_tier_changes_only_by_escalation_or_a_model_change(config, sequence):
    checked = 0
    for before, ev, _now, out in run(config, sequence):
        moved = same_life(before, out) and out.state.tier != before.tier
        checked += moved
        names = [name for name, _ in out.records]
        assert not moved or "session.escalated" in names or out.state.model != before.model, (ev, names)
    assume(checked)


@settings(max_examples=120, deadline=None)
@given(configs, explicit_steps)
def test_a_user_explicit_session_is_never_escalated(config, sequence):
    checked = 0
    for before, ev, _now, out in run(config, sequence):
        held = same_life(before, out) and before.user_explicit and out.state.user_explicit
        checked += held
        assert not held or all(name != "session.escalated" for name, _ in out.records), ev
        assert not held or out.state.escalated == before.escalated, ev
        assert not held or out.state.tier == before.tier or out.state.model != before.model, ev
    assume(checked)


@settings(max_examples=100, deadline=None)
@given(configs, steps)
def test_every_state_change_is_recorded_and_every_ending_names_why(config, sequence):
    """Records are the log: a transition that changes the state always names what changed."""
    changed = ended = 0
    for before, _ev, _now, out in run(config, sequence):
        names = {name for name, _ in out.records}
        changed += out.state != before
        ended += before is not None and out.state is None
        assert out.state == before or out.records
        assert not (before is not None and out.state is None) or names & ENDINGS, names
    assume(changed and ended)


@settings(max_examples=120, deadline=None)
@given(configs, steps)
def test_every_route_is_decided_and_logged_and_a_refusal_changes_no_pin(config, sequence):
    routed = 0
    for before, ev, now, out in run(config, sequence):
        if type(ev) is not Route:
            continue
        routed += 1
        names = [name for name, _ in out.records]
        assert out.result.kind in set(Kind) - {Kind.UNAVAILABLE}
        assert "decision.made" in names
        assert out.state is not None or out.result.kind is Kind.REFUSE or ev.rules.strategy == "none"
        base = settled(before, now, config)
        refused = out.result.kind is Kind.REFUSE
        assert not refused or out.state == base, (ev, out.result)  # a refusal implies no session event
        assert not refused or out.result.reservation_id == ""
        held = out.result.reservation_id
        assert not held or held in {r[0] for r in out.state.reservations}
        pinned = out.result.kind in (Kind.INITIALIZE, Kind.RETAIN, Kind.UPGRADE, Kind.ESCALATE, Kind.SWITCH)
        assert not pinned or out.state.model == out.result.model, (ev, out.result)
        switched = out.result.kind is Kind.SWITCH
        assert not switched or (base is not None and base.deployment not in ev.candidates
                                and out.state.deployment == out.result.deployment == ev.candidates[0])
    assume(routed)


@settings(max_examples=120, deadline=None)
@given(configs, steps)
def test_release_and_costs_settle_reservations(config, sequence):
    settling = 0
    for before, ev, now, out in run(config, sequence):
        if type(ev) not in (Release, Cost):
            continue
        base = settled(before, now, config)
        held = {r[0] for r in base.reservations} if base is not None else set()
        rid = ev.reservation_id
        settling += bool(rid)
        after = {r[0] for r in out.state.reservations} if out.state is not None else set()
        assert rid == "" or rid not in after, ev  # released or settled: no longer held
        assert after <= held, ev  # neither adds a reservation
        assert type(ev) is not Release or out.result is (rid in held), (ev, held)
        assert type(ev) is not Release or out.state is None or (
            out.state.session_cost_micros == base.session_cost_micros), ev
    assume(settling)


@settings(max_examples=120, deadline=None)
@given(configs, pinned_steps)
def test_set_deployment_records_the_pin_or_its_group_pin(config, sequence):
    recorded = 0
    for before, ev, now, out in run(config, sequence):
        if type(ev) is not SetDeployment:
            continue
        base = settled(before, now, config)
        recorded += out.state is not None
        assert out.state is not None or base is None
        group = bool(ev.model)
        assert out.state is None or group or out.state.deployment == ev.deployment, ev
        assert out.state is None or not group or out.state.group_deployment(ev.model, ev.tier) == ev.deployment
        pin_deployment = base.deployment if base is not None else ""
        assert out.state is None or not group or out.state.deployment == pin_deployment  # the pin's is left
    assume(recorded)


@settings(max_examples=120, deadline=None)
@given(configs, steps)
def test_reads_and_decisions_change_nothing_and_evict_ends_only_what_it_saw(config, sequence):
    looked = 0
    for before, ev, now, out in run(config, sequence):
        base = settled(before, now, config)
        if type(ev) in (*READS, Decision):
            looked += 1
            assert out.state == base, ev  # beyond what time itself did
            assert type(ev) is not Decision or base is None or [n for n, _ in out.records][-1] == "decision.made"
        if type(ev) is Evict:
            looked += 1
            stale = base is not None and ev.last_used_at >= 0 and ev.last_used_at != base.last_used_at
            assert (out.state == base) if stale else (out.state is None), ev
            assert not stale or out.result is False
        if type(ev) is Clear:
            assert out.state is None
    assume(looked)


#: What the strategies must produce: every session event, every decision kind but ``unavailable`` (the
#: policy's, never the core's), and the outcomes the properties above are about.
REQUIRED = ({e.__name__ for e in SESSION_EVENTS}
            | {f"route:{k.value}" for k in Kind if k is not Kind.UNAVAILABLE}
            | {"release:open", "release:none", "evict:ended", "evict:kept", "same-life",
               "record:session.expired", "record:session.cleared", "record:session.evicted",
               "record:session.escalated", "record:deployment.group_set", "record:budget.lapsed",
               "record:budget.released", "record:sticky.expired"})


def test_the_strategies_reach_every_event_and_outcome():
    seen: set[str] = set()

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True)
    @given(configs, steps)
    def collect(config: Config, sequence: Any) -> None:
        for before, ev, now, out in run(config, sequence):
            seen.update(labels(before, ev, now, out))

    collect()
    assert REQUIRED - seen == set()


def test_clear_and_evict_end_the_session():
    config = Config(enabled=True)
    created = apply(None, SetSession(SID, "m"), 1000, config).state
    assert apply(created, Clear(SID), 1000, config).state is None
    assert apply(created, Evict(SID, created.last_used_at), 1000, config).state is None
    kept = apply(created, Evict(SID, created.last_used_at - 1), 1000, config)
    assert kept.state is created and kept.result is False
