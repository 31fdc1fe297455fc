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


def test_eviction_is_stamped_with_the_time_it_happened(make_store, log_path):
    from freezegun import freeze_time

    with freeze_time("2026-01-01") as clock:
        store = make_store(max_sessions=1, event_log=str(log_path))
        store.set_session("old", "m")
        clock.tick(60)
        store.set_session("new", "m")
        assert store.get_session("old") is None
    records = read_log(log_path)
    evicted = next(r for r in records if r["event"] == "session.evicted")
    created = [r for r in records if r["event"] == "session.created"]
    assert evicted["ts"] == created[1]["ts"] == created[0]["ts"] + 60_000
    assert [r["ts"] for r in records] == sorted(r["ts"] for r in records)


def test_restart_with_a_smaller_capacity_evicts_the_least_recently_used(make_store, log_path):
    from freezegun import freeze_time

    with freeze_time("2026-01-01") as clock:
        store = make_store(event_log=str(log_path))
        for sid in ("a", "b", "c", "d"):
            store.set_session(sid, "m")
            clock.tick(1)
        store.touch_session("a")
        store.close()
        smaller = make_store(event_log=str(log_path), max_sessions=2)
        assert sorted(i.id for i in smaller.get_stats().sessions) == ["a", "d"]
        smaller.set_session("e", "m")  # capacity is enforced from then on, too
        assert smaller.get_stats().count == 2
    evicted = [r["session_id"] for r in read_log(log_path) if r["event"] == "session.evicted"]
    assert evicted[:2] == ["b", "c"]
