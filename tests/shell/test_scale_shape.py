"""The number of OS threads does not grow with the number of sessions."""

from __future__ import annotations

import threading

from events import SetSession


def test_thread_count_same_for_10_and_20000_sessions(make_store):
    store = make_store(tick_ms=50)
    for i in range(10):
        store.set_session(f"s{i}", "m")
    with_ten = threading.active_count()
    store.tell_many(SetSession(f"bulk{i}", "m") for i in range(20_000))
    assert store.get_stats().count == 20_010
    assert threading.active_count() == with_ten


def test_close_stops_every_thread_it_started(make_store):
    before = threading.active_count()
    store = make_store(tick_ms=10, shards=6)
    assert threading.active_count() == before + 6 + 2  # shards + supervisor + clock
    store.close()
    assert threading.active_count() == before


def test_a_store_never_closed_does_not_keep_the_process_alive(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "a.jsonl"
    script = ("from engine import Config, SessionStore\n"
              f"s = SessionStore(Config(enabled=True, tick_ms=10, event_log={str(log)!r}))\n"
              "s.set_session('a', 'm')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], timeout=60)
    assert done.returncode == 0
    assert b'"session.created"' in log.read_bytes()  # acknowledged records were written before exit
