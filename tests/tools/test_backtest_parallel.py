"""The backtest in several processes (``jobs``): each re-runs its share of the sessions, and the figures are
exactly a serial run's; whatever only a serial run can decide or report makes it run serially."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import Config, LogCorrupt, SessionStore, Tier
from engine.log.replay import Share, Tail, history_files, read_file
from engine.log.replay import read_log as engine_read_log
from engine.policy import BudgetExceeded, Options, Policy, Request
from engine.tools import backtest as backtest_module
from engine.tools.backtest import backtest
from events import InvalidEvent
from tests.conftest import read_log
from tests.tools.test_backtest import session_engine

CHANGES: list[Any] = [[], ["strike_limit=50"], {"max_cost_usd": 0.05}, ["stall_lift=true", "budget_mode=strict"]]


def write(path: Path, records: list[dict[str, Any]], *, renumber: bool = True) -> Path:
    """``records`` as a log, ``seq`` counting up from 1 again when ``renumber``."""
    lines = []
    for seq, r in enumerate(records, 1):
        lines.append(orjson.dumps({"seq": seq, **{k: v for k, v in r.items() if k != "seq"}} if renumber else r))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def both(log: Path, changes: Any = (), jobs: int = 2, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return backtest(log, changes, jobs=1, **kw).to_json(), backtest(log, changes, jobs=jobs, **kw).to_json()


@pytest.mark.parametrize("changes", CHANGES)
def test_shares_give_exactly_the_serial_figures(sim_log: Path, changes: Any) -> None:
    serial = backtest(sim_log, changes, jobs=1).to_json()
    assert serial["decisions"] == 1_500
    for jobs in (2, 3):
        assert backtest(sim_log, changes, jobs=jobs).to_json() == serial
    if changes:
        assert serial["decisions_changed"] > 0  # a variant that differs, summed over the shares the same


def test_a_run_in_shares_really_splits_the_sessions(sim_log: Path) -> None:
    heavy = backtest_module._heavy_sessions([sim_log], 2)
    owner = backtest_module._owner(heavy, 2)
    parts = [backtest_module._share_run(([str(sim_log)], {}, None, None, index, 2, heavy)) for index in range(2)]
    assert all(isinstance(p, backtest_module.BacktestResult) for p in parts)
    serial = backtest(sim_log, jobs=1)
    assert 0 < parts[0].decisions < serial.decisions and parts[0].decisions + parts[1].decisions == serial.decisions
    assert parts[0].records + parts[1].records == serial.records
    # Each share's reader yields its own sessions' records only.
    for index in range(2):
        sids = {r["session_id"] for r in read_file(sim_log, Tail(), share=Share(index, owner))}
        assert sids and all(owner(sid.encode()) == index for sid in sids)


def test_every_record_is_read_by_exactly_one_share_records_of_no_session_by_the_first(
        sim_log: Path, tmp_path: Path) -> None:
    records = read_log(sim_log)
    # Records of no session, and lines the prefix cannot place (key order, a float ts, escapes).
    records.insert(5, {"ts": 1, "event": "shard.restarted", "shard": 0, "error": None, "sessions": 3})
    records.insert(900, {"ts": 2, "event": "log.signed", "head_seq": 3, "head": "0" * 64, "signature": "1" * 64})
    moved = records[1200]
    records[1200] = {"event": moved["event"], "session_id": moved["session_id"],
                     **{k: v for k, v in moved.items() if k not in ("event", "session_id")}}
    log = write(tmp_path / "mixed.jsonl", records)
    serial = [r["seq"] for r in read_file(log, Tail())]
    for jobs in (2, 3):
        owner = backtest_module._owner(backtest_module._heavy_sessions([log], jobs), jobs)
        seen = sorted(r["seq"] for index in range(jobs) for r in read_file(log, Tail(), share=Share(index, owner)))
        assert seen == serial
    first = [r["event"] for r in read_file(log, Tail(), share=Share(0, lambda sid: 1))]
    assert first == ["shard.restarted", "log.signed"]
    assert both(log)[0] == both(log)[1]


def test_session_ids_of_any_text_land_in_one_share(sim_log: Path, tmp_path: Path) -> None:
    awkward = ['a "quoted" id', "back\\slash", "ünïcødé-会话", 'x","session_id":"y', "{[brackets]}", "\u2028 sep"]
    ids: dict[str, str] = {}
    records = read_log(sim_log)
    for r in records:
        sid = r.get("session_id")
        if sid is not None:
            r["session_id"] = ids.setdefault(sid, awkward[len(ids) % len(awkward)] + f" {len(ids)}")
    log = write(tmp_path / "awkward.jsonl", records, renumber=False)
    for changes in CHANGES[:2]:
        serial, shared = both(log, changes)
        assert shared == serial and serial["decisions"] == 1_500
    # An id no engine writes (a control character: the events refuse it) is a corrupt log, named, either way.
    records[40]["session_id"] = "tab\there"
    log = write(tmp_path / "control.jsonl", records, renumber=False)
    for jobs in (1, 2):
        with pytest.raises(LogCorrupt, match="seq 41: field session_id must be a string of 1 to 256 characters, no"):
            backtest(log, jobs=jobs)


def test_a_corrupt_line_is_reported_as_a_serial_run_reports_it(sim_log: Path, tmp_path: Path) -> None:
    lines = sim_log.read_bytes().splitlines(keepends=True)
    for n, bad in ((700, lines[700][:60] + b"\n"), (701, b"not json\n"),
                   (702, lines[702].replace(b'"seq":703', b'"seq":7030'))):
        log = tmp_path / f"bad{n}.jsonl"
        log.write_bytes(b"".join([*lines[:n], bad, *lines[n + 1:]]))
        with pytest.raises(LogCorrupt) as serial:
            backtest(log, jobs=1)
        with pytest.raises(LogCorrupt) as shared:
            backtest(log, jobs=2)
        assert str(shared.value) == str(serial.value) and f"line {n + 1}" in str(serial.value)
    torn = tmp_path / "torn.jsonl"
    torn.write_bytes(b"".join(lines) + lines[5][:70])  # a record cut at the end: skipped by both
    serial, shared = both(torn)
    assert shared == serial and serial["records"] == len(lines)


def test_what_only_a_serial_run_can_decide_runs_serially(sim_log: Path, tmp_path: Path) -> None:
    records = read_log(sim_log)
    # A session whose first decision lost its rules: decided under the last rules seen in the whole log.
    first = next(i for i, r in enumerate(records) if r["event"] == "decision.made" and "rules" in r and i > 100)
    del records[first]["rules"]
    no_rules = write(tmp_path / "no_rules.jsonl", records, renumber=False)
    # A line whose prefix names one session and whose record another (a repeated key).
    line = orjson.dumps(records[300]).replace(b'"session_id":', b'"session_id":"someone else","session_id":', 1)
    lines = [orjson.dumps(r) for r in read_log(sim_log)]
    lines[300] = line
    repeated = tmp_path / "repeated.jsonl"
    repeated.write_bytes(b"\n".join(lines) + b"\n")
    for log in (no_rules, repeated):
        assert backtest_module._parallel([log], (), None, None, 2) is None
        serial, shared = both(log, ["strike_limit=50"])
        assert shared == serial and serial["decisions"] == 1_500


def test_changes_given_as_an_iterator_are_read_once(sim_log: Path) -> None:
    serial = backtest(sim_log, ["strike_limit=50"], jobs=1).to_json()
    assert serial["decisions_changed"] > 0
    for jobs in (1, 2):
        assert backtest(sim_log, iter(["strike_limit=50"]), jobs=jobs).to_json() == serial


def test_jobs_default_and_bounds(sim_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serial = backtest(sim_log, jobs=1).to_json()
    started: list[int] = []
    real = backtest_module._parallel
    monkeypatch.setattr(backtest_module, "_parallel", lambda *a: started.append(a[-1]) or real(*a))
    assert backtest(sim_log).to_json() == serial and started == []  # a small log: this process
    monkeypatch.setattr(backtest_module, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(backtest_module, "_cpus", lambda: 2)
    # The caller runs other threads: stay here.
    monkeypatch.setattr(backtest_module, "_start_method", lambda: "forkserver")
    assert backtest(sim_log).to_json() == serial and started == []
    monkeypatch.setattr(backtest_module, "_start_method", lambda: "fork")  # a single-threaded caller (the CLI)
    assert backtest(sim_log).to_json() == serial and started == [2]
    sid = next(r["session_id"] for r in engine_read_log(sim_log) if "session_id" in r)
    assert backtest(sim_log, session=sid, jobs=2).decisions > 0 and started == [2]  # one session: serial
    with pytest.raises(backtest_module.NoSession, match="no records for session 'anything'"):
        backtest(sim_log, session="anything", jobs=2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidEvent) as err:
            backtest(sim_log, jobs=bad)  # type: ignore[arg-type]
        assert err.value.field == "jobs"


def test_cli_jobs(sim_log: Path) -> None:
    runs = [subprocess.run([*session_engine(), "backtest", str(sim_log), "--set", "strike_limit=50", "--json",
                            "--jobs", jobs], capture_output=True, text=True, check=True).stdout for jobs in ("1", "2")]
    assert orjson.loads(runs[0]) == orjson.loads(runs[1])
    bad = subprocess.run([*session_engine(), "backtest", str(sim_log), "-j", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--jobs" in bad.stderr


def test_a_share_that_dies_leaves_the_run_to_one_process(sim_log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A share killed before it answers (out of memory, a signal): the others are stopped and the run is made in
    the calling process, with the same figures; it never waits for an answer that cannot come."""
    import os
    import signal

    real = backtest_module._share_run

    def killed_second(task: tuple[Any, ...]) -> Any:
        if task[4] == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(task)

    monkeypatch.setattr(backtest_module, "_share_run", killed_second)
    monkeypatch.setattr(backtest_module, "_start_method", lambda: "fork")  # the forked shares run the patched function
    assert backtest_module._parallel([sim_log], ["strike_limit=50"], None, None, 2) is None
    serial = backtest(sim_log, ["strike_limit=50"], jobs=1).to_json()
    assert backtest(sim_log, ["strike_limit=50"], jobs=2).to_json() == serial


def _rotated(log: Path, segment_bytes: int = 32_768) -> None:
    """A log written by a store that rotates it (a file and its archives, or a directory of segments): each
    newer segment starts at a snapshot of the live sessions."""
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log, segment_bytes=segment_bytes)) as store:
        policy = Policy(store, {Tier.SIMPLE: "a/cheap", Tier.MEDIUM: "b/mid", Tier.COMPLEX: "c/big"},
                        Options(max_cost_usd=0.08, deadline_s=5.0))
        for i in range(900):
            sid = f"s{i % 37}"
            tier = (Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX)[i % 3 if i % 4 else 1]
            try:
                d = policy.route(Request(model={Tier.SIMPLE: "a/cheap", Tier.MEDIUM: "b/mid"}.get(tier, "c/big"),
                                         tier=tier, session_id=sid, estimate_usd=0.002,
                                         messages=[{"role": "user", "content": f"q{i % 3 if i % 5 else 0}"}]))
            except BudgetExceeded:
                continue
            policy.record_response(sid, micros=1_500 + i, decision=d)


@pytest.mark.parametrize("shape", ["file with archives", "segment directory"])
def test_a_rotated_log_is_shared_out_too_with_the_same_figures(tmp_path: Path, shape: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    if shape == "segment directory":
        (tmp_path / "log").mkdir()
        log = tmp_path / "log"
    else:
        log = tmp_path / "audit.jsonl"
    _rotated(log)
    files = history_files(log)
    assert len(files) >= 3  # several segments, each newer one opening with a snapshot
    started: list[Any] = []
    real = backtest_module._parallel
    monkeypatch.setattr(backtest_module, "_parallel", lambda *a: started.append(real(*a)) or started[-1])
    for changes in ([], ["strike_limit=1"], {"max_cost_usd": 0.02}):
        serial, shared = both(log, changes)
        assert shared == serial and serial["decisions"] == 900 - serial["not_rerun"]
        assert started[-1] is not None  # really shared out (the snapshots inside it are read by every share)
    # The oldest history deleted: the log starts at a snapshot, whose sessions have no rules of their own in
    # it: only a serial run can decide them (the last rules seen in the whole log stand in).
    files[0].unlink()
    serial, shared = both(log, ["strike_limit=1"])
    assert shared == serial and serial["decisions"] > 0 and started[-1] is None
