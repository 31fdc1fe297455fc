"""``session-engine simulate --check``: the main job checks the engine's promises on its own log.

The promises are ``engine.tools.promises.check_promises`` (the state machine in
tests/e2e/test_promises.py holds every step to the same list): replay == live,
``audit --verify``, audit and report totals == the spend the callers reported,
no capped session over its cap. Each is shown to fail when its promise is
broken, so a check that cannot fail is not what passes here.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from engine import replay
from engine.cli import app
from engine.tools.promises import Promise, check_promises
from engine.tools.simulate import SimulationConfig, run_simulation
from tests.conftest import SIM_SETTINGS


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, str]:
    log = tmp_path_factory.mktemp("check") / "audit.jsonl"
    out = io.StringIO()
    result = run_simulation(SimulationConfig(log=log, check=True, **SIM_SETTINGS),  # type: ignore[arg-type]
                            out=Console(file=out, width=200))
    return log, result, out.getvalue()


def test_a_checked_run_holds_every_promise_and_prints_them(checked) -> None:
    _log, result, printed = checked
    names = [p.name for p in result.promises]
    assert names == ["replay == live", "audit --verify", "audit total == acknowledged",
                     "report total == acknowledged", "no capped session over its cap"]
    assert result.promises_held, result.promises
    for name in names:
        assert f"held  {name}: " in printed
    assert result.cost_micros > 0 and result.refusals + result.downgrades > 0  # the cap was reached


def test_each_promise_fails_when_it_is_broken(checked) -> None:
    log, result, _ = checked
    live = replay(log)
    spent = result.cost_micros
    cap = round(SIM_SETTINGS["max_cost_usd"] * 1_000_000)  # type: ignore[operator]

    def broken(live_state=live, acknowledged=spent, cap_micros=cap) -> set[str]:
        return {p.name for p in check_promises(log, live_state, acknowledged, cap_micros=cap_micros) if not p.held}

    assert broken() == set()
    sid, entry = next(iter(live.items()))
    assert broken(live_state={**live, sid: replace(entry, request_count=entry.request_count + 1)}) == {
        "replay == live"}
    assert broken(acknowledged=spent + 1) == {"audit total == acknowledged", "report total == acknowledged"}
    assert broken(cap_micros=result.max_session_cost_micros - 1) == {"no capped session over its cap"}


def test_a_tampered_log_breaks_verify_and_the_readers(checked, tmp_path: Path) -> None:
    log, result, _ = checked
    lines = log.read_bytes().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if b'"cost.added"' in line and b'"micros":0,' not in line)
    lines[index] = lines[index].replace(b'"micros":', b'"micros":1', 1)
    copy = tmp_path / "audit.jsonl"
    copy.write_bytes(b"".join(lines))
    failed = {p.name for p in check_promises(copy, replay(log), result.cost_micros) if not p.held}
    assert "audit --verify" in failed and "audit total == acknowledged" in failed


def test_the_cli_exits_non_zero_when_a_promise_is_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ["simulate", "--requests", "300", "--sessions", "20", "--concurrency", "2", "--log",
            str(tmp_path / "a.jsonl"), "--check", "--no-progress"]
    held = CliRunner().invoke(app, args)
    assert held.exit_code == 0, held.output
    assert "held  replay == live" in held.output
    import engine.tools.simulate as simulate

    real = simulate.check_promises
    monkeypatch.setattr(simulate, "check_promises", lambda *a, **k: [*real(*a, **k)[:-1],
                                                                    Promise("no capped session over its cap", False,
                                                                            "cap $0, costliest $1")])
    broken = CliRunner().invoke(app, args)
    assert broken.exit_code == 1
    assert "BROKEN  no capped session over its cap" in broken.output


def test_a_log_the_readers_refuse_breaks_the_cap_promise_too(checked, tmp_path: Path) -> None:
    """The cap is checked on the same pass as the audit: a pass that stops at a corrupt line proves nothing."""
    log, result, _ = checked
    lines = log.read_bytes().splitlines(keepends=True)
    lines[len(lines) // 2] = b"not a record\n"
    copy = tmp_path / "audit.jsonl"
    copy.write_bytes(b"".join(lines))
    cap = round(SIM_SETTINGS["max_cost_usd"] * 1_000_000)  # type: ignore[operator]
    failed = {p.name for p in check_promises(copy, replay(log), result.cost_micros, cap_micros=cap) if not p.held}
    assert {"audit total == acknowledged", "no capped session over its cap"} <= failed
