"""Property tests of the pure core: random event sequences under a moving clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine._config import Config
from engine._core import apply
from events import (
    Clear,
    Cost,
    Escalate,
    Evict,
    Expire,
    GetSession,
    Hash,
    IsCacheSticky,
    SetCacheSticky,
    SetSession,
    Tier,
    Touch,
    tier_rank,
)

SID = "s"
tiers = st.sampled_from([None, *Tier])
events = st.one_of(
    st.builds(SetSession, st.just(SID), st.sampled_from(["m1", "m2", "vllm/x"]), tiers, st.booleans()),
    st.builds(Touch, st.just(SID)),
    st.builds(Hash, st.just(SID), st.sampled_from(["a", "b"])),
    st.builds(Escalate, st.just(SID)),
    st.builds(Cost, st.just(SID), st.integers(0, 10**6)),
    st.builds(SetCacheSticky, st.just(SID), st.sampled_from(["openai", "vllm"])),
    st.builds(IsCacheSticky, st.just(SID)),
    st.builds(GetSession, st.just(SID)),
    st.builds(Expire, st.just(SID)),
    st.builds(Clear, st.just(SID)),
)
# Some gaps pass the longest timeout below: without them no session ever expired and the
# properties about endings held vacuously.
gaps = st.one_of(*[st.integers(0, 400_000)] * 9, st.integers(3_600_001, 4_000_000))
steps = st.lists(st.tuples(events, gaps), max_size=60)
configs = st.builds(Config, enabled=st.just(True), timeout_ms=st.sampled_from([1_000_000, 3_600_000]),
                    auto_escalate=st.booleans(), strike_limit=st.integers(1, 3))


def run(config, sequence):
    """Yield (before, event, outcome) along one session's life, time moving forward."""
    state, now = None, 1_700_000_000_000
    for event, gap in sequence:
        now += gap
        out = apply(state, event, now, config)
        yield state, event, out
        state = out.state


@settings(max_examples=300, deadline=None)
@given(configs, steps)
def test_cost_and_strikes_never_decrease_within_a_session(config, sequence):
    for before, _event, out in run(config, sequence):
        if before is not None and out.state is not None and out.state.created_at == before.created_at:
            assert out.state.session_cost_micros >= before.session_cost_micros
            assert out.state.strikes >= before.strikes
            assert out.state.request_count >= before.request_count
            assert out.state.last_used_at >= before.last_used_at


@settings(max_examples=300, deadline=None)
@given(configs, steps)
def test_tier_rises_only_by_escalation_or_a_model_change(config, sequence):
    for before, event, out in run(config, sequence):
        if before is None or out.state is None or out.state.created_at != before.created_at:
            continue
        names = [name for name, _ in out.records]
        if tier_rank(out.state.tier) > tier_rank(before.tier) or out.state.tier != before.tier:
            model_changed = out.state.model != before.model
            assert "session.escalated" in names or model_changed, (event, names)


@settings(max_examples=300, deadline=None)
@given(configs, steps)
def test_user_explicit_session_is_never_escalated(config, sequence):
    for before, _event, out in run(config, sequence):
        explicit = out.state is not None and out.state.user_explicit
        if explicit and before is not None and before.user_explicit and out.state.created_at == before.created_at:
            assert all(name != "session.escalated" for name, _ in out.records)
            assert out.state.escalated == before.escalated
            assert out.state.tier == before.tier or out.state.model != before.model


@settings(max_examples=200, deadline=None)
@given(configs, steps)
def test_every_state_change_is_recorded(config, sequence):
    """Records are the log: a transition that changes the state always names what changed."""
    for before, _event, out in run(config, sequence):
        if out.state != before:
            assert out.records
        if out.state is None and before is not None:
            assert out.records[-1][0] in {"session.expired", "session.cleared", "session.evicted"} or \
                any(name == "session.expired" for name, _ in out.records)


def test_clear_and_evict_end_the_session():
    config = Config(enabled=True)
    created = apply(None, SetSession(SID, "m"), 1000, config).state
    assert apply(created, Clear(SID), 1000, config).state is None
    assert apply(created, Evict(SID, created.last_used_at), 1000, config).state is None
    kept = apply(created, Evict(SID, created.last_used_at - 1), 1000, config)
    assert kept.state is created and kept.result is False
