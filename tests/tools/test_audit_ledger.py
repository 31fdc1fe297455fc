"""A budget ledger continuation is the same lifetime (the same budget) in `audit` and `report`, not a new one.

A session that expires idle while it holds spend continues as its budget ledger (engine/core/transitions.py ``settle``:
``session.expired`` then ``session.created`` with ``cause: "budget_ledger"`` carrying the spend); a request
in the budget window pins a model on that ledger again. The lifetimes' costs sum to the log's ``cost.added``
micros, and the costliest lifetimes are distinct sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import orjson
from freezegun import freeze_time
from typer.testing import CliRunner

from engine import SessionStore
from engine.cli import app
from engine.log.replay import read_log
from engine.tools.audit import lives
from engine.tools.report import read_digest

TIMEOUT_MS = 600_000


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def ledger_log(make_store: Callable[..., SessionStore], log: Path) -> int:
    """alpha: spends, expires idle (its ledger continues), comes back in the window and spends again.
    beta: spends and stays. gamma: spends, expires, its ledger's window ends, then a new lifetime.
    Returns the micro-USD spent."""
    with freeze_time("2025-03-01 09:00:00") as frozen:
        store = make_store(event_log=log, timeout_ms=TIMEOUT_MS, budget_window_ms=3_600_000)
        store.set_session("alpha", "openai/gpt-4o-mini", "SIMPLE")
        store.add_session_cost("alpha", 400_000)
        store.set_session("gamma", "vllm/llama-3-70b", "MEDIUM")
        store.add_session_cost("gamma", 300_000)
        frozen.tick(timedelta(milliseconds=TIMEOUT_MS + 1_000))
        assert store.tick() == 2  # both expire; their ledgers continue
        store.set_session("alpha", "anthropic/claude-3-5-sonnet", "COMPLEX")  # back within the window
        store.add_session_cost("alpha", 250_000)
        store.set_session("beta", "openai/gpt-4o", "MEDIUM")
        store.add_session_cost("beta", 90_000)
        for _ in range(12):  # alpha and beta stay active; gamma's ledger window ends: it ends for good
            frozen.tick(timedelta(minutes=5))
            store.touch_session("alpha")
            store.touch_session("beta")
            store.tick()
        store.set_session("gamma", "vllm/llama-3-70b", "MEDIUM")  # a new session, a new budget
        store.add_session_cost("gamma", 5_000)
        store.close()
    return 400_000 + 300_000 + 250_000 + 90_000 + 5_000


def test_a_ledger_continuation_is_the_same_lifetime_and_its_cost_is_counted_once(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    spent = ledger_log(make_store, log)
    records = list(read_log(log, history=True))
    assert sum(r["micros"] for r in records if r["event"] == "cost.added") == spent
    assert sum(r.get("cause") == "budget_ledger" for r in records) == 2

    code, out, err = run("audit", str(log), "--json")
    assert (code, err) == (0, "")
    rows = orjson.loads(out)
    assert sum(row["cost_micros"] for row in rows) == spent, "every cost.added counted once"
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["session_id"], []).append(row)
    assert {sid: len(v) for sid, v in by_id.items()} == {"alpha": 1, "beta": 1, "gamma": 2}
    alpha = by_id["alpha"][0]
    assert alpha["cost_micros"] == 650_000 and alpha["requests"] == 14 and alpha["ended"] is None
    assert alpha["models"] == ["openai/gpt-4o-mini", "anthropic/claude-3-5-sonnet"]
    assert alpha["ledger_count"] == 1 and alpha["ledger"][0]["spent_micros"] == 400_000
    first, second = sorted(by_id["gamma"], key=lambda row: row["started_at"])
    assert (first["cost_micros"], first["ended"]["how"], first["ledger_count"]) == (300_000, "expired", 1)
    assert (second["cost_micros"], second["ended"], second["ledger_count"]) == (5_000, None, 0)
    assert sum(life.cost_micros for life in lives(read_log(log, history=True))) == spent

    code, out, _ = run("audit", str(log))
    assert code == 0 and out.splitlines()[-1] == "4 session lifetime(s), $1.045000 spent; times are UTC"
    assert "''" not in out and '""' not in out, "a ledger-only entry pins no model: none shown"

    code, out, _ = run("audit", str(log), "--session", "alpha")
    assert code == 0
    assert "budget ledger continued: $0.400000 spent, 0 reservation(s) held" in out
    assert "pinned to model ''" not in out and "tier none" not in out
    assert "request 1: pinned to model 'anthropic/claude-3-5-sonnet', tier COMPLEX" in out


def test_the_report_counts_a_ledger_once_and_its_top_sessions_are_distinct(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    spent = ledger_log(make_store, log)
    digest = read_digest(log, top=10)
    assert digest.spend_micros == spent and digest.lifetimes == 4
    top = digest.costliest()
    assert [(life.session_id, life.cost_micros) for life in top] == [
        ("alpha", 650_000), ("gamma", 300_000), ("beta", 90_000), ("gamma", 5_000)]
    assert sum(life.cost_micros for life in top) == spent
    alpha = next(t for t in digest.timelines if t.life.session_id == "alpha")
    assert [micros for _, micros in alpha.cost] == [400_000, 650_000], "one timeline across the ledger"
    assert [text for _, name, text in alpha.marks if name == "budget_ledger"] == [
        "expired: idle 601s, longer than the session timeout; budget ledger continued: $0.400000 spent, "
        "0 reservation(s) held ($0.000000); the pin ended idle, the spend counts against the same budget until its "
        "window ends (no model pinned until the next request)"]
    code, out, _ = run("report", str(log), "-o", str(tmp_path / "r.html"))
    assert code == 0 and "4 session lifetimes" in out and f"spend ${spent / 1e6:.6f}" in out
