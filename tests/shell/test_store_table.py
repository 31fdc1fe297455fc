"""One test (or more) per row of SPEC.md's SessionStore table, through the actors."""

from __future__ import annotations

import threading

import pytest
from freezegun import freeze_time

from engine import Config, Entry, SessionStore, Stats, StoreClosed, Tier, default_config
from tests.conftest import read_log

T0 = "2026-01-01 00:00:00"


def test_default_config_is_the_seeds():
    cfg = default_config()
    assert (cfg.enabled, cfg.timeout_ms, cfg.header_name) == (False, 1_800_000, "x-session-id")
    assert cfg == Config()


def test_disabled_store_methods_are_no_ops():
    store = SessionStore(default_config())
    store.set_session("a", "m", "SIMPLE")
    assert store.get_session("a") is None
    assert store.record_request_hash("a", "h") == 0
    assert store.escalate_session("a") is None
    assert store.get_session_cost_usd("a") == 0.0
    assert store.is_cache_sticky("a") is False
    assert store.tick() == 0
    assert store.get_stats() == Stats(0, [])
    store.close()
    store.close()


def test_empty_session_id_is_a_no_op(make_store):
    store = make_store()
    store.set_session("", "m")
    store.add_session_cost("", 5)
    assert store.get_session("") is None
    assert store.get_stats().count == 0


def test_set_session_creates_with_one_request():
    with freeze_time(T0) as clock, SessionStore(Config(enabled=True, tick_ms=0)) as store:
        store.set_session("s1", "anthropic/claude", "COMPLEX")
        e = store.get_session("s1")
        now = int(clock().timestamp() * 1000)
        assert e == Entry("anthropic/claude", Tier.COMPLEX, now, now, 1)


def test_set_session_update_counts_and_changes_model_and_tier():
    with freeze_time(T0) as clock, SessionStore(Config(enabled=True, tick_ms=0)) as store:
        store.set_session("s1", "m1", "SIMPLE")
        clock.tick(5)
        store.set_session("s1", "m1", "REASONING")
        e = store.get_session("s1")
        assert (e.model, e.tier, e.request_count) == ("m1", Tier.SIMPLE, 2)  # same model: tier kept
        assert e.last_used_at - e.created_at == 5000
        store.set_session("s1", "m2", "COMPLEX")
        e = store.get_session("s1")
        assert (e.model, e.tier, e.request_count) == ("m2", Tier.COMPLEX, 3)


def test_user_explicit_stays_true_until_the_session_ends(make_store):
    store = make_store()
    store.set_session("s", "m", None, user_explicit=True)
    store.set_session("s", "m2", None, user_explicit=False)
    assert store.get_session("s").user_explicit is True
    store.clear_session("s")
    store.set_session("s", "m", None)
    assert store.get_session("s").user_explicit is False


def test_get_session_returns_none_after_timeout_and_logs_expiry(tmp_path):
    log = tmp_path / "a.jsonl"
    with freeze_time(T0) as clock, SessionStore(Config(enabled=True, tick_ms=0, timeout_ms=1000,
                                                       event_log=str(log))) as store:
        store.set_session("s", "m")
        clock.tick(1.0)
        assert store.get_session("s") is not None  # exactly at the timeout: still live
        clock.tick(0.001)
        assert store.get_session("s") is None
    names = [r["event"] for r in read_log(log)]
    assert names == ["session.created", "session.expired"]


def test_snapshot_is_not_a_live_pointer(make_store):
    store = make_store()
    store.set_session("s", "m")
    before = store.get_session("s")
    store.touch_session("s")
    assert before.request_count == 1
    assert store.get_session("s").request_count == 2


def test_touch_session_extends_and_counts(make_store):
    store = make_store()
    store.touch_session("absent")
    assert store.get_session("absent") is None
    with freeze_time(T0) as clock:
        store.set_session("s", "m")
        clock.tick(10)
        store.touch_session("s")
        e = store.get_session("s")
        assert e.request_count == 2 and e.last_used_at - e.created_at == 10_000


def test_record_request_hash_window_and_strikes(make_store):
    store = make_store()
    assert store.record_request_hash("absent", "h") == 0
    store.set_session("s", "m")
    assert store.record_request_hash("s", "a") == 0
    assert store.record_request_hash("s", "a") == 1
    assert store.record_request_hash("s", "a") == 2
    assert store.record_request_hash("s", "b") == 2
    assert store.record_request_hash("s", "a") == 2  # run of one: no strike
    e = store.get_session("s")
    assert e.recent_hashes == ("a", "b", "a")
    assert e.strikes == 2


def test_escalate_steps_up_and_stops_at_reasoning(make_store):
    store = make_store()
    assert store.escalate_session("absent") is None
    store.set_session("s", "m", "SIMPLE")
    assert store.escalate_session("s") == Tier.MEDIUM
    assert store.escalate_session("s") == Tier.COMPLEX
    assert store.escalate_session("s") == Tier.REASONING
    assert store.escalate_session("s") == Tier.REASONING
    assert store.get_session("s").escalated is True


def test_no_tier_escalates_as_medium(make_store):
    store = make_store()
    store.set_session("s", "m", "")
    assert store.get_session("s").tier is None
    assert store.escalate_session("s") == Tier.COMPLEX


def test_user_explicit_is_never_escalated(make_store):
    store = make_store(auto_escalate=True)
    store.set_session("s", "m", "SIMPLE", user_explicit=True)
    assert store.escalate_session("s") is None
    for _ in range(3):
        store.record_request_hash("s", "h")
    e = store.get_session("s")
    assert (e.tier, e.escalated, e.strikes) == (Tier.SIMPLE, False, 2)


def test_third_identical_request_escalates_with_auto_escalate(make_store, log_path):
    store = make_store(auto_escalate=True, event_log=str(log_path))
    store.set_session("s", "m", "MEDIUM")
    assert store.record_request_hash("s", "h") == 0
    assert store.record_request_hash("s", "h") == 1
    assert store.get_session("s").escalated is False
    assert store.record_request_hash("s", "h") == 2
    e = store.get_session("s")
    assert (e.tier, e.escalated) == (Tier.COMPLEX, True)
    store.record_request_hash("s", "h")
    assert store.get_session("s").tier == Tier.COMPLEX  # once per session
    escalations = [r for r in read_log(log_path) if "escalat" in r["event"]]
    assert len(escalations) == 1 and escalations[0]["reason"] == "strikes"


def test_auto_escalate_off_by_default(make_store):
    store = make_store()
    store.set_session("s", "m", "MEDIUM")
    for _ in range(4):
        store.record_request_hash("s", "h")
    assert store.get_session("s").escalated is False


def test_add_session_cost_accumulates_and_reads_usd(make_store):
    store = make_store()
    store.set_session("s", "m")
    store.add_session_cost("s", 1_500_000)
    store.add_session_cost("s", 250)
    assert store.get_session("s").session_cost_micros == 1_500_250
    assert store.get_session_cost_usd("s") == 1.50025
    assert store.get_session_cost_usd("absent") == 0.0


def test_cost_for_unknown_session_is_kept(make_store):
    store = make_store()
    store.add_session_cost("new", 42)
    e = store.get_session("new")
    assert (e.model, e.tier, e.session_cost_micros, e.request_count) == ("", None, 42, 0)
    assert store.get_session_cost_usd("new") == 0.000042


def test_cache_sticky_pins_once_and_reports(make_store):
    with freeze_time(T0):
        store = make_store()
        store.set_cache_sticky("absent", "anthropic")
        assert store.is_cache_sticky("absent") is False
        store.set_session("s", "anthropic/claude")
        store.set_cache_sticky("s", "anthropic")
        store.set_cache_sticky("s", "openai")  # already sticky: unchanged
        e = store.get_session("s")
        assert (e.cache_sticky, e.provider) == (True, "anthropic")
        assert store.is_cache_sticky("s") is True


def test_sticky_pin_lapses_after_ttl_and_is_not_revived(make_store, log_path):
    with freeze_time(T0) as clock:
        store = make_store(event_log=str(log_path))
        store.set_session("s", "vllm/llama")
        store.set_cache_sticky("s", "vllm")
        clock.tick(600)  # exactly the vllm TTL: still warm
        assert store.is_cache_sticky("s") is True
        clock.tick(1)
        store.touch_session("s")  # the seed would revive the pin here
        assert store.is_cache_sticky("s") is False
        assert store.get_session("s").cache_sticky is False
        store.set_cache_sticky("s", "openai")  # may pin again
        e = store.get_session("s")
        assert (e.cache_sticky, e.provider) == (True, "openai")
    names = [r["event"] for r in read_log(log_path)]
    assert names.count("sticky.expired") == 1 and names.count("sticky.pinned") == 2


def test_clear_session_and_clear_all(make_store, log_path):
    store = make_store(event_log=str(log_path))
    for sid in ("a", "b", "c"):
        store.set_session(sid, "m")
    store.clear_session("a")
    assert store.get_session("a") is None and store.get_stats().count == 2
    store.clear_all()
    assert store.get_stats().count == 0
    ended = [(r["session_id"], r["reason"]) for r in read_log(log_path) if r["event"] == "session.cleared"]
    assert sorted(ended) == [("a", "cleared"), ("b", "clear_all"), ("c", "clear_all")]


def test_get_stats_sorted_cut_ids_and_age():
    with freeze_time(T0) as clock, SessionStore(Config(enabled=True, tick_ms=0)) as store:
        store.set_session("zeta", "m1")
        store.set_session("a-very-long-session-id", "m2")
        clock.tick(65.9)
        stats = store.get_stats()
        assert stats.count == 2
        assert [(i.id, i.model, i.age) for i in stats.sessions] == [
            ("a-very-l...", "m2", 65), ("zeta", "m1", 65)]


def test_tick_expires_idle_sessions_and_ends_pins(log_path):
    with freeze_time(T0) as clock, SessionStore(Config(enabled=True, tick_ms=0, timeout_ms=10_000,
                                                       event_log=str(log_path))) as store:
        store.set_session("old", "m")
        store.set_session("pinned", "openai/gpt")
        store.set_cache_sticky("pinned", "openai")
        clock.tick(5)
        store.touch_session("pinned")
        assert store.tick() == 0
        clock.tick(5.5)
        assert store.tick() == 1  # "old" idle 10.5 s
        assert store.get_stats().count == 1
    names = [r["event"] for r in read_log(log_path)]
    assert names.count("session.expired") == 1


def test_tick_ends_a_pin_without_expiring_the_session(log_path):
    with freeze_time(T0) as clock, SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log_path))) as store:
        store.set_session("s", "openai/gpt")
        store.set_cache_sticky("s", "openai")
        clock.tick(301)
        assert store.tick() == 0
        records = read_log(log_path)
        assert records[-1]["event"] == "sticky.expired"
        assert store.get_session("s").cache_sticky is False


def test_entry_str_matches_the_seed():
    e = Entry("m", Tier.SIMPLE, 0, 0, 3, strikes=1, user_explicit=True, session_cost_micros=1_234_567)
    assert str(e) == "model=m tier=SIMPLE reqs=3 strikes=1 explicit=true cost=$1.234567"
    assert str(Entry("", None, 0, 0, 0)) == "model= tier= reqs=0 strikes=0 explicit=false cost=$0.000000"


def test_tell_then_ask_sees_the_told_event(make_store):
    from events import Cost, GetSession, Touch

    store = make_store()
    store.set_session("s", "m")
    for _ in range(100):
        store.tell(Touch("s"))
    store.tell(Cost("s", 7))
    e = store.ask(GetSession("s"))
    assert (e.request_count, e.session_cost_micros) == (101, 7)


def test_expire_event_ends_only_idle_sessions(make_store):
    from events import Expire

    with freeze_time(T0) as clock:
        store = make_store(timeout_ms=1000)
        store.set_session("s", "m")
        assert store.ask(Expire("s")) is False
        clock.tick(2)
        assert store.ask(Expire("s")) is True
        assert store.ask(Expire("s")) is False


def test_store_is_a_context_manager_and_close_is_idempotent():
    before = threading.active_count()
    with SessionStore(Config(enabled=True)) as store:  # background clock on: one more thread to stop
        store.set_session("s", "m")
        assert store.get_session("s").model == "m"
        assert threading.active_count() > before
    assert threading.active_count() == before  # leaving the block closed the store and its threads
    with pytest.raises(StoreClosed):
        store.get_session("s")
    store.close()
    assert threading.active_count() == before


def test_mass_expiry_runs_in_bounded_batches_and_expires_everything(log_path):
    """expiry_batch bounds one turn; the rest is queued behind other sessions' events."""
    with freeze_time(T0) as clock, SessionStore(Config(enabled=True, tick_ms=0, timeout_ms=1000, shards=1,
                                                       expiry_batch=10, event_log=str(log_path))) as store:
        from events import SetSession

        store.tell_many(SetSession(f"idle{i}", "m") for i in range(95))
        assert store.get_stats().count == 95
        clock.tick(2)
        store.set_session("live", "m")
        assert store.tick() == 95
        assert store.get_stats().count == 1
    assert sum(r["event"] == "session.expired" for r in read_log(log_path)) == 95


def test_zero_cost_for_an_unknown_session_still_gets_its_entry(make_store, log_path):
    store = make_store(event_log=str(log_path))
    store.add_session_cost("fresh", 0)
    e = store.get_session("fresh")
    assert (e.model, e.session_cost_micros, e.request_count) == ("", 0, 0)
    store.add_session_cost("fresh", 0)  # nothing changes: nothing logged
    assert [r["event"] for r in read_log(log_path)] == ["session.created"]
