"""Regression for freezegun's threading trap: every engine decision uses the frozen time,
in the caller's thread, in the shard threads and in the background clock thread."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from freezegun import freeze_time

from engine import Config, SessionStore
from engine._time import now_ms
from tests.conftest import read_log

FROZEN = datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC)
FROZEN_MS = int(FROZEN.timestamp() * 1000)


def test_now_ms_is_frozen_even_right_under_a_thread_entry_point():
    seen: list[int] = []
    with freeze_time(FROZEN):
        t = threading.Thread(target=lambda: seen.append(now_ms()))
        t.start()
        t.join()
    assert seen == [FROZEN_MS]


def test_background_clock_and_actors_only_see_frozen_time(log_path):
    """With a 1 ms background clock running, a session is expired exactly when frozen time says so."""
    with freeze_time(FROZEN) as clock:
        store = SessionStore(Config(enabled=True, tick_ms=1, timeout_ms=60_000, event_log=str(log_path),
                                    fsync="never"))
        try:
            store.set_session("s", "m")
            # Let the clock thread run many passes: with real time (25 years later) it would expire "s".
            for _ in range(50):
                assert store.get_session("s") is not None
                store.tick()
            clock.tick(61)
            expired = threading.Event()
            for _ in range(1000):  # bounded wait: the background clock, not us, must expire it
                if any(r["event"] == "session.expired" for r in read_log(log_path)):
                    expired.set()
                    break
                expired.wait(0.01)
            assert expired.is_set(), "the background clock did not expire the session"
        finally:
            store.close()
    records = read_log(log_path)
    assert {r["ts"] for r in records} <= {FROZEN_MS, FROZEN_MS + 61_000}
    created = records[0]
    assert created["created_at"] == FROZEN_MS
    (expiry,) = [r for r in records if r["event"] == "session.expired"]
    assert expiry["ts"] == FROZEN_MS + 61_000 and expiry["idle_ms"] == 61_000
