"""The main job: ``session-engine simulate`` drives a router workload through the routing policy
(default) or the store's seed API (``workload="seed"``), on a real store."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from rich.console import Console

import engine._time as engine_time
from engine.tools.simulate import SimulationConfig, run_simulation
from engine.tools.simulation import SimulationResult
from engine.tools.workload import OUTAGE, OUTAGE_DEPLOYMENT, PolicyRouter, Request
from events import EngineError, InvalidEvent, Tier, tier_above
from events import records as record_names
from tests.conftest import read_log

# Small enough for a test, with a clock fast enough that quiet conversations expire; a cap small enough
# that busy sessions reach it.
SMALL = {"sessions": 50, "requests": 2_000, "concurrency": 4, "shards": 2, "timeout_s": 60, "clock_speed": 0.5,
         "max_cost_usd": 0.6}
SEED = {"workload": "seed"}


def simulate(tmp_path: Path, **overrides: object) -> tuple[SimulationResult, str]:
    settings = {**SMALL, "log": tmp_path / "audit.jsonl", **overrides}
    out = io.StringIO()
    result = run_simulation(SimulationConfig(**settings), out=Console(file=out, width=120))  # type: ignore[arg-type]
    return result, out.getvalue()


def counts(result: SimulationResult) -> dict[str, object]:
    """Everything a run reports except what depends on the machine."""
    fields = dataclasses.asdict(result)
    del fields["wall_s"], fields["peak_threads"]
    return fields


def session_engine() -> list[str]:
    script = Path(sys.executable).with_name("session-engine")
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine"]


def test_policy_workload_routes_every_request_through_the_policy(tmp_path: Path) -> None:
    result, _ = simulate(tmp_path)
    records = read_log(tmp_path / "audit.jsonl")
    decisions = [r for r in records if r["event"] == record_names.DECISION_MADE]
    assert len(decisions) == result.requests == sum(result.decisions.values())
    assert all("requested_model" in r and "rules" in decisions[0] for r in decisions)  # every one a routed turn
    assert {"initialize", "retain", "bypass", "escalate", "upgrade", "switch", "refuse"} <= set(result.decisions)
    assert result.refusals == result.decisions["refuse"] > 0 and result.downgrades > 0
    assert result.unavailable == 0  # the simulation waits for the engine (deadline_s), so no unavailable
    assert any(r.get("tools") for r in decisions)
    # Agent loops stall: the same call and result again and again, errors in a row; the detector escalates.
    assert any(r.get("tool_repeats", 0) >= 3 for r in decisions)
    assert any(r.get("tool_errors", 0) >= 3 for r in decisions)
    assert any(r["kind"] == "escalate" and "same tool call and result" in r["reason"] for r in decisions)
    assert any(r.get("explicit") for r in decisions) and result.cache_pins > 0
    # Every served request under the cap reserved its estimate, and its response settled it.
    reserved = {r["reservation_id"] for r in records if r["event"] == record_names.BUDGET_RESERVED}
    settled = {r["reservation_id"] for r in records if r["event"] == record_names.COST_ADDED and "reservation_id" in r}
    assert reserved and settled == reserved
    assert sum(r["kind"] != "refuse" for r in decisions) == len(reserved)
    # Settled spend passes the cap only by what the last responses cost above their estimates.
    assert 0 < result.max_session_cost_micros <= 0.6e6 * 1.1 and result.sessions_capped > 0
    # The outage: the deployment that is down is never offered while it is down; sessions served by it
    # switch to the other one then, and only then.
    start = 1_735_689_600_000 + int(OUTAGE[0] * 2_000 * 500)
    end = 1_735_689_600_000 + int(OUTAGE[1] * 2_000 * 500)
    assert not any(OUTAGE_DEPLOYMENT in r.get("candidates", ()) for r in decisions if start <= r["ts"] < end)
    # The router offers its own model's deployments; a pin on another provider's model uses none of them,
    # so every switch is a real one: during the outage, to the other deployment.
    other = OUTAGE_DEPLOYMENT.replace("east", "west")
    moved = [r for r in decisions if r["kind"] == "switch"]
    assert moved and all(start <= r["ts"] < end and r["deployment"] == other for r in moved)


def test_seed_workload_escalates_expires_pins_and_charges(tmp_path: Path) -> None:
    result, _ = simulate(tmp_path, **SEED)
    assert result.requests == 2_000
    assert result.escalations > 0
    assert result.strikes >= 2 * result.escalations  # the third identical request in a row escalates
    assert result.expiries > 0 and result.expiries_by_clock > 0
    assert result.resumed_after_expiry > 0
    assert result.cache_pins > 0
    assert result.explicit_pins > 0
    assert result.cost_micros > 0
    assert 0 < result.live_sessions <= result.sessions_seen <= 50


def test_audit_log_holds_every_transition_with_seq_1_to_n(tmp_path: Path) -> None:
    result, _ = simulate(tmp_path, **SEED)
    records = read_log(tmp_path / "audit.jsonl")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert result.records == len(records) and result.log_seq_ok
    by_name = Counter(r["event"] for r in records)
    assert by_name[record_names.HASH_RECORDED] == result.requests
    assert by_name[record_names.COST_ADDED] == result.requests
    assert by_name[record_names.SESSION_ESCALATED] == result.escalations
    assert by_name[record_names.SESSION_EXPIRED] == result.expiries
    assert by_name[record_names.STICKY_PINNED] == result.cache_pins
    assert sum(r["micros"] for r in records if r["event"] == record_names.COST_ADDED) == result.cost_micros
    # The workload escalates only by strikes (auto_escalate, default strike limit 2), one tier at a time.
    escalated = [r for r in records if r["event"] == record_names.SESSION_ESCALATED]
    assert escalated and all(r["reason"] == "strikes" and r["strikes"] >= 2 for r in escalated)
    assert all(r["tier"] == tier_above(Tier(r["from_tier"]) if r["from_tier"] else None).value for r in escalated)


def test_audit_log_never_holds_message_content(tmp_path: Path) -> None:
    simulate(tmp_path)
    text = (tmp_path / "audit.jsonl").read_text()
    assert "lorem" not in text and "ipsum" not in text


def test_summary_names_every_count(tmp_path: Path) -> None:
    result, summary = simulate(tmp_path)
    for label in ("requests routed", "sessions seen", "live sessions", "strikes", "escalations", "expiries",
                  "cache pins", "user-explicit pins", "total cost", "log records written", "events/s", "threads",
                  "decisions by kind", "refusals / downgrades", "engine unavailable", "spend against caps"):
        assert label in summary
    assert f"{result.refusals:,} / {result.downgrades:,}" in summary
    assert f"{result.escalations:,}" in summary
    assert f"${result.cost_micros / 1_000_000:,.2f}" in summary
    assert "no gaps" in summary


@pytest.mark.parametrize("workload", ["policy", "seed"])
def test_same_seed_gives_same_counts_whatever_the_concurrency(tmp_path: Path, workload: str) -> None:
    first, _ = simulate(tmp_path, concurrency=1, workload=workload)
    second, _ = simulate(tmp_path, concurrency=6, shards=3, workload=workload)
    assert counts(first) == counts(second)
    if workload == "policy":  # every number of the summary, decisions and spend included
        assert first.decisions == second.decisions and first.refusals + first.downgrades > 0


def test_another_seed_gives_another_workload(tmp_path: Path) -> None:
    first, _ = simulate(tmp_path, seed=1)
    second, _ = simulate(tmp_path, seed=2)
    assert first.requests == second.requests
    assert counts(first) != counts(second)


def test_existing_log_and_its_rotated_segments_are_replaced(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").write_text("an older run\n" * 10)
    rotated = tmp_path / f"audit.jsonl.{1:020d}"
    rotated.write_text("an older segment\n")
    unrelated = tmp_path / "audit.jsonl.bak"
    unrelated.write_text("keep me\n")
    result, _ = simulate(tmp_path)
    records = read_log(tmp_path / "audit.jsonl")
    assert records[0]["seq"] == 1 and len(records) == result.records
    assert not rotated.exists()
    assert unrelated.read_text() == "keep me\n"


def test_capacity_evicts_least_recently_used_sessions(tmp_path: Path) -> None:
    result, summary = simulate(tmp_path, max_sessions=10)
    assert result.evictions > 0
    assert result.live_sessions <= 10
    assert "evictions" in summary


def test_engine_clock_is_restored_after_the_run(tmp_path: Path) -> None:
    original = engine_time._read
    simulate(tmp_path, requests=200)
    assert engine_time._read is original


def test_worker_failure_stops_the_run_with_that_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = engine_time._read
    route = PolicyRouter.route
    seen = []

    def failing(self: PolicyRouter, req: Request) -> None:
        seen.append(req.number)
        if len(seen) == 300:
            raise EngineError("upstream router broke")
        route(self, req)

    monkeypatch.setattr(PolicyRouter, "route", failing)
    with pytest.raises(EngineError, match="upstream router broke"):
        simulate(tmp_path)
    assert engine_time._read is original  # and no thread survives (the autouse fixture checks)
    assert len(seen) < SMALL["requests"]


@pytest.mark.parametrize(("field", "value"), [
    ("sessions", 0), ("requests", -1), ("concurrency", True), ("clock_speed", 0.0), ("max_sessions", 0),
    ("timeout_s", 1.5), ("workload", "random"), ("max_cost_usd", -1), ("deadline_s", 0),
])
def test_bad_option_names_the_field(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(InvalidEvent, match=field):
        SimulationConfig(**{field: value, "log": tmp_path / "a.jsonl"})  # type: ignore[arg-type]


def test_cli_prints_summary_and_writes_log(tmp_path: Path) -> None:
    log = tmp_path / "run.jsonl"
    proc = subprocess.run(
        [*session_engine(), "simulate", "--sessions", "50", "--requests", "2000", "--timeout-s", "60",
         "--clock-speed", "0.5", "--log", str(log)],
        capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "escalations" in proc.stdout and "total cost" in proc.stdout and "policy workload" in proc.stdout
    assert "decisions by kind" in proc.stdout and "spend against caps" in proc.stdout
    assert proc.stderr == ""  # no progress bar garbage when stderr is not a terminal
    records = read_log(log)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))


@pytest.mark.parametrize("where", ["missing/dir/audit.jsonl", "a-file/audit.jsonl"])
def test_cli_bad_log_directory_is_one_line_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    proc = subprocess.run([*session_engine(), "simulate", "--requests", "100", "--log", str(tmp_path / where)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("session-engine: error:"), proc.stderr
    assert "audit log" in lines[0] and where.split("/")[0] in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_interrupted_run_exits_130_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from engine.cli import app

    route = PolicyRouter.route
    seen = []

    def interrupted(self: PolicyRouter, req: Request) -> None:
        seen.append(req.number)
        if len(seen) == 100:
            raise KeyboardInterrupt  # as if ^C arrived while this request was routed
        route(self, req)

    monkeypatch.setattr(PolicyRouter, "route", interrupted)
    result = CliRunner().invoke(app, ["simulate", "--requests", "2000", "--log", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 130
    assert "interrupted" in result.output and "Traceback" not in result.output
    records = read_log(tmp_path / "a.jsonl")
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
