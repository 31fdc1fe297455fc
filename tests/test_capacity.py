"""max_sessions: the least recently used session is evicted, and the eviction is logged."""

from __future__ import annotations

from tests.conftest import read_log


def test_least_recently_used_is_evicted_across_shards(make_store, log_path):
    store = make_store(max_sessions=3, shards=4, event_log=str(log_path))
    for sid in ("a", "b", "c"):
        store.set_session(sid, "m")
    store.touch_session("a")  # b is now the least recently used
    store.set_session("d", "m")
    assert store.get_session("b") is None
    assert all(store.get_session(s) is not None for s in ("a", "c", "d"))
    assert store.get_stats().count == 3
    evicted = [r for r in read_log(log_path) if r["event"] == "session.evicted"]
    assert [(r["session_id"], r["reason"]) for r in evicted] == [("b", "capacity")]


def test_capacity_holds_under_many_creations(make_store):
    store = make_store(max_sessions=100, shards=3)
    for i in range(1000):
        store.set_session(f"s{i}", "m")
    assert store.get_stats().count == 100
    assert store.get_session("s999") is not None
    assert store.get_session("s0") is None
