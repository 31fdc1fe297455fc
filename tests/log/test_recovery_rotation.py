"""Restart after a rotation a crash cut short: a torn opening snapshot, a leftover archive link."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from freezegun import freeze_time

import engine.log.segment as log_module
from engine import Entry, LogCorrupt, SessionStore, replay
from engine.log.replay import archives, list_segments, read_head
from engine.log.verify import verify
from engine.log.writer import FileLog
from tests.conftest import read_log

START = "2025-03-01 09:00:00"
SIDS = [f"s{i}" for i in range(12)]


def rotated_log(make_store: Callable[..., SessionStore], log: Path | str, segment_bytes: int = 4096) -> None:
    """Write a log with several rotations (fsync="never": the policy the defect showed under)."""
    with freeze_time(START):
        store = make_store(event_log=log, fsync="never", segment_bytes=segment_bytes)
        for round_ in range(12):
            for i, sid in enumerate(SIDS):
                store.set_session(sid, f"m{round_}", "MEDIUM")
                store.add_session_cost(sid, 100 * (i + 1))
        store.close()


def segments(log: Path) -> list[Path]:
    return list_segments(log) if log.is_dir() else [*archives(log), log]


def cut_newest(log: Path, keep: int) -> tuple[dict[str, Entry], int]:
    """Cut the newest segment to ``keep`` bytes of its opening snapshot, as a crash before the new segment
    reached the disk leaves it; returns the state and last seq the segment before it ends with."""
    files = segments(log)
    assert len(files) >= 3, "the workload rotates"
    newest, previous = files[-1], files[-2]
    assert read_head(newest)["event"] == "log.snapshot"
    expected = replay(previous)  # the previous segment opens with a snapshot too: it stands alone
    last_seq = read_log(previous)[-1]["seq"]
    first_line = newest.read_bytes().split(b"\n", 1)[0]
    snapshot = newest.read_bytes()[:len(first_line) + 1]
    newest.write_bytes(snapshot[:keep])
    return expected, last_seq


def served(store: SessionStore) -> dict[str, Entry]:
    return {sid: entry for sid in SIDS if (entry := store.get_session(sid)) is not None}


@pytest.mark.parametrize("layout", ["file", "directory"])
@pytest.mark.parametrize("keep", [0, 9, 60, -1])  # nothing, a torn seq, a torn snapshot, all but its newline
def test_a_segment_whose_opening_snapshot_a_crash_cut_restores_from_the_one_before(
        make_store: Callable[..., SessionStore], tmp_path: Path, layout: str, keep: int) -> None:
    log = tmp_path / ("audit.jsonl" if layout == "file" else "segments")
    rotated_log(make_store, f"{log}/" if layout == "directory" else log)
    newest = segments(log)[-1]
    first_line = newest.read_bytes().split(b"\n", 1)[0]
    expected, last_seq = cut_newest(log, keep if keep >= 0 else len(first_line) - 5)
    assert len(expected) == len(SIDS)

    assert replay(log) == expected, "replay reads the segment before the cut one"
    with freeze_time(START):
        store = make_store(event_log=log, fsync="never", segment_bytes=4096)
        assert served(store) == expected, "every session restored, none lost"
        store.add_session_cost("s0", 5)
        store.close()
    records = read_log(newest)
    assert records[0]["event"] == "log.snapshot" and records[0]["seq"] == last_seq + 1
    assert records[0]["live"] == len(SIDS), "the cut segment starts again with a whole snapshot"
    assert records[-1]["event"] == "cost.added" and records[-1]["seq"] > last_seq
    report = verify(log)
    assert report.status == "verified", report.to_json()
    assert replay(log)["s0"].session_cost_micros == expected["s0"].session_cost_micros + 5


def test_a_multi_part_snapshot_cut_after_its_first_part_is_not_read_as_the_whole_state(
        make_store: Callable[..., SessionStore], log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_module, "SNAPSHOT_PART", 3)  # 12 sessions: a snapshot of 4 parts
    rotated_log(make_store, log_path)
    newest = segments(log_path)[-1]
    lines = newest.read_bytes().split(b"\n")
    assert read_log(newest)[0]["parts"] == 4
    expected = replay(segments(log_path)[-2])
    newest.write_bytes(b"\n".join(lines[:2]) + b"\n" + lines[2][:20])  # parts 1 and 2 whole, part 3 torn

    assert replay(log_path) == expected
    with freeze_time(START):
        store = make_store(event_log=log_path)
        assert served(store) == expected
        store.close()
    assert verify(log_path).status == "verified"


def test_a_cut_snapshot_with_no_earlier_segment_on_disk_is_refused_not_read_as_empty(
        make_store: Callable[..., SessionStore], log_path: Path) -> None:
    rotated_log(make_store, log_path)
    cut_newest(log_path, 60)
    for archive in archives(log_path):
        archive.unlink()
    with pytest.raises(LogCorrupt, match="cut the snapshot"):
        replay(log_path)
    with pytest.raises(LogCorrupt, match="cut the snapshot"):
        FileLog(log_path)
    assert log_path.stat().st_size == 60, "the refused log is left as it is"


def test_a_new_log_whose_first_record_was_torn_still_starts_empty(log_path: Path) -> None:
    log_path.write_bytes(b'{"seq":1,"ts":17')
    log = FileLog(log_path)
    assert log.seq == 0 and log.recovered_state() == {}
    log.close()


def test_the_archive_link_an_interrupted_rotation_left_is_removed(
        make_store: Callable[..., SessionStore], log_path: Path) -> None:
    rotated_log(make_store, log_path)
    expected = replay(log_path)
    first = read_head(log_path)["seq"]
    leftover = log_path.with_name(f"{log_path.name}.{first:020d}")
    os.link(log_path, leftover)  # rotation linked the active file to its archive name, then the process died
    kept = archives(log_path)
    with freeze_time(START):
        store = make_store(event_log=log_path, fsync="never", segment_bytes=4096)
        assert not leftover.exists()
        assert served(store) == expected
        for sid in SIDS * 6:
            store.add_session_cost(sid, 7)  # rotates again: the archive is made anew
        store.close()
    assert leftover.exists() and not leftover.samefile(log_path)
    assert set(kept) < set(archives(log_path))
    assert verify(log_path).status == "verified"


@pytest.mark.parametrize("policy", ["always", "interval", "never"])
def test_rotation_puts_the_new_segment_on_disk_before_renaming_it_in_every_policy(
        make_store: Callable[..., SessionStore], log_path: Path, policy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else str(fd)))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", str(src)))
        real_replace(src, dst)

    store = make_store(event_log=log_path, fsync=policy, segment_bytes=4096)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for sid in SIDS * 6:
        store.add_session_cost(sid, 7)
    monkeypatch.undo()
    store.close()
    renames = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert renames, "the workload rotates"
    for i in renames:
        staging = events[i][1]
        synced = [name for kind, name in events[:i] if kind == "fsync"]
        assert staging in synced or not os.path.exists("/proc/self/fd"), f"{staging} renamed before its fsync"
        assert str(log_path.parent) in synced, "the directory is synced before the rename"
