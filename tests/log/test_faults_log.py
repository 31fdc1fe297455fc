"""A log that cannot be written never wedges the store (docs/audit-log.md, "Failures").

Each scenario checks the same four things: every caller is answered (AuditLogError, never
AskTimeout), reads are served during the fault, nothing acknowledged is lost (acknowledged ==
replay == restart) and writes resume by themselves once the fault clears. Faults are real where
the machine allows (a 2 MiB tmpfs); otherwise, and for EIO, they come through the writer's OS seam.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
from freezegun import freeze_time

from engine import AuditLogError, Config, SessionStore, replay
from engine.log.fault import RETRY_MAX_MS
from engine.metrics import Metrics
from tests.support.faults import EIO, ENOSPC, FaultyOS, inject, small_tmpfs

T0 = "2026-03-01 09:00:00"
PAST_RETRY = RETRY_MAX_MS / 1000 + 1


def open_store(log_path: Path | str, **settings: Any) -> tuple[SessionStore, Metrics]:
    metrics = Metrics()
    config = Config(**{"enabled": True, "tick_ms": 0, "ask_timeout_s": 5.0, "event_log": str(log_path),
                       **settings})
    return SessionStore(config, observer=metrics), metrics


def whole_lines(log_path: Path) -> list[dict[str, Any]]:
    """Every line of the log parses: no half record was left behind."""
    data = log_path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "the log ends in a partial record"
    return [orjson.loads(line) for line in data.splitlines()]


def served(store: SessionStore, ids: list[str]) -> dict[str, Any]:
    return {sid: entry for sid in ids if (entry := store.get_session(sid)) is not None}


def assert_served_is_replay(store: SessionStore, log_path: Path, ids: list[str]) -> None:
    whole_lines(log_path)
    assert served(store, ids) == replay(log_path)


@pytest.mark.parametrize("fsync", ["always", "interval", "never"])
def test_a_disk_full_store_refuses_writes_serves_reads_and_resumes(tmp_path: Path, fsync: str,
                                                                     record_property, caplog) -> None:
    """ENOSPC on a real 2 MiB tmpfs (or, where mount is not permitted, through the seam)."""
    disk = tmp_path / "disk"
    caplog.set_level(logging.WARNING, logger="engine")
    with small_tmpfs(disk) as mounted, freeze_time(T0) as clock:
        how = "real tmpfs (2 MiB)" if mounted else "seam (mount not permitted: ENOSPC injected at os.write)"
        record_property("fault", how)
        print(f"disk full through: {how}")
        log_path = disk / "audit.jsonl"
        ballast = disk / "ballast"
        if mounted:
            ballast.write_bytes(b"\0" * (1_700 * 1024))  # leaves the log ~300 KiB
        store, metrics = open_store(log_path, fsync=fsync, fsync_interval_ms=60_000)
        seam = None if mounted else inject(store, FaultyOS())
        try:
            ids = [f"s{i}" for i in range(8)]
            acked = dict.fromkeys(ids, 0)
            for sid in ids:
                store.set_session(sid, "m", "MEDIUM")
            refused = None
            for n in range(100_000):
                sid = ids[n % len(ids)]
                if seam is not None and n == 500:
                    seam.partial, seam.write_errno = 37, ENOSPC  # a torn batch, then a full disk
                try:
                    store.add_session_cost(sid, 1_000 + n)
                except AuditLogError as exc:
                    refused = exc
                    break
                acked[sid] += 1_000 + n
            assert refused is not None and "No space left" in str(refused)
            # During the fault: the log holds whole records only, and memory equals it.
            assert_served_is_replay(store, log_path, ids)
            for sid in ids:
                assert store.get_session_cost_usd(sid) == pytest.approx(acked[sid] / 1e6)
            assert store.is_cache_sticky("s0") is False
            assert store.get_stats().count == len(ids)
            with pytest.raises(AuditLogError):
                store.add_session_cost("s0", 1)  # refused at once while the log waits to retry
            assert metrics.value("session_engine_log_writable") == 0
            assert metrics.value("session_engine_log_write_failures_total", {"op": "write"}) >= 1
            assert metrics.value("session_engine_log_write_failures_total", {"op": "refused"}) >= 1
            # The cause goes away: writes resume by themselves, no restart.
            if mounted:
                ballast.unlink()
            else:
                seam.clear()
            clock.tick(PAST_RETRY)
            store.add_session_cost("s0", 7)
            acked["s0"] += 7
            assert metrics.value("session_engine_log_writable") == 1
            assert store._rt.restarts == 0
            assert_served_is_replay(store, log_path, ids)
        finally:
            store.close()
        after = replay(log_path)
        assert {sid: e.session_cost_micros for sid, e in after.items()} == acked
        store, _ = open_store(log_path)
        try:
            assert {sid: round(store.get_session_cost_usd(sid) * 1e6) for sid in ids} == acked
        finally:
            store.close()
    lines = [r.getMessage() for r in caplog.records if "audit log" in r.getMessage()]
    assert len([m for m in lines if "cannot be written" in m]) == 1, lines
    assert len([m for m in lines if "written again" in m]) == 1, lines


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_eio_on_write_cuts_the_torn_batch_and_keeps_serving(tmp_path: Path, fsync: str) -> None:
    """EIO after part of a batch was written: the part is cut, the log stays replayable."""
    log_path = tmp_path / "audit.jsonl"
    with freeze_time(T0) as clock:
        store, _ = open_store(log_path, fsync=fsync)
        seam = inject(store, FaultyOS())
        try:
            store.set_session("a", "m")
            store.add_session_cost("a", 100)
            size = log_path.stat().st_size
            seam.partial, seam.write_errno = 20, EIO
            with pytest.raises(AuditLogError, match="Input/output error") as refused:
                store.add_session_cost("a", 5)
            assert refused.value.applied is False  # put back: safe to retry
            assert log_path.stat().st_size == size
            assert store.get_session_cost_usd("a") == pytest.approx(0.0001)
            assert_served_is_replay(store, log_path, ["a"])
            clock.tick(1)  # a retry that fails doubles the wait
            with pytest.raises(AuditLogError):
                store.set_session("b", "m")
            assert store.get_session("b") is None
            assert seam.failed["write"] == 2
            seam.clear()
            clock.tick(PAST_RETRY)
            store.set_session("b", "m")
            store.add_session_cost("a", 5)
            assert_served_is_replay(store, log_path, ["a", "b"])
        finally:
            store.close()
    assert replay(log_path)["a"].session_cost_micros == 105
    assert "b" in replay(log_path)


def test_eio_on_fsync_fails_the_batch_refuses_writes_and_resumes(tmp_path: Path, caplog) -> None:
    """fsync="always": a failed fsync fails its callers; the next fsync that succeeds ends the fault."""
    log_path = tmp_path / "audit.jsonl"
    caplog.set_level(logging.WARNING, logger="engine")
    with freeze_time(T0) as clock:
        store, metrics = open_store(log_path, fsync="always")
        seam = inject(store, FaultyOS())
        try:
            store.set_session("a", "m")
            store.add_session_cost("a", 100)
            seam.fsync_errno = EIO
            with pytest.raises(AuditLogError, match="cannot be synced") as failed:
                store.add_session_cost("a", 5)
            assert failed.value.applied is True  # written, durability unknown: not to be retried
            # The change was written (not known durable): the store serves exactly what the log holds.
            assert_served_is_replay(store, log_path, ["a"])
            assert store.get_session_cost_usd("a") == pytest.approx(0.000105)
            with pytest.raises(AuditLogError):
                store.touch_session("a")  # refused at once, not applied
            assert store.get_session("a").request_count == 1
            assert metrics.value("session_engine_log_write_failures_total", {"op": "fsync"}) == 1
            assert metrics.value("session_engine_log_writable") == 0
            seam.clear()
            clock.tick(PAST_RETRY)
            store.touch_session("a")
            assert metrics.value("session_engine_log_writable") == 1
            assert store.get_session("a").request_count == 2
            assert store._rt.restarts == 0
            assert_served_is_replay(store, log_path, ["a"])
        finally:
            store.close()
        store, _ = open_store(log_path)
        try:
            assert store.get_session("a").request_count == 2
        finally:
            store.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot be synced" in m]) == 1
    assert len([m for m in messages if "written again" in m]) == 1


def test_interval_fsync_failure_is_found_by_the_timer_and_cleared_by_it(tmp_path: Path) -> None:
    """fsync="interval": the background fsync meets EIO, writes are refused, the timer's retry ends it."""
    log_path = tmp_path / "audit.jsonl"
    store, metrics = open_store(log_path, fsync="interval", fsync_interval_ms=5)
    seam = inject(store, FaultyOS())
    try:
        seam.fsync_errno = EIO
        store.set_session("a", "m")  # acknowledged: under "interval" the fsync comes later
        waited = threading.Event()
        for _ in range(2_000):  # a bounded poll: at most ~10 s
            if seam.failed["fsync"]:
                break
            assert store.get_session("a") is not None
            waited.wait(0.005)
        assert seam.failed["fsync"], "the fsync timer never ran"
        with pytest.raises(AuditLogError):
            store.touch_session("a")
        assert store.get_session("a").request_count == 1
        seam.clear()
        for _ in range(2_000):  # the timer retries after the backoff (real time here: no freezegun)
            if metrics.value("session_engine_log_writable") == 1:
                break
            waited.wait(0.005)
        assert metrics.value("session_engine_log_writable") == 1, "the timer never ended the fault"
        store.touch_session("a")
        assert_served_is_replay(store, log_path, ["a"])
    finally:
        store.close()
    assert replay(log_path)["a"].request_count == 2


def test_a_read_that_would_expire_a_session_answers_without_a_record_during_a_fault(tmp_path: Path) -> None:
    """An idle session read during a fault reads as gone; its expiry is logged once the log is back."""
    log_path = tmp_path / "audit.jsonl"
    with freeze_time(T0) as clock:
        store, _ = open_store(log_path, fsync="never", timeout_ms=60_000)
        seam = inject(store, FaultyOS())
        try:
            store.set_session("idle", "m")
            store.set_session("live", "m")
            seam.write_errno = ENOSPC
            clock.tick(90)
            assert store.get_session("idle") is None  # idle past its timeout, as the settle would say
            assert store.get_session_cost_usd("idle") == 0.0
            assert "idle" in replay(log_path)
            assert "idle" in store._rt.states[store._rt.shard_of("idle")].sessions  # kept until logged
            assert store.get_stats().count == 0
            with pytest.raises(AuditLogError):
                store.tick()  # raised by the first shard to answer; another may still be in its pass
            seam.clear()
            clock.tick(PAST_RETRY)
            store.tick()
            assert store.get_stats().count == 0
        finally:
            store.close()
    assert replay(log_path) == {}
    events = [r["event"] for r in whole_lines(log_path)]
    assert events.count("session.expired") == 2


def test_faults_across_many_threads_never_time_out(tmp_path: Path) -> None:
    """Callers on several threads during a write fault all get an answer, then writes resume."""
    log_path = tmp_path / "audit.jsonl"
    with freeze_time(T0) as clock:
        store, _ = open_store(log_path, fsync="always", shards=2)
        seam = inject(store, FaultyOS())
        outcomes: list[str] = []
        lock = threading.Lock()
        try:
            for i in range(4):
                store.set_session(f"t{i}", "m")
            seam.write_errno = ENOSPC

            def caller(i: int) -> None:
                for _ in range(50):
                    try:
                        store.touch_session(f"t{i}")
                        got = "ok"
                    except AuditLogError:
                        got = "refused"
                    assert store.get_session(f"t{i}") is not None
                    with lock:
                        outcomes.append(got)

            threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert outcomes == ["refused"] * 200  # every one answered, none timed out
            seam.clear()
            clock.tick(PAST_RETRY)
            store.touch_session("t0")
            assert_served_is_replay(store, log_path, [f"t{i}" for i in range(4)])
        finally:
            store.close()
    assert os.path.getsize(log_path) > 0


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_a_read_batched_with_a_refused_write_sees_the_logged_state(tmp_path: Path, fsync: str) -> None:
    """Reads and writes in one batch: the writes are refused and put back, the reads answer from the log."""
    from engine.shell.reply import Reply
    from engine.shell.runtime import Observer
    from events import Cost, GetCost, GetSession, Touch

    gate, parked = threading.Event(), threading.Event()

    class Park(Observer):
        """Holds the shard in its first batch after ``armed`` so the next one gathers several events."""

        armed = False

        def on_batch(self, *args: Any) -> None:
            if self.armed:
                self.armed = False
                parked.set()
                assert gate.wait(10)

    park = Park()
    log_path = tmp_path / "audit.jsonl"
    with freeze_time(T0):
        store = SessionStore(Config(enabled=True, tick_ms=0, shards=1, ask_timeout_s=5.0, fsync=fsync,
                                    event_log=str(log_path)), observer=park)
        try:
            store.set_session("a", "m")
            store.add_session_cost("a", 100)
            seam = inject(store, FaultyOS())
            park.armed = True
            store.tell(Touch("a"))
            assert parked.wait(10)
            seam.write_errno = ENOSPC
            replies = [Reply() for _ in range(4)]
            for event, reply in zip([Cost("a", 5), GetCost("a"), Touch("a"), GetSession("a")], replies,
                                    strict=True):
                store.submit(event, reply)
            gate.set()
            with pytest.raises(AuditLogError):
                replies[0].get(5)
            assert replies[1].get(5) == pytest.approx(0.0001)  # not the refused cost
            with pytest.raises(AuditLogError):
                replies[2].get(5)
            assert replies[3].get(5).request_count == 2  # the logged touch, not the refused one
            assert_served_is_replay(store, log_path, ["a"])
        finally:
            seam.clear()
            store.close()


@pytest.mark.parametrize("code", ["EROFS", "EDQUOT", "ENOSPC", "EIO"])
def test_every_write_errno_is_a_fault_the_store_answers_through(tmp_path: Path, code: str) -> None:
    """A read-only file system or a quota behaves as a full disk; bad input still raises InvalidEvent."""
    import errno

    from engine import InvalidEvent

    log_path = tmp_path / "audit.jsonl"
    with freeze_time(T0) as clock:
        store, _ = open_store(log_path, fsync="always")
        seam = inject(store, FaultyOS())
        try:
            store.set_session("a", "m")
            seam.write_errno = getattr(errno, code)
            with pytest.raises(AuditLogError, match=os.strerror(getattr(errno, code))):
                store.set_cache_sticky("a", "openai")
            assert store.is_cache_sticky("a") is False
            with pytest.raises(InvalidEvent):
                store.add_session_cost("a", -5)  # its input.rejected note is dropped, the error is not
            seam.clear()
            clock.tick(PAST_RETRY)
            store.set_cache_sticky("a", "openai")
            assert store.is_cache_sticky("a") is True
            assert_served_is_replay(store, log_path, ["a"])
        finally:
            store.close()


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_a_removed_log_is_found_refused_and_started_again_with_a_snapshot(tmp_path: Path, layout: str) -> None:
    """The log file (or its whole directory) removed while the store runs: found within a second of
    batch time, writes refused, reads served; once the path can be written again, a new segment
    opens with a snapshot of every live session, so nothing acknowledged is lost."""
    import shutil

    folder = tmp_path / "logs"
    log_path = folder / "audit.jsonl" if layout == "file" else folder
    target = str(log_path) + ("/" if layout == "directory" else "")
    ids = ["a", "b", "c"]
    with freeze_time(T0) as clock:
        store, metrics = open_store(target, fsync="always")
        try:
            for sid in ids:
                store.set_session(sid, "m")
                store.add_session_cost(sid, 10)
            shutil.rmtree(folder)
            clock.tick(2)
            with pytest.raises(AuditLogError, match="removed"):
                store.add_session_cost("a", 5)
            assert store.get_session_cost_usd("a") == pytest.approx(0.00001)
            assert metrics.value("session_engine_log_writable") == 0
            assert metrics.value("session_engine_log_write_failures_total", {"op": "removed"}) == 1
            clock.tick(PAST_RETRY)
            with pytest.raises(AuditLogError):
                store.add_session_cost("a", 5)  # the directory is not back yet: still refused
            folder.mkdir()
            clock.tick(PAST_RETRY)
            store.add_session_cost("a", 5)
            assert metrics.value("session_engine_log_writable") == 1
            assert served(store, ids) == replay(log_path)
        finally:
            store.close()
        assert {sid: e.session_cost_micros for sid, e in replay(log_path).items()} == {"a": 15, "b": 10, "c": 10}
        store, _ = open_store(target)
        try:
            assert round(store.get_session_cost_usd("a") * 1e6) == 15
            assert store.get_stats().count == 3
        finally:
            store.close()
