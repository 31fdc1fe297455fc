"""The "strikes" detector's threshold is a rule of the turn: ``Route.tool_errors`` carries the count
(``engine.policy.tool_error_run``), ``engine.core.rules`` applies ``STALL_ERRORS``, so a backtest re-runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine import Entry, Tier
from engine.core.config import default_config
from engine.core.rules import STALL_ERRORS, decide_route
from engine.policy import Options, Policy, Request
from engine.tools.backtest import backtest
from events import Hash, Route, RouteRules
from tests.conftest import read_log
from tests.e2e.test_route import failing_tool_turns
from tests.tools.test_decision_flags import rewrite
from tests.tools.test_stalls import MODELS, openai_loop, route

TABLE = (("SIMPLE", ("s",)), ("MEDIUM", ("m",)), ("COMPLEX", ("c",)))


def _hash_stall(detector: str, tool_errors: int, stall: bool = False) -> bool:
    rules = RouteRules(TABLE, stall_detector=detector)
    pinned = Entry("m", Tier.MEDIUM, 0, 0, 1, ("x",))
    _, events = decide_route(pinned, Route("s", "m", Tier.MEDIUM, rules, request_hash="new", stall=stall,
                                     tool_errors=tool_errors), default_config())
    return next(e for e in events if type(e) is Hash).stall


def test_the_rules_apply_the_threshold_to_the_count_the_route_carries():
    assert STALL_ERRORS == 3
    assert _hash_stall("strikes", STALL_ERRORS) and _hash_stall("strikes", STALL_ERRORS + 4)
    assert not _hash_stall("strikes", STALL_ERRORS - 1)
    assert _hash_stall("strikes", 0, stall=True)  # a caller's own signal is still a strike


def test_the_policy_sends_the_count_and_the_turn_counts_the_strike(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS, Options(stall_detector="strikes", strike_limit=1, deadline_s=10.0))
    policy.route(Request(model=MODELS[Tier.MEDIUM], tier=Tier.MEDIUM, session_id="e",
                         messages=[{"role": "user", "content": "start"}]))
    policy.route(Request(model=MODELS[Tier.MEDIUM], tier=Tier.MEDIUM, session_id="e",
                         messages=failing_tool_turns(STALL_ERRORS)))
    assert store.get_session("e").strikes == 1
    store.close()
    last = [r for r in read_log(log) if r["event"] == "decision.made"][-1]
    assert last["tool_errors"] == STALL_ERRORS and "stall" not in last and last["kind"] == "escalate"
    assert backtest(log).decisions_changed == 0


def _erroring(make_store, log: Path, options: Options) -> None:
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS, options)
    calls = [("run", {"cmd": f"make {i}"}, f"Error: exit 2 ({i})") for i in range(6)]
    for n in range(7):
        route(policy, "w", openai_loop("build it", calls[:n]))
    store.close()


def test_a_backtest_switching_to_the_strikes_detector_applies_its_threshold_to_the_recorded_count(make_store,
                                                                                                 tmp_path):
    log = tmp_path / "audit.jsonl"
    _erroring(make_store, log, Options())  # the window detector: tool_errors 1..6, a new hash every request
    recorded: list[dict[str, Any]] = [r for r in read_log(log) if r["event"] == "decision.made"]
    assert [r.get("tool_errors", 0) for r in recorded] == [0, 1, 2, 3, 4, 5, 6]
    strikes = backtest(log, ["stall_detector=strikes"])
    # Errors 3 and 4 are two strikes: the store's limit (2), an escalation; with no threshold in the turn
    # the recorded counts would read as no signal at all, and new hashes never strike.
    assert strikes.variant.escalations == 1 and strikes.decisions_changed >= 1


def test_a_strikes_log_written_with_the_callers_verdict_backtests_the_same(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS, Options(stall_detector="strikes", deadline_s=10.0))
    for n in range(7):
        policy.route(Request(model=MODELS[Tier.MEDIUM], tier=Tier.MEDIUM, session_id="f",
                             messages=failing_tool_turns(n, args=f'{{"n": {n % 2}}}') if n else
                             [{"role": "user", "content": "fix the build"}]))
    store.close()
    assert sum(r.get("tool_errors", 0) >= STALL_ERRORS for r in read_log(log) if r["event"] == "decision.made") >= 2
    now = backtest(log).to_json(), backtest(log, ["strike_limit=5"]).to_json()

    def as_written_before(record: dict[str, Any]) -> None:  # the caller applied the threshold, logged stall
        if record.pop("tool_errors", 0) >= STALL_ERRORS:
            record["stall"] = True

    rewrite(log, as_written_before)
    assert (backtest(log).to_json(), backtest(log, ["strike_limit=5"]).to_json()) == now
