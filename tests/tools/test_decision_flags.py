"""A budget downgrade and a lifting stall escalation are fields of the decision (``Routed.downgrade``/``lift``,
``decision.made``'s ``downgrade``/``lift``), counted from the fields by the backtest, the report and simulate;
logs without the fields are read through one upcaster (``engine.log.replay.upcast_decision``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from engine import Tier
from engine.log.replay import upcast_decision
from engine.policy import Kind, Options, Policy, Request
from engine.tools.backtest import backtest
from engine.tools.report import read_digest
from engine.tools.simulation import RecordCounter
from tests.conftest import read_log
from tests.tools.test_stalls import MODELS, openai_loop, route


def _estimate(model: str, request: Request) -> float:
    return 0.001 if model.endswith("mini") else 0.006


def downgrade_log(make_store, log: Path) -> None:
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS, Options(max_cost_usd=0.01, estimator=_estimate))
    kinds = [policy.route(Request(model=MODELS[Tier.MEDIUM], tier=Tier.MEDIUM, session_id="b",
                                  messages=[{"role": "user", "content": f"q{i}"}])).kind for i in range(2)]
    store.close()
    assert kinds == [Kind.INITIALIZE, Kind.BYPASS]


def lift_log(make_store, log: Path) -> None:
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS, Options(stall_lift=True))
    a = ("read_file", {"path": "a"}, "A")
    for calls in ([], [a], [a, a], [a, a, a]):
        route(policy, "l", openai_loop("t", calls))
    store.close()


def rewrite(log: Path, change) -> None:
    """Each decision.made record of ``log`` through ``change`` (the rest as it was)."""
    lines = []
    for line in log.read_bytes().splitlines():
        record = orjson.loads(line)
        if record["event"] == "decision.made":
            change(record)
        lines.append(orjson.dumps(record))
    log.write_bytes(b"\n".join(lines) + b"\n")


def decisions(log: Path) -> list[dict[str, Any]]:
    return [r for r in read_log(log) if r["event"] == "decision.made"]


def test_the_decision_carries_the_downgrade_and_the_log_records_it(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    downgrade_log(make_store, log)
    first, second = decisions(log)
    assert "downgrade" not in first and second["downgrade"] is True and "lift" not in second


def test_the_decision_carries_the_lift_and_the_log_records_it(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    lift_log(make_store, log)
    lifted = [r for r in decisions(log) if r.get("lift")]
    assert len(lifted) == 1 and lifted[0]["kind"] == "bypass" and "downgrade" not in lifted[0]


def _unmark(record: dict[str, Any]) -> None:
    record["reason"] = "edited"


def test_a_downgrade_whose_reason_was_edited_is_still_counted(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    downgrade_log(make_store, log)
    rewrite(log, _unmark)  # downgrade: true, and no marker in the reason
    result = backtest(log)
    assert result.baseline.downgrades == 1 == result.variant.downgrades and result.decisions_changed == 0


def test_a_lift_whose_reason_was_edited_is_still_counted_by_backtest_and_report(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    lift_log(make_store, log)
    rewrite(log, _unmark)
    assert backtest(log).baseline.escalations == 1
    assert read_digest(log).escalations["strikes"] == 1


def test_a_log_written_before_the_fields_gives_the_same_figures(make_store, tmp_path):
    for make, field in ((downgrade_log, "downgrade"), (lift_log, "lift")):
        log = tmp_path / f"{field}.jsonl"
        make(make_store, log)
        now = backtest(log).to_json(), read_digest(log).escalations
        rewrite(log, lambda r, field=field: r.pop(field, None))  # as a log of an earlier version
        assert all(field not in r for r in (orjson.loads(x) for x in log.read_bytes().splitlines()))
        assert (backtest(log).to_json(), read_digest(log).escalations) == now


def test_the_upcaster_reads_only_a_bypass_without_the_fields():
    old = {"event": "decision.made", "kind": "bypass", "reason": "budget: $1 committed >= $1 cap; cheapest tier"}
    upcast_decision(old)
    assert old["downgrade"] is True and "lift" not in old
    lifted = {"kind": "bypass", "reason": "strike limit reached: medium -> complex for this request; pin kept, "
                                          "lifts on progress"}
    upcast_decision(lifted)
    assert lifted["lift"] is True and "downgrade" not in lifted
    retained = {"kind": "retain", "reason": "; cheapest tier"}
    upcast_decision(retained)
    assert "downgrade" not in retained


def test_simulate_counts_downgrades_from_the_field():
    counter = RecordCounter(1)
    counter.on_batch(0, 2, [{"event": "decision.made", "session_id": "s", "kind": "bypass", "downgrade": True,
                             "reason": "edited"},
                            {"event": "decision.made", "session_id": "t", "kind": "bypass",
                             "reason": "budget ...; cheapest tier"}], 0.0, 0)
    assert counter.downgrades == 1
