"""Which deadlines a session needs: one rule (engine.core.transitions.deadline_checks), read by the memory
shard's heap (engine.shell.shard, engine.core.table.restore) and the Redis backend's deadline ZSET
(engine.core.transitions.next_deadline)."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.config import Config
from engine.core.entry import Entry
from engine.core.table import ShardState
from engine.core.transitions import (
    LAPSE_GEN,
    check_due_again,
    deadline_checks,
    needs_check,
    new_deadline_checks,
    next_deadline,
)

T0 = 1_700_000_000_000
times = st.integers(T0, T0 + 10_000_000)
reservations = st.lists(st.tuples(st.sampled_from(["r1", "r2", "r3"]), st.integers(0, 10**6), times),
                        max_size=3).map(tuple)
entries = st.builds(
    Entry, model=st.sampled_from(["", "gpt-4o", "claude-3"]), tier=st.none(), created_at=times,
    last_used_at=times, request_count=st.integers(0, 3), cache_sticky=st.booleans(), cache_sticky_at=times,
    provider=st.sampled_from(["", "openai", "anthropic", "vllm"]), session_cost_micros=st.integers(0, 10),
    reservations=reservations)
configs = st.builds(Config, timeout_ms=st.sampled_from([1_000, 1_800_000]),
                    budget_window_ms=st.sampled_from([0, 3_600_000]))


def _keys(checks):
    return {(gen, deadline if gen == LAPSE_GEN else 0) for deadline, gen in checks}


@settings(max_examples=300, deadline=None)
@given(entries, configs)
def test_the_redis_deadline_is_the_earliest_of_the_heaps_checks(entry, config):
    checks = deadline_checks(entry, config)
    assert next_deadline(entry, config) == min(deadline for deadline, _ in checks)
    state = ShardState()
    state.restore("s", entry, config)
    assert sorted(state.deadlines) == sorted((deadline, "s", gen) for deadline, gen in checks)
    for _, gen in checks:
        assert needs_check(entry, gen, config)
        again = check_due_again(entry, gen, config)
        assert again is None if gen == LAPSE_GEN else (again, gen) in checks


@settings(max_examples=500, deadline=None)
@given(st.none() | entries, entries, configs, st.booleans())
def test_the_checks_a_change_pushes_name_every_check_the_new_entry_needs(before, after, config, same_pins):
    if same_pins and before is not None:  # a use: the fields that name the checks stay
        after = replace(before, last_used_at=after.last_used_at, request_count=after.request_count)
    new = new_deadline_checks(before, after, config)
    held = deadline_checks(before, config) if before is not None else []
    assert _keys(deadline_checks(after, config)) <= _keys(held) | _keys(new)
    assert set(new) <= set(deadline_checks(after, config))
    # The shortcut for an unchanged set of names answers as the full comparison does.
    copied = replace(after, reservations=tuple(list(after.reservations)))
    assert sorted(new_deadline_checks(before, copied, config)) == sorted(new)
