"""Every reader of a log gives the same answer for the same log: audit, report, replay, --verify, the backtest
and recovery read one listing of its files (engine._replay.history_files), and agree on what is a record.

The logs are written by a store that rotates them (``Config.segment_bytes``), as a single file with its
archives and as a segment directory; the expected figures are the workload's own (what it spent, how many
lifetimes it started) and the store's own ``seq``, never a count of raw lines.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from freezegun import freeze_time
from typer.testing import CliRunner

from engine import SessionStore, replay
from engine._backtest import backtest
from engine._log import FileLog
from engine._replay import history_files, log_files, read_log
from engine._report import read_digest
from engine._verify import verify
from engine.cli import app

START = "2025-03-01 09:00:00"
SIDS = [f"s{i}" for i in range(12)]


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def rotating_workload(make_store: Callable[..., SessionStore], log: Path | str) -> tuple[int, int, set[str]]:
    """Sessions that spend, some cleared and started again, in a log rotated every 4 KiB.
    Returns (lifetimes started, micro-USD spent, the sessions live at the end)."""
    lifetimes = spent = 0
    live: set[str] = set()
    with freeze_time(START):
        store = make_store(event_log=log, fsync="never", segment_bytes=4096, budget_window_ms=0)
        for round_ in range(30):
            for i, sid in enumerate(SIDS):
                if sid not in live:
                    lifetimes += 1
                    live.add(sid)
                store.set_session(sid, f"m{round_ % 4}", "MEDIUM")
                store.add_session_cost(sid, 100 * (i + 1) + round_)
                spent += 100 * (i + 1) + round_
            if round_ % 5 == 4:
                for sid in SIDS[::3]:
                    store.clear_session(sid)
                    live.discard(sid)
        store.close()
    return lifetimes, spent, live


def last_seq(log: Path) -> int:
    """The store's own count of the log's records: the seq recovery continues from."""
    opened = FileLog(log)
    try:
        return opened.seq
    finally:
        opened.close()


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_every_reader_sees_every_record_lifetime_and_cost_of_a_rotated_log(
        make_store: Callable[..., SessionStore], tmp_path: Path, layout: str) -> None:
    log = tmp_path / ("audit.jsonl" if layout == "file" else "segments")
    lifetimes, spent, alive = rotating_workload(make_store, f"{log}/" if layout == "directory" else log)
    files = history_files(log)
    assert len(files) >= 4, "the workload rotates the log several times"
    records = last_seq(log)

    # audit: one row per lifetime, and their costs sum to what was spent
    code, out, err = run("audit", str(log), "--json")
    assert (code, err) == (0, "")
    rows = orjson.loads(out)
    assert len(rows) == lifetimes
    assert sum(row["cost_micros"] for row in rows) == spent
    code, out, _ = run("audit", str(log))
    assert code == 0 and out.splitlines()[-1] == f"{lifetimes} session lifetime(s), ${spent / 1e6:.6f} spent; times are UTC"
    # report: the same records, lifetimes and spend
    digest = read_digest(log)
    assert (digest.records, digest.lifetimes, digest.spend_micros) == (records, lifetimes, spent)
    code, out, _ = run("report", str(log), "-o", str(tmp_path / "r.html"))
    assert code == 0 and f"{records:,} records, {lifetimes:,} session lifetimes" in out
    assert f"spend ${spent / 1e6:.6f}" in out
    # --verify and the backtest: every record, every cost
    report = verify(log)
    assert report.status == "verified" and report.records == records and report.files == len(files)
    result = backtest(log, jobs=1)
    assert result.records == records and result.baseline.cost_micros == spent
    # replay (the live state, from the newest snapshot on) and the history: the same records
    assert sum(1 for _ in read_log(log, history=True)) == records
    assert log_files(log, history=True) == files
    live = replay(log)
    assert set(live) == alive and len(alive) < len(SIDS)
    code, out, _ = run("replay", str(log))
    assert code == 0 and set(orjson.loads(out)) == set(live)


def test_an_archive_left_by_an_interrupted_rotation_is_not_history_for_any_reader(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    lifetimes, spent, _ = rotating_workload(make_store, log)
    records = last_seq(log)
    first = next(iter(read_log(log)))["seq"]
    leftover = log.with_name(f"{log.name}.{first:020d}")
    os.link(log, leftover)  # rotation linked the active file to its archive name, then the process died
    assert leftover not in history_files(log)
    assert verify(log).records == records
    assert backtest(log, jobs=1).records == records
    digest = read_digest(log)
    assert (digest.records, digest.lifetimes, digest.spend_micros) == (records, lifetimes, spent)
    assert last_seq(log) == records and not leftover.exists(), "recovery removes it"


def test_a_log_name_with_glob_characters_lists_its_archives(make_store: Callable[..., SessionStore],
                                                            tmp_path: Path) -> None:
    log = tmp_path / "audit[1].jsonl"
    lifetimes, spent, _ = rotating_workload(make_store, log)
    records = last_seq(log)
    assert len(history_files(log)) >= 4
    assert verify(log).records == records
    assert backtest(log, jobs=1).baseline.cost_micros == spent
    assert read_digest(log).lifetimes == lifetimes
