"""Crash safety and restart: torn and garbage tails, empty and missing logs, corrupt middles, deadlines."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from freezegun import freeze_time

from engine import Entry, LogCorrupt, SessionStore, replay
from engine.log.writer import AuditLogError, FileLog
from tests.conftest import read_log

START = "2025-03-01 09:00:00"


def fill(make_store: Callable[..., SessionStore], log: Path) -> dict[str, Entry]:
    """Write a small log (three sessions) and return the state it ends with."""
    store = make_store(event_log=log)
    store.set_session("a", "openai/gpt-4o", "SIMPLE")
    store.record_request_hash("a", "h1")
    store.add_session_cost("a", 1_500)
    store.set_session("b", "anthropic/claude-3", "COMPLEX")
    store.set_cache_sticky("b", "anthropic")
    store.add_session_cost("c", 70)
    state = {sid: e for sid in "abc" if (e := store.get_session(sid)) is not None}
    store.close()
    return state


@pytest.mark.parametrize("tail", [
    b'{"seq":7,"ts":17407',                    # torn mid-record, as a kill mid-write leaves it
    b'{"seq":7,"ts":1740819600000,"event":"s',
    b"\x00\x00\x00\x00",                        # garbage (a block of zeros after a power cut)
    b'{"not": "a record"}',                     # unterminated: whatever it is, a crash may have left it
])
def test_torn_or_garbage_last_line_is_skipped_and_cut_before_appending(
        make_store: Callable[..., SessionStore], log_path: Path, tail: bytes) -> None:
    with freeze_time(START):
        state = fill(make_store, log_path)
        clean = log_path.read_bytes()
        with open(log_path, "ab") as f:
            f.write(tail)

        assert replay(log_path) == state
        store = make_store(event_log=log_path)
        assert log_path.read_bytes() == clean, "the torn tail is cut before anything is appended"
        store.touch_session("a")
        store.close()

    records = read_log(log_path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["event"] == "session.touched"
    assert replay(log_path)["a"].request_count == 2


@pytest.mark.parametrize("tail", [b"garbage that is not json\n", b'{"not": "a record"}\n', b"{}\n", b"[1]\n",
                                  b'{"seq": 8}\n'])
def test_a_complete_last_line_that_is_not_a_record_is_corruption_not_a_torn_tail(
        make_store: Callable[..., SessionStore], log_path: Path, tail: bytes) -> None:
    """A crash leaves at most an unterminated last line (a batch is one write); a complete one is no crash's."""
    with freeze_time(START):
        fill(make_store, log_path)
    with open(log_path, "ab") as f:
        f.write(tail)
    before = log_path.read_bytes()
    lines = before.count(b"\n")
    with pytest.raises(LogCorrupt, match=rf"audit\.jsonl line {lines}: not a JSON log record"):
        replay(log_path)
    with pytest.raises(LogCorrupt, match=f"line {lines}"):
        make_store(event_log=log_path)
    assert log_path.read_bytes() == before, "a store must never cut a log it cannot read"


def test_a_complete_last_record_missing_its_newline_is_kept(
        make_store: Callable[..., SessionStore], log_path: Path) -> None:
    with freeze_time(START):
        state = fill(make_store, log_path)
        log_path.write_bytes(log_path.read_bytes().rstrip(b"\n"))
        assert replay(log_path) == state
        store = make_store(event_log=log_path)
        assert store.get_session("a") == state["a"]
        store.touch_session("b")
        store.close()
    records = read_log(log_path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


def test_corrupt_line_in_the_middle_is_an_error_naming_the_file_and_line(
        make_store: Callable[..., SessionStore], log_path: Path) -> None:
    with freeze_time(START):
        fill(make_store, log_path)
    lines = log_path.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"seq":3,"ts":17408196\n'
    log_path.write_bytes(b"".join(lines))
    before = log_path.read_bytes()

    with pytest.raises(LogCorrupt, match=r"audit\.jsonl line 3\b"):
        replay(log_path)
    with pytest.raises(LogCorrupt, match="line 3"):
        make_store(event_log=log_path)
    assert log_path.read_bytes() == before, "a store must never cut a log it cannot read"


def test_a_gap_or_repeat_in_seq_is_an_error_naming_the_line(
        make_store: Callable[..., SessionStore], log_path: Path) -> None:
    with freeze_time(START):
        fill(make_store, log_path)
    lines = log_path.read_bytes().splitlines(keepends=True)
    del lines[3]
    log_path.write_bytes(b"".join(lines))
    with pytest.raises(LogCorrupt, match=r"line 4: seq 5 does not follow 3"):
        replay(log_path)


def test_empty_log_replays_to_nothing_and_a_store_starts_at_seq_1(
        make_store: Callable[..., SessionStore], log_path: Path) -> None:
    log_path.write_bytes(b"")
    assert replay(log_path) == {}
    store = make_store(event_log=log_path)
    store.set_session("a", "m")
    store.close()
    assert [r["seq"] for r in read_log(log_path)] == [1]


def test_missing_log_is_a_fresh_one_for_a_store_and_an_error_for_replay(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "new" / "dir" / "audit.jsonl"
    with pytest.raises(FileNotFoundError):
        replay(log)
    store = make_store(event_log=log)
    assert store.get_stats().count == 0
    store.set_session("a", "m")
    store.close()
    assert [r["seq"] for r in read_log(log)] == [1]


def test_a_file_that_is_not_a_log_is_refused_not_truncated(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes\n")
    with pytest.raises(LogCorrupt, match="not an audit log"):
        replay(notes)
    with pytest.raises(LogCorrupt, match="not an audit log"):
        make_store(event_log=notes)
    assert notes.read_text() == "my precious notes\n"


def test_crash_image_recovers_like_a_clean_shutdown(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    """A copy of the log taken while the store still runs is what a killed process leaves behind."""
    clean, crashed = tmp_path / "clean.jsonl", tmp_path / "crashed.jsonl"
    with freeze_time(START):
        store = make_store(event_log=clean)
        store.set_session("a", "m", "SIMPLE")
        store.add_session_cost("a", 9)
        store.set_cache_sticky("a", "vllm")
        live = store.get_session("a")  # what the store served at the moment it "died"
        shutil.copyfile(clean, crashed)  # the process "dies" here, without close()
        store.close()

        # Both must equal what was served, not just each other (the copy is byte-identical to the clean log).
        assert (live.model, live.session_cost_micros, live.cache_sticky, live.provider) == ("m", 9, True, "vllm")
        assert replay(crashed) == replay(clean) == {"a": live}
        revived = make_store(event_log=crashed)
        assert revived.get_session("a") == live
        assert revived.is_cache_sticky("a")
        revived.touch_session("a")
        revived.close()
    assert [r["seq"] for r in read_log(crashed)] == list(range(1, 5))


def test_restart_restores_idle_expiry_deadlines(make_store: Callable[..., SessionStore], log_path: Path) -> None:
    with freeze_time(START) as frozen:
        store = make_store(event_log=log_path, timeout_ms=60_000)
        store.set_session("old", "m")
        frozen.tick(timedelta(seconds=30))
        store.set_session("young", "m")
        store.close()

        restarted = make_store(event_log=log_path, timeout_ms=60_000)
        frozen.tick(timedelta(seconds=31))
        assert restarted.tick() == 1  # the clock pass finds the restored deadline of "old"
        assert restarted.get_stats().count == 1
        frozen.tick(timedelta(seconds=30))
        assert restarted.tick() == 1
        restarted.close()
    ended = [r for r in read_log(log_path) if r["event"] == "session.expired"]
    assert [r["session_id"] for r in ended] == ["old", "young"]
    assert replay(log_path) == {}


def test_restart_restores_cache_pin_deadlines(make_store: Callable[..., SessionStore], log_path: Path) -> None:
    with freeze_time(START) as frozen:
        store = make_store(event_log=log_path)
        store.set_session("a", "openai/gpt-4o")
        store.set_cache_sticky("a", "openai")
        store.close()

        restarted = make_store(event_log=log_path)
        assert restarted.is_cache_sticky("a")
        frozen.tick(timedelta(milliseconds=300_001))
        restarted.tick()  # ends the pin in the clock pass, without anyone asking
        restarted.close()
    assert read_log(log_path)[-1]["event"] == "sticky.expired"
    assert replay(log_path)["a"].cache_sticky is False


def test_directory_log_starts_with_a_first_segment_and_continues_it(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "segments"
    store = make_store(event_log=f"{log}/")
    store.set_session("a", "m")
    store.close()
    assert [p.name for p in log.iterdir() if not p.name.startswith(".")] == ["00000000000000000001.jsonl"]
    store = make_store(event_log=log)
    store.touch_session("a")
    store.close()
    assert replay(log)["a"].request_count == 2
    assert [r["seq"] for r in read_log(log / "00000000000000000001.jsonl")] == [1, 2]


def test_half_written_segment_from_an_interrupted_rotation_is_discarded(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "segments"
    log.mkdir()
    with freeze_time(START):
        store = make_store(event_log=log)
        store.set_session("a", "m")
        store.close()
        staging = log / ".00000000000000000002.jsonl.tmp"
        staging.write_bytes(b'{"seq":2,"ts":1,"event":"log.snapshot","part":1,"parts":1,"live":1,"sessions":{')
        store = make_store(event_log=log)
        assert not staging.exists()
        assert store.get_session("a") is not None
        store.close()


def test_closed_log_refuses_appends_and_close_is_idempotent(tmp_path: Path) -> None:
    log = FileLog(tmp_path / "a.jsonl", fsync="always")
    log.append([{"seq": 0, "ts": 1, "event": "shard.restarted", "shard": 0, "error": None, "sessions": 0}])
    log.close()
    log.close()
    with pytest.raises(AuditLogError, match="closed"):
        log.append([{"seq": 0, "ts": 1, "event": "shard.restarted"}])
    assert orjson.loads((tmp_path / "a.jsonl").read_bytes())["seq"] == 1


def test_one_store_per_log(make_store: Callable[..., SessionStore], log_path: Path) -> None:
    from engine import AuditLogError

    first = make_store(event_log=str(log_path))
    first.set_session("a", "m")
    with pytest.raises(AuditLogError, match="in use by another store"):
        make_store(event_log=str(log_path))
    first.close()
    second = make_store(event_log=str(log_path))  # the lock went with the first store
    assert second.get_session("a") is not None
