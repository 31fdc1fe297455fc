"""``session-engine backtest``: the recorded decisions re-run through the same rules with changed options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import Config, LogCorrupt, SessionStore, Tier, replay
from engine.policy import BudgetExceeded, Options, Policy, Request
from engine.tools.backtest import backtest, parse_changes
from engine.tools.workload import PRICES
from events import InvalidEvent
from tests.conftest import read_log


@pytest.fixture(scope="module")
def prices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulated catalogue's list prices as a LiteLLM-format price file."""
    path = tmp_path_factory.mktemp("prices") / "prices.json"
    path.write_bytes(orjson.dumps({m: {"input_cost_per_token": i / 1e6, "output_cost_per_token": o / 1e6}
                                   for m, (i, o) in PRICES.items()}))
    return path


def session_engine() -> list[str]:
    script = Path(sys.executable).with_name("session-engine")
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine"]


def figures(side: dict[str, Any]) -> dict[str, Any]:
    return {k: side[k] for k in ("cost_usd", "escalations", "refusals", "downgrades", "pin_switches")}


def test_no_change_reproduces_every_recorded_decision_of_a_simulation(sim_log: Path, prices: Path) -> None:
    result = backtest(sim_log, prices=prices).to_json()
    records = read_log(sim_log)
    decided = [r for r in records if r["event"] == "decision.made"]
    assert result["decisions"] == len(decided) > 1_000 and result["not_rerun"] == 0
    assert result["decisions_changed"] == 0
    assert result["variant"] == result["baseline"]
    base = result["baseline"]
    # The baseline is what the log says.
    assert base["cost_usd"] * 1e6 == pytest.approx(sum(r["micros"] for r in records if r["event"] == "cost.added"))
    assert base["escalations"] == sum(r["event"] == "session.escalated" for r in records) > 0
    assert base["refusals"] == sum(r.get("kind") == "refuse" for r in decided) > 0
    assert base["decisions_by_kind"]["switch"] > 0  # the simulated deployment outage


def test_a_strike_limit_above_every_run_escalates_less(sim_log: Path, prices: Path) -> None:
    result = backtest(sim_log, ["strike_limit=50"], prices=prices)
    assert result.baseline.escalations > 0
    assert result.variant.escalations < result.baseline.escalations
    assert result.variant.escalations == 0  # no run of identical requests reaches 50
    assert result.decisions_changed > 0


def test_a_small_cap_refuses_or_downgrades_more_and_spends_less(sim_log: Path, prices: Path) -> None:
    result = backtest(sim_log, {"max_cost_usd": 0.05}, prices=prices)
    base, var = result.baseline, result.variant
    assert var.refusals + var.downgrades > base.refusals + base.downgrades
    assert var.cost_micros < base.cost_micros
    assert result.repriced > 0  # downgraded requests are re-priced at the cheap model's price


def test_cli_json_has_the_binding_shape_and_the_python_apis_numbers(sim_log: Path, prices: Path) -> None:
    args = ["--set", "strike_limit=50", "--set", "max_cost_usd=0.2", "--prices", str(prices)]
    done = subprocess.run([*session_engine(), "backtest", str(sim_log), *args, "--json"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    out = orjson.loads(done.stdout)
    for side in ("baseline", "variant"):
        assert {"cost_usd", "escalations", "refusals", "downgrades"} <= set(out[side])
    assert isinstance(out["decisions_changed"], int)
    api = backtest(sim_log, {"strike_limit": 50, "max_cost_usd": 0.2}, prices=prices).to_json()
    assert out == api
    text = subprocess.run([*session_engine(), "backtest", str(sim_log), *args], capture_output=True, text=True,
                          timeout=120, check=False)
    assert text.returncode == 0 and "decisions changed" in text.stdout and "escalations" in text.stdout


def test_one_session_turn_by_turn(sim_log: Path, prices: Path) -> None:
    records = read_log(sim_log)
    counts: dict[str, int] = {}
    for r in records:
        if r["event"] == "decision.made":
            counts[r["session_id"]] = counts.get(r["session_id"], 0) + 1
    sid = max(counts, key=counts.__getitem__)
    same = backtest(sim_log, prices=prices, session=sid)
    assert len(same.turns) == counts[sid] == same.decisions
    assert not any(t.to_json()["changed"] for t in same.turns)
    assert sum(t.baseline_micros for t in same.turns) == same.baseline.cost_micros
    changed = backtest(sim_log, {"max_cost_usd": 0.01}, prices=prices, session=sid).to_json()
    assert changed["session"] == sid and any(t["changed"] for t in changed["turns"])
    done = subprocess.run([*session_engine(), "backtest", str(sim_log), "--session", sid, "--prices", str(prices)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.count("\n") >= counts[sid]


def test_another_model_table_reprices_from_token_counts(tmp_path: Path, prices: Path) -> None:
    """The table is what the rules pick from (escalation, downgrade, cache provider): a third identical
    request escalates to the table's COMPLEX model, which the variant's table replaces."""
    log = tmp_path / "audit.jsonl"
    table = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "anthropic/claude-sonnet-4.5",
             Tier.COMPLEX: "anthropic/claude-opus-4.1"}
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log)) as store:
        policy = Policy(store, table, Options(deadline_s=5.0))
        for _ in range(4):
            d = policy.route(Request(model="anthropic/claude-sonnet-4.5", tier=Tier.MEDIUM, session_id="s1",
                                     messages=[{"role": "user", "content": "it still fails"}]))
            p_in, p_out = PRICES[d.model]
            policy.record_response("s1", micros=round(1_000 * (p_in + p_out)), decision=d, prompt_tokens=1_000,
                                   completion_tokens=1_000)
    models = tmp_path / "models.json"
    models.write_bytes(orjson.dumps({"SIMPLE": "openai/gpt-4o-mini", "MEDIUM": "anthropic/claude-sonnet-4.5",
                                     "COMPLEX": "vllm/llama-3.3-70b"}))
    result = backtest(log, models=models, prices=prices)
    assert result.baseline.kinds == {"initialize": 1, "retain": 2, "escalate": 1}
    assert result.decisions == 4 and result.decisions_changed == 2  # the escalation and the turn after it
    assert result.repriced == 2 and result.baseline.escalations == result.variant.escalations == 1
    # Two sonnet turns (18,000 micros each on 1,000 + 1,000 tokens), then opus (90,000) -> llama (1,200).
    assert result.baseline.cost_micros == 2 * 18_000 + 2 * 90_000
    assert result.variant.cost_micros == 2 * 18_000 + 2 * 1_200


def test_bad_options_name_the_field(sim_log: Path) -> None:
    with pytest.raises(InvalidEvent, match="strike_limit"):
        parse_changes(["strike_limit=0"])
    with pytest.raises(InvalidEvent, match="colour"):
        parse_changes(["colour=red"])
    with pytest.raises(InvalidEvent, match="budget_mode"):
        parse_changes({"budget_mode": "lenient"})
    done = subprocess.run([*session_engine(), "backtest", str(sim_log), "--set", "strategy=chaotic"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and "strategy" in done.stderr
    missing = subprocess.run([*session_engine(), "backtest", str(sim_log.parent / "nope.jsonl")],
                             capture_output=True, text=True, timeout=60, check=False)
    assert missing.returncode != 0 and missing.stderr.count("\n") == 1


def test_an_older_log_says_what_it_cannot_rerun(tmp_path: Path) -> None:
    """Decision records without inputs (unavailable answers, logs that record none) are
    counted, not guessed; without recorded rules the decisions need --models."""
    log = tmp_path / "old.jsonl"
    lines = [
        {"seq": 1, "ts": 1_000, "event": "decision.made", "session_id": "a", "kind": "retain", "model": "m"},
        {"seq": 2, "ts": 1_001, "event": "session.created", "session_id": "b", "model": "m", "tier": "MEDIUM",
         "created_at": 1_001, "last_used_at": 1_001, "request_count": 1, "recent_hashes": [], "strikes": 0,
         "escalated": False, "user_explicit": False, "cache_sticky": False, "cache_sticky_at": 0, "provider": "",
         "session_cost_micros": 0, "deployment": ""},
        {"seq": 3, "ts": 1_001, "event": "decision.made", "session_id": "b", "kind": "initialize", "model": "m",
         "tier": "MEDIUM", "requested_model": "m", "requested_tier": "MEDIUM"},
    ]
    log.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines))
    result = backtest(log)
    assert (result.not_rerun, result.no_rules, result.decisions) == (1, 1, 0)
    models = tmp_path / "models.json"
    models.write_bytes(orjson.dumps({"MEDIUM": "m"}))
    with_table = backtest(log, models=models)
    assert (with_table.not_rerun, with_table.no_rules, with_table.decisions) == (1, 0, 1)
    assert with_table.decisions_changed == 0


def test_a_refusal_then_served_now_is_charged_at_its_estimate(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log)) as store:
        policy = Policy(store, {Tier.MEDIUM: "m"}, Options(max_cost_usd=0.01, budget_mode="strict", deadline_s=5.0))
        served = 0
        for i in range(4):
            try:
                d = policy.route(Request(model="m", tier=Tier.MEDIUM, session_id="s", estimate_usd=0.004,
                                         messages=[{"role": "user", "content": f"q{i}"}]))
            except BudgetExceeded:
                continue
            served += 1
            policy.record_response("s", micros=4_000, decision=d)
    assert served == 2
    result = backtest(log, {"max_cost_usd": 1})
    assert result.baseline.refusals == 2 and result.variant.refusals == 0
    assert result.estimated == 2 and result.variant.cost_micros == 4 * 4_000


def test_a_rotated_single_file_log_is_read_whole_and_a_cut_one_says_what_it_lacks(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log, segment_bytes=4096)) as store:
        policy = Policy(store, {Tier.SIMPLE: "a/cheap", Tier.MEDIUM: "b/mid"},
                        Options(max_cost_usd=0.05, deadline_s=5.0))
        for i in range(120):
            sid = f"s{i % 5}"
            try:
                d = policy.route(Request(model="b/mid", tier=Tier.MEDIUM, session_id=sid, estimate_usd=0.002,
                                         messages=[{"role": "user", "content": f"q{i % 7}"}]))
            except BudgetExceeded:
                continue
            policy.record_response(sid, micros=1_500, decision=d)
    archives = sorted(tmp_path.glob("audit.jsonl.*"))
    assert len(archives) >= 2
    decided = sum(r["event"] == "decision.made" for f in [*archives, log] for r in read_log(f))
    whole = backtest(log)
    assert whole.decisions == decided == 120 and whole.decisions_changed == 0
    assert whole.variant == whole.baseline
    archives[0].unlink()  # the oldest history is gone: the sessions' first turns (and rules) with it
    cut = backtest(log)
    left = sum(r["event"] == "decision.made" for f in [*archives[1:], log] for r in read_log(f))
    assert cut.decisions + cut.no_rules == left < decided


def _rewrite(src: Path, dst: Path, event: str, change: dict[str, Any]) -> int:
    """Copy a log, changing the fields of the first record named ``event``; returns its seq."""
    out, seq = [], 0
    for line in src.read_bytes().splitlines():
        record = orjson.loads(line)
        if not seq and record["event"] == event:
            record.update(change)
            seq = record["seq"]
        out.append(orjson.dumps(record))
    dst.write_bytes(b"\n".join(out) + b"\n")
    assert seq
    return seq


def test_the_reader_checks_every_field_backtest_reads_and_only_the_keys_of_records_it_counts(
        sim_log: Path, tmp_path: Path) -> None:
    """The backtest reads the turn records it only counts (touched, hash.recorded, ...) by their seq, event and
    session id: their other fields are not checked. Every record it re-runs or settles from is checked in full."""
    clean = backtest(sim_log).to_json()
    counted = tmp_path / "counted.jsonl"
    _rewrite(sim_log, counted, "session.touched", {"request_count": -1})
    assert backtest(counted).to_json() == clean
    with pytest.raises(LogCorrupt, match="field request_count"):
        replay(counted)  # replay folds it: checked
    for event, change, field in (("decision.made", {"estimates": {"m": -1}}, "estimates"),
                                 ("decision.made", {"request_hash": 7}, "request_hash"),
                                 ("cost.added", {"prompt_tokens": "many"}, "prompt_tokens"),
                                 ("session.touched", {"session_id": 7}, "session_id")):
        bad = tmp_path / f"bad-{field}.jsonl"
        seq = _rewrite(sim_log, bad, event, change)
        with pytest.raises(LogCorrupt, match=f"seq {seq}: field {field} "):
            backtest(bad)


@pytest.mark.parametrize(("bad", "field"), [({"strategy": "bogus"}, "rules.strategy"),
                                            ({"stall_window": 0}, "rules.stall_window"),
                                            ({"models": {"SIMPLE": 5}}, "rules.models"),
                                            ({"models": ["x"]}, "rules.models")])
def test_a_rules_object_out_of_its_domain_is_a_corrupt_log_naming_the_field(tmp_path: Path, bad: dict[str, Any],
                                                                            field: str) -> None:
    log = tmp_path / "audit.jsonl"
    store = SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log)))
    Policy(store, {Tier.SIMPLE: "a/x", Tier.MEDIUM: "a/y"}).route(
        Request(model="a/y", tier=Tier.MEDIUM, session_id="s1", messages=[{"role": "user", "content": "hi"}]))
    store.close()
    records = read_log(log)
    for record in records:
        if "rules" in record:
            record["rules"].update(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    with pytest.raises(LogCorrupt, match=rf"seq \d+ \(decision.made of session s1\): {field} "):
        backtest(broken)


def test_the_help_lists_every_option_backtest_can_change() -> None:
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.tools.backtest import OPTIONS

    text = " ".join(CliRunner().invoke(app, ["backtest", "--help"], env={"COLUMNS": "400"}).output.split())
    assert all(name in text for name in OPTIONS), [name for name in OPTIONS if name not in text]
    with pytest.raises(InvalidEvent, match="stall_detector"):
        parse_changes(["stall_detector=psychic"])
    assert parse_changes(["stall_lift=yes", "stall_detector=strikes"]) == {"stall_lift": True,
                                                                           "stall_detector": "strikes"}


def test_a_log_decided_on_every_candidate_is_re_run_as_it_was_decided(tmp_path: Path) -> None:
    """Logs from before ``candidates_by_provider`` (their ``rules`` lack it) switched a pin on another
    provider to the router's candidate: the backtest reproduces that, and the new rule changes it."""
    from events import Route, RouteRules

    log = tmp_path / "audit.jsonl"
    store = SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log)))
    old = RouteRules((("MEDIUM", ("openai/gpt-4o",)), ("COMPLEX", ("anthropic/claude-opus",))),
                     candidates_by_provider=False, affinity_by_record=False)
    keys = ("openai:k1", "openai:k2")
    store.ask(Route("s", "anthropic/claude-opus", Tier.COMPLEX, old, request_hash="h1", candidates=("anthropic:a",)))
    switched = store.ask(Route("s", "openai/gpt-4o", Tier.MEDIUM, old, request_hash="h2", candidates=keys))
    assert (switched.kind, switched.model, switched.deployment) == ("switch", "anthropic/claude-opus", "openai:k1")
    new = RouteRules(old.models, affinity_by_record=False)
    store.ask(Route("t", "anthropic/claude-opus", Tier.COMPLEX, new, request_hash="h1", candidates=("anthropic:a",)))
    kept = store.ask(Route("t", "openai/gpt-4o", Tier.MEDIUM, new, request_hash="h2", candidates=keys))
    assert (kept.kind, kept.model, kept.deployment) == ("retain", "anthropic/claude-opus", "")
    store.close()
    records = read_log(log)
    for record in records:
        if record.get("session_id") == "s":
            for name in ("candidates_by_provider", "affinity_by_record"):  # as such a log was written
                record.get("rules", {}).pop(name, None)
        elif record.get("session_id") == "t":
            record.get("rules", {}).pop("affinity_by_record", None)
    older = tmp_path / "older.jsonl"
    older.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    assert backtest(older).decisions_changed == 0
    assert backtest(log).decisions_changed == 0  # recorded as false: the same
