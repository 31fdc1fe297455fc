"""The stall detector (docs/policy.md "Stalls"): tool calls signed by name, canonical arguments
and result, a window anchored on the newest call, errored results as a signal, identical requests in a
row, and an escalation that lifts once the agent moves on when the operator asks for it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engine import Tier
from engine.policy import Kind, Options, Policy, Request, stall_reading
from engine.tools.backtest import backtest
from events import InvalidEvent, RouteRules
from tests.conftest import read_log

MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3"}


def openai_loop(task: str, calls: list[tuple[str, Any, str]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": task}]
    for n, (name, arguments, result) in enumerate(calls):
        args = arguments if isinstance(arguments, str) else json.dumps(arguments)
        messages.append({"role": "assistant", "content": "", "tool_calls": [
            {"id": f"c{n}", "type": "function", "function": {"name": name, "arguments": args}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{n}", "content": result})
    return messages


def anthropic_loop(task: str, calls: list[tuple[str, Any, str, bool]]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": task}]
    for n, (name, arguments, result, error) in enumerate(calls):
        messages.append({"role": "assistant", "content": [
            {"type": "text", "text": "let me look"},
            {"type": "tool_use", "id": f"t{n}", "name": name, "input": arguments}]})
        messages.append({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": f"t{n}", "content": [{"type": "text", "text": result}],
             "is_error": error}]})
    return messages


def test_calls_are_signed_by_name_canonical_arguments_and_result_on_both_surfaces():
    same = [("read_file", '{"path": "a.py", "lines": [1, 2]}', "x"),
            ("read_file", '{"lines":[1,2],"path":"a.py"}', "x"), ("read_file", {"path": "a.py", "lines": [1, 2]}, "x")]
    assert stall_reading(openai_loop("t", same), 6)[1] == 3  # key order and spacing do not matter
    anthropic = [("read_file", {"lines": [1, 2], "path": "a.py"}, "x", False)] * 3
    assert stall_reading(anthropic_loop("t", anthropic), 6)[1] == 3
    # Three different files, or the same call answered differently each time: progress.
    files = [("read_file", {"path": f"{n}.py"}, "x") for n in range(3)]
    assert stall_reading(openai_loop("t", files), 6)[1:] == (0, 0)
    polls = [("status", {"id": 7}, f"running {p}%") for p in (10, 50, 90)]
    assert stall_reading(openai_loop("t", polls), 6)[1:] == (0, 0)


def test_the_window_is_anchored_on_the_newest_call_and_bounded():
    a, b = ("read_file", {"path": "a"}, "A"), ("search", {"q": "z"}, "Z")
    assert stall_reading(openai_loop("t", [a, a, b, a]), 6)[1] == 3  # a lookup in between: still the loop
    assert stall_reading(openai_loop("t", [a, a, a, b]), 6)[1] == 0  # moved on: the old loop does not count
    assert stall_reading(openai_loop("t", [a, b, b, b, b, b, b, a]), 6)[1] == 0  # the first a is out of the window
    assert stall_reading(openai_loop("t", [a, b, b, b, b, a]), 6)[1] == 2


def test_errored_results_count_in_a_row_or_for_the_same_call_whatever_their_text():
    cmds = [("run", {"cmd": c}, f"Error: exit 2 ({c})") for c in ("make", "make -j1", "make all")]
    assert stall_reading(openai_loop("t", cmds), 6)[2] == 3  # chat completions: an "Error..." text
    flaky = [("fetch", {"u": 1}, "Error: timeout (req 1)"), ("fetch", {"u": 1}, "Error: timeout (req 2)"),
             ("search", {"q": "timeout"}, "ok"), ("fetch", {"u": 1}, "Error: timeout (req 3)")]
    assert stall_reading(openai_loop("t", flaky), 6)[1:] == (0, 3)
    fixed = [("run", {"cmd": "make"}, "Error: exit 2"), ("edit", {"f": 1}, "ok"), ("run", {"cmd": "make"}, "built")]
    assert stall_reading(openai_loop("t", fixed), 6)[2] == 0  # the newest succeeded
    flagged = [("bash", {"c": n}, "exit status 1", True) for n in range(3)]
    assert stall_reading(anthropic_loop("t", flagged), 6)[2] == 3  # Anthropic: is_error
    unflagged = [("bash", {"c": n}, "exit status 1", False) for n in range(3)]
    assert stall_reading(anthropic_loop("t", unflagged), 6)[2] == 0


def test_a_new_user_message_starts_a_new_window():
    a = ("read_file", {"path": "a"}, "A")
    messages = [*openai_loop("t", [a, a, a]), {"role": "assistant", "content": "done"},
                {"role": "user", "content": "now the tests"}]
    assert stall_reading(messages, 6)[1:] == (0, 0)
    h1, h2 = stall_reading(messages, 6)[0], stall_reading([*messages[:-1], {"role": "user", "content": "x"}], 6)[0]
    assert h1 != h2  # the hash reads the user's text


def route(policy: Policy, sid: str, messages: list[dict[str, Any]], tier: Tier = Tier.MEDIUM) -> Any:
    return policy.route(Request(model=MODELS[tier], tier=tier, session_id=sid, messages=messages,
                                tools=[{"type": "function", "function": {"name": "read_file"}}]))


def test_two_separate_double_repeats_do_not_escalate_but_three_in_a_row_do(make_store):
    # Before: strikes never decayed, so the second double repeat of a long session escalated.
    policy = Policy(make_store(), MODELS)
    kinds = [route(policy, "s", [{"role": "user", "content": text}]).kind for text in "aabccdd"]
    assert Kind.ESCALATE not in kinds
    assert route(policy, "s", [{"role": "user", "content": "d"}]).kind is Kind.ESCALATE  # the third "d"


def test_a_loop_of_erroring_calls_escalates(make_store, tmp_path):
    # Before: only the same call failing three times in a row was a signal.
    store = make_store(event_log=str(tmp_path / "audit.jsonl"))
    policy = Policy(store, MODELS)
    calls = [("run", {"cmd": c}, f"Error: exit 2 ({c})") for c in ("make", "make -j1", "make all")]
    kinds = [route(policy, "e", openai_loop("build it", calls[:n])).kind for n in range(4)]
    assert kinds == [Kind.INITIALIZE, Kind.RETAIN, Kind.RETAIN, Kind.ESCALATE]
    store.close()
    decision = [r for r in read_log(tmp_path / "audit.jsonl") if r["event"] == "decision.made"][-1]
    assert decision["tool_errors"] == 3 and "3 errored tool calls in the last 6" in decision["reason"]


def test_the_strike_limit_sets_the_repeats_a_stall_needs(make_store):
    policy = Policy(make_store(), MODELS, Options(strike_limit=3))
    a = ("read_file", {"path": "a"}, "A")
    kinds = [route(policy, "k", openai_loop("t", [a] * n)).kind for n in range(5)]
    assert kinds[:4] == [Kind.INITIALIZE, Kind.RETAIN, Kind.RETAIN, Kind.RETAIN] and kinds[4] is Kind.ESCALATE


def test_a_lifting_escalation_serves_one_tier_up_while_stalled_and_leaves_the_pin_alone(make_store):
    store = make_store()
    policy = Policy(store, MODELS, Options(stall_lift=True))
    a, b = ("read_file", {"path": "a"}, "A"), ("edit", {"path": "a"}, "ok")
    decisions = [route(policy, "l", openai_loop("t", calls)) for calls in ([], [a], [a, a], [a, a, a], [a, a, a, a],
                                                                            [a, a, a, a, b])]
    assert [(d.kind, d.model) for d in decisions] == [
        (Kind.INITIALIZE, "openai/gpt-4o"), (Kind.RETAIN, "openai/gpt-4o"), (Kind.RETAIN, "openai/gpt-4o"),
        (Kind.BYPASS, "openai/o3"), (Kind.BYPASS, "openai/o3"), (Kind.RETAIN, "openai/gpt-4o")]
    assert "lifts on progress" in decisions[3].reason
    entry = store.get_session("l")
    assert (entry.model, entry.tier, entry.escalated) == ("openai/gpt-4o", Tier.MEDIUM, False)


def test_a_user_explicit_pin_is_never_escalated_by_a_stall(make_store):
    policy = Policy(make_store(), MODELS)
    a = ("read_file", {"path": "a"}, "A")
    policy.route(Request(model="openai/gpt-4o", tier=Tier.MEDIUM, session_id="x", user_explicit=True,
                         messages=[{"role": "user", "content": "t"}]))
    assert {route(policy, "x", openai_loop("t", [a] * n)).kind for n in range(1, 5)} == {Kind.RETAIN}


def test_options_name_the_bad_field():
    for bad, field in (({"stall_detector": "magic"}, "stall_detector"), ({"stall_window": 0}, "stall_window"),
                       ({"stall_lift": "yes"}, "stall_lift")):
        with pytest.raises(InvalidEvent) as err:
            Options(**bad)
        assert err.value.field == field
        with pytest.raises(InvalidEvent):
            RouteRules(**bad)


def test_the_strikes_detector_keeps_the_seeds_behaviour(make_store):
    policy = Policy(make_store(), MODELS, Options(stall_detector="strikes"))
    kinds = [route(policy, "old", [{"role": "user", "content": text}]).kind for text in "aabb"]
    assert kinds[-1] is Kind.ESCALATE  # two separate double repeats: two strikes, the limit


def test_backtest_reads_an_older_log_as_the_strikes_detector_and_can_lift(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS, Options(stall_detector="strikes"))
    for text in "aabbc":
        route(policy, "old", [{"role": "user", "content": text}])
    store.close()
    # Strip the detector's fields from the rules object: a log without them.
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    for record in lines:
        for key in ("stall_detector", "stall_window", "stall_lift"):
            record.get("rules", {}).pop(key, None)
    old = tmp_path / "old.jsonl"
    old.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = backtest(old)
    assert result.decisions == 5 and result.decisions_changed == 0 and result.baseline.escalations == 1
    # The window detector on the same log: two separate double repeats are no stall.
    window = backtest(old, ["stall_detector=window"])
    assert window.variant.escalations == 0 and window.decisions_changed >= 1


def test_backtest_with_stall_lift_counts_lifting_escalations(make_store, tmp_path):
    log = tmp_path / "audit.jsonl"
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS)
    a, b = ("read_file", {"path": "a"}, "A"), ("edit", {"path": "a"}, "ok")
    for calls in ([], [a], [a, a], [a, a, a], [a, a, a, b]):
        route(policy, "lift", openai_loop("t", calls))
    store.close()
    same = backtest(log)
    assert same.decisions_changed == 0 and same.baseline.escalations == 1
    lifted = backtest(log, ["stall_lift=true"])
    assert lifted.variant.escalations == 1 and lifted.variant.pin_switches < lifted.baseline.pin_switches
    assert lifted.decisions_changed == 2  # the stalled request is a bypass; the next one is back on the pin


def test_measured_on_the_simulate_workload_ours_beats_litellms_rule_and_the_old_one():
    from tests.support.stall_eval import DETECTORS, measure

    f = measure(requests=6_000, sessions=300)
    ours, litellm, before = DETECTORS
    assert f.episodes > 50 and f.stall_requests >= f.episodes
    assert (f.false[ours], f.missed[ours]) == (0, 0)
    assert f.false[litellm] > 0 and f.missed[litellm] > 0  # progress taken for stalls; identical requests missed
    assert f.false[before] > 0 and f.missed[before] > 0  # decay-less strikes; a retry broken by a lookup


def test_the_report_counts_a_lifting_escalation_as_a_strike_escalation(make_store, tmp_path):
    from engine.tools.report import read_digest

    log = tmp_path / "audit.jsonl"
    store = make_store(event_log=str(log))
    policy = Policy(store, MODELS, Options(stall_lift=True))
    a = ("read_file", {"path": "a"}, "A")
    for calls in ([], [a], [a, a], [a, a, a]):
        route(policy, "r", openai_loop("t", calls))
    store.close()
    d = read_digest(log)
    assert d.escalations["strikes"] == 1 and not any(r["event"] == "session.escalated" for r in read_log(log))


def test_malformed_messages_name_the_field_and_malformed_tool_calls_are_read_as_none(make_store):
    policy = Policy(make_store(), MODELS)
    for bad in ([None, {"role": "user", "content": "x"}], [5], "hello", 5):
        with pytest.raises(InvalidEvent) as err:
            Request(model="openai/gpt-4o", tier=Tier.MEDIUM, session_id="m", messages=bad)
        assert err.value.field == "messages"
    junk = [{"role": "user", "content": "t"}, {"role": "assistant", "tool_calls": 5},
            {"role": "assistant", "tool_calls": [5, None, {"function": 7}, {"function": {"name": 3}}]},
            {"role": "assistant", "content": [None, 5, {"type": "tool_use", "id": [], "name": "f", "input": {1: {2}}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": 5, "is_error": "y"}]},
            {"role": "tool", "tool_call_id": None, "content": {"a": 1}}]
    assert route(policy, "m", junk).kind is Kind.INITIALIZE  # served; the junk carries no stall
    assert stall_reading(junk, 6)[1:] == (0, 0)
