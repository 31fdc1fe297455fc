"""`session-engine audit` and `session-engine replay` on a known log, and their errors.

The known log (tests/golden/known.jsonl) was written by the engine under a
frozen clock by ``write_known_log``; the expected outputs sit beside it.
Regenerate all of them with ``UPDATE_GOLDEN=1 pytest tests/tools/test_cli_audit.py``
after a deliberate change, and review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from freezegun import freeze_time
from typer.testing import CliRunner

from engine import SessionStore, replay
from engine.cli import app
from events import Decision, SetDeployment

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
KNOWN = GOLDEN / "known.jsonl"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def write_known_log(make_store: Callable[..., SessionStore], log: Path) -> None:
    """A short router story: escalation by strikes, a model switch, spend, a cache pin, the three endings."""
    with freeze_time("2025-03-01 09:00:00") as frozen:
        store = make_store(event_log=log, auto_escalate=True, timeout_ms=600_000, max_sessions=4,
                           budget_window_ms=0)  # the seed's endings: no ledger outlives them
        store.set_session("alpha", "openai/gpt-4o-mini", "SIMPLE")
        store.ask(Decision("alpha", "route", model="openai/gpt-4o-mini", tier="SIMPLE", reason="classifier",
                           strategy="tier", source="new-session"))
        for _ in range(3):
            frozen.tick(timedelta(seconds=2))
            store.record_request_hash("alpha", "9f2c")
        store.add_session_cost("alpha", 1_234)
        store.set_cache_sticky("alpha", "openai")
        store.ask(SetDeployment("alpha", "openai-eu"))
        frozen.tick(timedelta(seconds=5))
        store.set_session("beta", "anthropic/claude-3-5-sonnet", "COMPLEX", user_explicit=True)
        store.escalate_session("beta")
        store.add_session_cost("gamma", 50)
        store.set_session("alpha", "anthropic/claude-3-5-sonnet", "REASONING")
        frozen.tick(timedelta(seconds=400))
        store.is_cache_sticky("alpha")
        store.set_session("delta", "vllm/llama-3-70b", "MEDIUM")
        store.set_session("epsilon", "vllm/llama-3-70b", None)
        frozen.tick(timedelta(seconds=300))
        store.clear_session("delta")
        store.tick()
        store.close()


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"output differs from {path} (UPDATE_GOLDEN=1 regenerates it)"


def test_known_log_is_what_the_engine_writes(make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "known.jsonl"
    write_known_log(make_store, log)
    if UPDATE:
        KNOWN.write_bytes(log.read_bytes())
    assert replay(log) == replay(KNOWN)
    # Records of one session keep their order; records of different shards may interleave differently (the
    # capacity eviction is applied in the victim's shard while the test goes on), so compare per session.
    assert events_by_session(log) == events_by_session(KNOWN)


def events_by_session(path: Path) -> dict[str, list[str]]:
    by_session: dict[str, list[str]] = {}
    for line in path.read_bytes().splitlines():
        record = orjson.loads(line)
        by_session.setdefault(record.get("session_id", ""), []).append(record["event"])
    return by_session


def test_audit_prints_a_table_of_every_session_lifetime() -> None:
    code, out, err = run("audit", str(KNOWN))
    assert (code, err) == (0, "")
    check_golden("audit.txt", out)
    rows = {line.split()[-1]: line for line in out.splitlines()[1:-1]}
    assert "1: 09:00:06 strikes" in rows["alpha"] and "$0.001234" in rows["alpha"]
    assert rows["epsilon"].split()[-3:] == ["live", "-", "epsilon"]  # ended, tenant (none), id


def test_audit_json_is_machine_readable() -> None:
    code, out, _ = run("audit", str(KNOWN), "--json")
    assert code == 0
    check_golden("audit.json", out)
    lives = orjson.loads(out)
    alpha = next(life for life in lives if life["session_id"] == "alpha")
    assert alpha["escalations"][0]["reason"] == "strikes"
    assert alpha["models"] == ["openai/gpt-4o-mini", "anthropic/claude-3-5-sonnet"]
    assert alpha["cost_micros"] == 1_234
    assert alpha["ended"]["how"] == "expired"
    assert alpha["decisions"][0]["kind"] == "route"
    assert {life["session_id"]: life["ended"]["how"] for life in lives if life["ended"]} == {
        "alpha": "expired", "beta": "evicted", "gamma": "expired", "delta": "cleared"}


def test_audit_session_explains_each_transition_in_words() -> None:
    code, out, _ = run("audit", str(KNOWN), "--session", "alpha")
    assert code == 0
    check_golden("audit-alpha.txt", out)
    assert "repeated identical requests reached the strike limit" in out
    assert "expired: idle" in out


def test_audit_session_json() -> None:
    code, out, _ = run("audit", str(KNOWN), "--session", "beta", "--json")
    assert code == 0
    steps = orjson.loads(out)
    assert steps[0]["event"] == "session.created" and steps[0]["fields"]["user_explicit"] is True
    assert steps[-1]["event"] == "session.evicted"
    assert "least recently used" in steps[-1]["text"]


def test_replay_prints_the_rebuilt_state_as_json() -> None:
    code, out, _ = run("replay", str(KNOWN))
    assert code == 0
    check_golden("replay.json", out)
    state = orjson.loads(out)
    assert set(state) == set(replay(KNOWN)) == {"epsilon"}
    assert state["epsilon"]["model"] == "vllm/llama-3-70b"


def test_replay_and_audit_read_a_segment_directory(make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "segments"
    log.mkdir()
    with freeze_time("2025-03-01 09:00:00"):
        store = make_store(event_log=log, segment_bytes=4096)
        for i in range(80):
            store.set_session(f"s{i % 20}", "m", "SIMPLE")
        store.close()
    assert len(list(log.glob("*.jsonl"))) > 2
    code, out, _ = run("replay", str(log))
    assert code == 0 and len(orjson.loads(out)) == 20
    code, out, _ = run("audit", str(log))
    assert code == 0 and out.count("  s") == 20


@pytest.mark.parametrize("command", ["audit", "replay"])
def test_missing_file_is_one_clear_error_line(command: str, tmp_path: Path) -> None:
    code, out, err = run(command, str(tmp_path / "nope.jsonl"))
    assert code != 0 and out == ""
    assert err == f"session-engine: error: {tmp_path / 'nope.jsonl'}: no such file or directory\n"


@pytest.mark.parametrize("command", ["audit", "replay"])
def test_non_log_file_is_one_clear_error_line(command: str, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("shopping list\nmilk\n")
    code, out, err = run(command, str(notes))
    assert code != 0 and out == ""  # nothing on stdout, not even a table header
    assert err.count("\n") == 1 and "line 1: not a JSON log record" in err


def test_corrupt_middle_names_the_line(tmp_path: Path) -> None:
    lines = KNOWN.read_bytes().splitlines(keepends=True)
    lines[4] = b"}{ not json\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines))
    code, _, err = run("replay", str(bad))
    assert code != 0 and err.strip().endswith("line 5: not a JSON log record (needs seq and event)")


def test_unknown_session_is_an_error(tmp_path: Path) -> None:
    code, _, err = run("audit", str(KNOWN), "--session", "nobody")
    assert code != 0 and "no records for session 'nobody'" in err


@pytest.mark.parametrize("command", ["audit", "replay"])
def test_console_script_exits_non_zero_without_a_traceback(command: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "engine", command, str(tmp_path / "missing.jsonl")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
