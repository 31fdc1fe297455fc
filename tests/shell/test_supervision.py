"""A shard that raises is restarted by the supervisor; the store keeps serving."""

from __future__ import annotations

import threading

import pytest

import engine.core.transitions
from engine import ShardFailed
from events import Touch
from tests.conftest import read_log


def test_failing_shard_is_restarted_and_keeps_its_sessions(make_store, log_path, monkeypatch):
    real_apply = engine.core.transitions.apply

    def faulty(state, event, now, config):
        if event.session_id == "boom":
            raise RuntimeError("injected fault")
        return real_apply(state, event, now, config)

    monkeypatch.setattr("engine.shell.shard.apply", faulty)
    store = make_store(event_log=str(log_path), shards=2)
    for i in range(20):
        store.set_session(f"s{i}", "m")
    rt = store._rt
    with pytest.raises(ShardFailed):
        store.touch_session("boom")
    restarted = threading.Event()
    while rt.restarts == 0:
        restarted.wait(0.005)
    # Every other session is still served, with its state intact.
    for i in range(20):
        store.touch_session(f"s{i}")
        assert store.get_session(f"s{i}").request_count == 2
    records = read_log(log_path)
    assert next(r for r in records if r["event"] == "shard.restarted")["error"] == "RuntimeError"
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


def test_events_queued_behind_a_failure_are_not_lost(make_store, monkeypatch):
    real_apply = engine.core.transitions.apply
    gate = threading.Event()

    def faulty(state, event, now, config):
        if event.session_id == "boom":
            gate.wait(5)
            raise RuntimeError("injected fault")
        return real_apply(state, event, now, config)

    monkeypatch.setattr("engine.shell.shard.apply", faulty)
    store = make_store(shards=1)
    store.set_session("a", "m")
    store.tell(Touch("boom"))
    for _ in range(100):
        store.tell(Touch("a"))  # queued behind the failing event
    gate.set()
    assert store.get_session("a").request_count == 101
