"""Code the engine runs but does not own (observer hooks, clock passes) cannot wedge it: a hook
that raises is logged (rate-limited) and counted, and every caller is still answered at once."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

import engine.shell.clock
from engine import Config, InvalidEvent, SessionStore, replay
from engine.metrics import Metrics
from engine.shell.guard import HOOKS
from engine.shell.runtime import Observer
from events import records as record_names
from tests.support.faults import EIO, FaultyOS, inject

T0 = "2026-03-01 09:00:00"


class RaisingObserver(Metrics):
    """Metrics whose every hook raises after doing its work; on_hook_error raises too."""

    def __init__(self) -> None:
        super().__init__()
        self.called: dict[str, int] = {}
        self.hook_errors_seen: list[str] = []

    def _hit(self, hook: str) -> None:
        self.called[hook] = self.called.get(hook, 0) + 1
        raise RuntimeError(f"{hook} is broken")

    def on_start(self, live_sessions: int) -> None:
        self._hit("on_start")

    def on_batch(self, *args: Any) -> None:
        self._hit("on_batch")

    def on_records(self, records: list[dict[str, Any]]) -> None:
        self._hit("on_records")

    def on_log_write(self, seconds: float) -> None:
        self._hit("on_log_write")

    def on_log_sync(self, seconds: float) -> None:
        self._hit("on_log_sync")

    def on_log_failure(self, op: str, error: BaseException) -> None:
        super().on_log_failure(op, error)
        self._hit("on_log_failure")

    def on_log_writable(self, writable: bool) -> None:
        super().on_log_writable(writable)
        self._hit("on_log_writable")

    def on_log_head(self, seq: int, head: str) -> None:
        super().on_log_head(seq, head)
        self._hit("on_log_head")

    def on_hook_error(self, hook: str, error: BaseException) -> None:
        super().on_hook_error(hook, error)
        self.hook_errors_seen.append(hook)
        raise RuntimeError("on_hook_error is broken as well")


def test_every_raising_hook_is_isolated_and_the_store_answers_at_once(tmp_path: Path, caplog) -> None:
    """Each hook raises on each call: callers are answered, state and log stay true, no restart."""
    log_path = tmp_path / "audit.jsonl"
    obs = RaisingObserver()
    caplog.set_level(logging.ERROR, logger="engine")
    with freeze_time(T0) as clock:
        # A short ask deadline: a wedged shard would turn every call below into AskTimeout.
        store = SessionStore(Config(enabled=True, tick_ms=0, ask_timeout_s=2.0, event_log=str(log_path),
                                    fsync="always", segment_bytes=4096), observer=obs)  # rotates: on_log_head
        try:
            for i in range(20):
                store.set_session(f"s{i}", "m", "MEDIUM")
                store.add_session_cost(f"s{i}", 1_000)
            with pytest.raises(InvalidEvent):
                store.add_session_cost("s0", -1)  # a rejected input: logged out of any batch (on_records)
            seam = inject(store, FaultyOS())
            seam.write_errno = EIO
            with pytest.raises(Exception, match="cannot be written"):
                store.touch_session("s0")  # on_log_failure / on_log_writable(False)
            seam.clear()
            clock.tick(10)
            store.touch_session("s0")  # on_log_writable(True)
            assert store.get_session_cost_usd("s3") == pytest.approx(0.001)
            assert store.get_session("s0").request_count == 2
            assert store.get_stats().count == 20
            assert store._rt.restarts == 0
            guard_errors = dict(store._rt.guard.errors)
            called = dict(obs.called)  # close() reports the head once more
        finally:
            store.close()
    assert set(guard_errors) == set(HOOKS), "every hook was called, raised, and was reported"
    assert called == guard_errors
    assert set(obs.hook_errors_seen) == set(HOOKS)
    assert obs.value("session_engine_hook_errors_total", {"hook": "on_batch"}) == guard_errors["on_batch"]
    # Rate-limited: one line per hook and error type within the minute, however many failures.
    lines = [r for r in caplog.records if "raised RuntimeError" in r.getMessage()]
    assert sorted(r.args[0] for r in lines) == sorted(HOOKS)
    assert guard_errors["on_batch"] > 20
    after = replay(log_path)
    assert after["s0"].request_count == 2 and len(after) == 20


def test_a_hook_failing_again_after_a_minute_is_logged_again(make_store, caplog) -> None:
    """The rate limit is per minute of engine time (freezegun moves it), per hook and error type."""
    with freeze_time(T0) as clock:
        obs = RaisingObserver()
        store = SessionStore(Config(enabled=True, tick_ms=0, ask_timeout_s=2.0), observer=obs)
        try:
            caplog.set_level(logging.ERROR, logger="engine")
            store.set_session("a", "m")
            store.touch_session("a")
            clock.tick(61)
            store.touch_session("a")
            assert store.get_session("a").request_count == 3
        finally:
            store.close()
    batch_lines = [r for r in caplog.records if r.args and r.args[0] == "on_batch"]
    assert len(batch_lines) == 2
    assert obs.called["on_batch"] == 4


def test_a_raising_on_batch_answers_instead_of_timing_out() -> None:
    """An on_batch that always raises: every call still answers (none ends in AskTimeout), each failure counted."""

    class Obs(Observer):
        def on_batch(self, *args: Any) -> None:
            raise ValueError("observer bug")

    with SessionStore(Config(enabled=True, tick_ms=0, ask_timeout_s=1), observer=Obs()) as store:
        store.set_session("a", "m", "MEDIUM")
        store.add_session_cost("a", 5)
        assert store.get_session_cost_usd("a") == pytest.approx(0.000005)
        assert store._rt.guard.errors["on_batch"] == 3


def test_a_raising_clock_pass_is_reported_and_the_clock_keeps_ticking(monkeypatch) -> None:
    """The first clock passes raise; later ones still expire idle sessions, with their records."""
    real_now = engine.shell.clock.now_ms
    calls = {"n": 0}
    expired = threading.Event()

    def flaky_now() -> int:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise OSError("clock source failed")
        return real_now()

    class Watch(Observer):
        def on_batch(self, shard: int, n_events: int, records: list[dict[str, Any]], *rest: Any) -> None:
            if any(r["event"] == record_names.SESSION_EXPIRED for r in records):
                expired.set()

    monkeypatch.setattr(engine.shell.clock, "now_ms", flaky_now)
    with freeze_time(T0) as clock:
        store = SessionStore(Config(enabled=True, tick_ms=5, timeout_ms=60_000, ask_timeout_s=2.0),
                             observer=Watch())
        try:
            store.set_session("idle", "m")
            clock.tick(120)  # idle past its timeout: only a clock pass can expire it unasked
            assert expired.wait(10), "the clock stopped after its passes raised"
            assert store._rt.guard.errors["clock"] == 3
            assert store.get_stats().count == 0
        finally:
            store.close()
