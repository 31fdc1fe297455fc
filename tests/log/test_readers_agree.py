"""Every reader of a log gives the same answer for the same log: audit, report, replay, --verify, the backtest
and recovery read one listing of its files (engine.log.replay.history_files), and agree on what is a record.

The logs are written by a store that rotates them (``Config.segment_bytes``), as a single file with its
archives and as a segment directory; the expected figures are the workload's own (what it spent, how many
lifetimes it started) and the store's own ``seq``, never a count of raw lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from freezegun import freeze_time
from typer.testing import CliRunner

from engine import SessionStore, replay
from engine.cli import app
from engine.log.replay import history_files, log_files, read_log
from engine.log.verify import verify
from engine.log.writer import FileLog
from engine.tools.backtest import backtest
from engine.tools.report import read_digest

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
    assert code == 0
    assert out.splitlines()[-1] == f"{lifetimes} session lifetime(s), ${spent / 1e6:.6f} spent; times are UTC"
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


# -- what every command refuses, and how it says so ------------------------------------------------------
READERS = (("audit",), ("audit", "--json"), ("replay",), ("backtest",), ("report", "-o", "{out}"))


def command(args: tuple[str, ...], log: Path, tmp_path: Path) -> list[str]:
    return [a.format(out=tmp_path / "r.html") for a in args[:1]] + [str(log)] + [
        a.format(out=tmp_path / "r.html") for a in args[1:]]


@pytest.fixture
def small_log(make_store: Callable[..., SessionStore], tmp_path: Path) -> Path:
    log = tmp_path / "audit.jsonl"
    with freeze_time(START):
        store = make_store(event_log=log)
        for i, sid in enumerate(SIDS):
            store.set_session(sid, "m", "SIMPLE")
            store.add_session_cost(sid, 10 + i)
        store.close()
    return log


@pytest.mark.parametrize("line", [b"{}", b"[1]", b'{"seq": 5}', b'"text"', b"not json"])
def test_a_complete_last_line_that_is_not_a_record_is_refused_by_every_command(
        small_log: Path, tmp_path: Path, line: bytes) -> None:
    records = last_seq(small_log)
    with open(small_log, "ab") as f:
        f.write(line + b"\n")
    number = records + 1
    for args in READERS:  # (audit streams: what it read before the bad line may be out already)
        code, _, err = run(*command(args, small_log, tmp_path))
        assert code == 2, args
        assert err == f"session-engine: error: {small_log} line {number}: not a JSON log record (needs seq and " \
                      "event)\n", args
    code, out, _ = run("audit", str(small_log), "--verify")
    assert code == 1 and "BAD" in out and "first bad record: seq ? at byte" in out
    report = verify(small_log)
    assert report.status == "bad" and report.records == records and report.torn_tail_bytes == 0


@pytest.mark.parametrize("line", [b"{}", b'{"seq": 5}', b'{"seq":13,"ts":17408'])
def test_an_unterminated_last_line_is_a_torn_tail_for_every_command(small_log: Path, tmp_path: Path,
                                                                     line: bytes) -> None:
    records = last_seq(small_log)
    with open(small_log, "ab") as f:
        f.write(line)
    for args in READERS:
        code, _, err = run(*command(args, small_log, tmp_path))
        assert (code, err) == (0, ""), args
    report = verify(small_log)
    assert report.status == "verified" and report.records == records and report.torn_tail_bytes == len(line)


@pytest.mark.parametrize("bad", ["a\tb", "nul\x00", "x" * 257, "y" * 50_000_000])
def test_every_command_that_takes_a_session_refuses_an_id_no_log_holds(small_log: Path, bad: str) -> None:
    for args in (("audit", str(small_log), "--session", bad), ("backtest", str(small_log), "--session", bad)):
        code, out, err = run(*args)
        assert code == 2 and out == "" and err.count("\n") == 1, args[0]
        assert err.startswith("session-engine: error: --session must "), err[:200]
        assert len(err) < 200, "the id is never echoed"


def test_an_unknown_session_is_an_error_for_backtest_as_for_audit(small_log: Path) -> None:
    for name in ("audit", "backtest"):
        code, out, err = run(name, str(small_log), "--session", "nope")
        assert code == 2 and out == "", name
        assert err == f"session-engine: error: no records for session 'nope' in {small_log}\n", name


@pytest.mark.parametrize("kind", ["empty file", "empty directory", "torn first record"])
def test_an_empty_log_says_no_records_for_every_command(tmp_path: Path, kind: str) -> None:
    log = tmp_path / ("segments" if kind == "empty directory" else "audit.jsonl")
    if kind == "empty directory":
        log.mkdir()
    else:
        log.write_bytes(b"" if kind == "empty file" else b'{"seq":1,"ts":17')
    for args in (*READERS, ("audit", "--session", "s0"), ("backtest", "--session", "s0")):
        code, out, err = run(*command(args, log, tmp_path))
        assert code == 2 and out == "", args
        assert err.startswith(f"session-engine: error: {log}: no records (") and err.count("\n") == 1, (args, err)
    code, out, err = run("audit", str(log), "--verify")
    assert (code, out) == (3, "") and err == f"session-engine: error: {log}: no records (nothing to verify)\n"
    code, out, err = run("audit", str(log), "--verify", "--json")
    assert code == 3 and orjson.loads(out)["status"] == "empty" and err.count("\n") == 1
    assert verify(log).status == "empty" and "UNCHAINED" not in out


def test_a_closed_pipe_ends_every_printing_command_quietly(make_store: Callable[..., SessionStore],
                                                           tmp_path: Path) -> None:
    """A real pipe: the reader takes one line and closes it, as `| head -1` does."""
    log = tmp_path / "audit.jsonl"
    with freeze_time(START):
        store = make_store(event_log=log)
        for i in range(3_000):
            store.set_session(f"conversation-{i:05d}", "openai/gpt-4o-mini", "SIMPLE")
        for _ in range(3_000):
            store.touch_session("conversation-00000")
        store.close()
    for args in (("audit",), ("audit", "--json"), ("audit", "--session", "conversation-00000"), ("replay",),
                 ("audit", "--verify", "--json")):
        proc = subprocess.Popen([sys.executable, "-m", "engine", args[0], str(log), *args[1:]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()
        proc.stdout.close()
        err = proc.stderr.read()
        proc.stderr.close()
        assert proc.wait(timeout=120) == 0 and err == b"", (args, err)
        assert first.strip(), args
