"""Failures at the engine's edges: the log refusing a write, a caller's callback raising,
an unknown event type, a log holding a bad value. Callers get an answer; state stays true."""

from __future__ import annotations

import errno

import orjson
import pytest
from freezegun import freeze_time

from engine import AuditLogError, Config, InvalidEvent, LogCorrupt, SessionStore, replay
from engine.shell.reply import Reply
from events import GetSession, SessionEvent, Touch
from tests.support.faults import FaultyOS, inject


def test_a_refused_log_write_answers_the_callers_and_keeps_memory_equal_to_the_log(make_store, log_path):
    """The refused change is put back and answered with AuditLogError; the shard keeps serving."""
    with freeze_time("2026-01-01") as clock:
        store = make_store(event_log=str(log_path), fsync="never", ask_timeout_s=30.0)
        store.set_session("a", "m")
        seam = inject(store, FaultyOS())
        seam.write_errno = errno.ENOSPC
        with pytest.raises(AuditLogError, match="No space left"):
            store.touch_session("a")  # answered with the error, not left waiting for the timeout
        assert store.get_session("a").request_count == 1  # the refused touch was put back
        assert store._rt.restarts == 0
        seam.clear()
        clock.tick(10)  # past the log's retry delay
        store.touch_session("a")
        assert store.get_session("a").request_count == 2
        store.close()
    assert replay(log_path)["a"].request_count == 2


def test_a_failing_reply_callback_does_not_take_the_shard_down(make_store):
    store = make_store(shards=1)
    store.set_session("a", "m")

    def broken(_reply):
        raise RuntimeError("Event loop is closed")

    store.submit(Touch("a"), Reply(broken))
    assert store.get_session("a").request_count == 2
    assert store._rt.restarts == 0


def test_a_subclassed_event_is_rejected_before_any_actor_sees_it(make_store):
    class Mine(SessionEvent):
        __slots__ = ("session_id",)

        def __init__(self, session_id):
            self.session_id = session_id

    class Sub(GetSession):
        __slots__ = ()

    store = make_store()
    for event in (Mine("a"), Sub("a")):
        with pytest.raises(InvalidEvent) as info:
            store.ask(event)
        assert info.value.field == "event"
        with pytest.raises(InvalidEvent):
            store.tell(event)
    assert store._rt.restarts == 0


def test_a_log_with_an_unknown_tier_is_corrupt_and_releases_the_log(make_store, log_path):
    store = make_store(event_log=str(log_path))
    store.set_session("a", "m", "SIMPLE")
    store.close()
    lines = log_path.read_bytes().splitlines()
    record = orjson.loads(lines[0])
    record["tier"] = "ULTRA"
    log_path.write_bytes(orjson.dumps(record) + b"\n")
    with pytest.raises(LogCorrupt):
        replay(log_path)
    for _ in range(2):  # the second attempt is not "in use by another store"
        with pytest.raises(LogCorrupt):
            SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log_path)))
