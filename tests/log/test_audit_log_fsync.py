"""Durability policies: "always" acknowledges only fsynced records and shares fsyncs (group commit),
"interval" fsyncs in the background at most every N ms, "never" leaves it to the OS."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import SessionStore
from engine.log.writer import FileLog

Fsync = Callable[[int], None]


class FsyncSpy:
    """Stands in for os.fsync: counts calls and remembers how many bytes each one made durable."""

    def __init__(self, real: Fsync) -> None:
        self.real = real
        self.durable_sizes: list[int] = []
        self.called = threading.Event()
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        if self.gate is not None:
            gate, self.gate = self.gate, None
            assert gate.wait(10), "the test never opened the gate"
        size = os.fstat(fd).st_size
        self.real(fd)
        with self.lock:
            self.durable_sizes.append(size)
        self.called.set()

    @property
    def count(self) -> int:
        return len(self.durable_sizes)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> FsyncSpy:
    spy = FsyncSpy(os.fsync)
    monkeypatch.setattr(os, "fsync", spy)
    return spy


def _record(n: int) -> dict[str, object]:
    return {"seq": 0, "ts": 1_740_819_600_000 + n, "event": "session.touched", "session_id": f"s{n}",
            "last_used_at": 1, "request_count": 2}


def test_always_returns_only_after_the_record_is_on_disk(
        make_store: Callable[..., SessionStore], log_path: Path, spy: FsyncSpy) -> None:
    store = make_store(event_log=log_path, fsync="always")
    for i in range(20):
        store.set_session(f"s{i % 3}", "m")
        # Everything in the file when the call returned had been fsynced.
        assert spy.durable_sizes and max(spy.durable_sizes) >= log_path.stat().st_size
    assert spy.count >= 20


def test_always_concurrent_writers_share_one_fsync(tmp_path: Path, spy: FsyncSpy) -> None:
    log = FileLog(tmp_path / "a.jsonl", fsync="always")
    assert spy.count == 0
    gate = spy.gate = threading.Event()  # the first fsync blocks until every writer is waiting
    done: list[int] = []

    def writer(n: int) -> None:
        seq = log.append([_record(n)])
        log.sync(seq)
        done.append(seq)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    ready = threading.Event()
    while log.seq < 8:  # all eight records written while the leader's fsync is held
        ready.wait(0.001)
    assert done == [], "no writer may return before its record is fsynced"
    gate.set()
    for t in threads:
        t.join(10)
    log.close()
    assert sorted(done) == list(range(1, 9))
    # One fsync for the first writer, one shared by the seven that waited, one at close.
    assert spy.count == 3


def test_interval_fsyncs_in_the_background_and_close_stops_the_timer(
        make_store: Callable[..., SessionStore], log_path: Path, spy: FsyncSpy) -> None:
    store = make_store(event_log=log_path, fsync="interval", fsync_interval_ms=5)
    store.set_session("a", "m")
    assert spy.called.wait(5), "the interval timer never fsynced the record"
    assert max(spy.durable_sizes) == log_path.stat().st_size
    assert any(t.name == "session-engine-fsync" for t in threading.enumerate())
    store.close()
    assert not any(t.name == "session-engine-fsync" for t in threading.enumerate())


def test_interval_does_not_fsync_on_the_callers_path_but_close_does(
        make_store: Callable[..., SessionStore], log_path: Path, spy: FsyncSpy) -> None:
    store = make_store(event_log=log_path, fsync="interval", fsync_interval_ms=600_000)
    for i in range(50):
        store.set_session(f"s{i}", "m")
    assert spy.count == 0
    store.close()
    assert spy.count == 1 and spy.durable_sizes[0] == log_path.stat().st_size


def test_never_leaves_durability_to_the_os(make_store: Callable[..., SessionStore], log_path: Path,
                                           spy: FsyncSpy) -> None:
    store = make_store(event_log=log_path, fsync="never")
    for i in range(20):
        store.set_session(f"s{i}", "m")
    store.close()
    assert spy.count == 0
    assert len(log_path.read_bytes().splitlines()) == 20  # written, though not forced to disk
