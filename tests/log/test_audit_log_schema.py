"""Every record the engine writes matches docs/log-schema.json.

Two nets: a workload here that makes every record name in the catalogue
and validates each record; and, for the whole test run, a wrapper around
``FileLog.append`` installed when this module is imported, which validates
every record any test makes the engine write. Violations found by the
wrapper fail the run at its end (pytest_sessionfinish), naming the test.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from freezegun import freeze_time

import engine.core.transitions
from engine import InvalidEvent, SessionStore, ShardFailed
from engine.log.writer import FileLog
from engine.shell.capacity import SessionRefused
from events import Cost, Decision, Release, Route, RouteRules, SetDeployment
from events import records as record_names
from tests.conftest import read_log

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "log-schema.json"
SCHEMA = orjson.loads(SCHEMA_PATH.read_bytes())
jsonschema.Draft202012Validator.check_schema(SCHEMA)
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

# -- the run-wide net ---------------------------------------------------------------------------------

#: One validated example per record shape (name, keys, value types) keeps the net cheap on big workloads.
_seen_shapes: set[tuple[Any, ...]] = set()
_violations: list[str] = []
_checked = [0]
_guard = threading.Lock()


def _shape(record: dict[str, Any]) -> tuple[Any, ...]:
    return (record.get("event"), tuple((k, type(v).__name__, v if k in ("tier", "reason", "from_tier") else None)
                                       for k, v in record.items()))


def _check_emitted(records: list[dict[str, Any]]) -> None:
    for record in records:
        shape = _shape(record)
        with _guard:
            if shape in _seen_shapes:
                continue
            _seen_shapes.add(shape)
            _checked[0] += 1
        errors = list(VALIDATOR.iter_errors(record))
        if errors:
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
            with _guard:
                _violations.append(f"{test}: {record.get('event')}: {errors[0].message}")


_original_append = FileLog.append


def _validating_append(self: FileLog, records: list[dict[str, Any]]) -> int:
    seq = _original_append(self, records)
    _check_emitted(records)
    return seq


FileLog.append = _validating_append  # type: ignore[method-assign]


class _SchemaReport:
    """Fails the run when any test made the engine write a record the schema rejects."""

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if _violations:
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"audit-log schema: {len(_violations)} record(s) do not match "
                                    f"{SCHEMA_PATH.name}:", red=True)
                for line in _violations[:20]:
                    reporter.write_line(f"  {line}", red=True)
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(autouse=True, scope="module")
def _report_schema_violations(request: pytest.FixtureRequest) -> Iterator[None]:
    manager = request.config.pluginmanager
    if not manager.has_plugin("audit-log-schema"):
        manager.register(_SchemaReport(), "audit-log-schema")
    yield


# -- the workload ---------------------------------------------------------------------------------------

def _every_record(make_store: Callable[..., SessionStore], log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_apply = engine.core.transitions.apply

    def faulty(state: Any, event: Any, now: int, config: Any) -> Any:
        if event.session_id == "boom":
            raise RuntimeError("injected fault")
        return real_apply(state, event, now, config)

    monkeypatch.setattr("engine.shell.shard.apply", faulty)
    monkeypatch.setenv("SESSION_ENGINE_AUDIT_KEY", "test-key")  # signed heads: log.signed on close
    with freeze_time("2025-03-01 09:00:00") as frozen:
        store = make_store(event_log=log, auto_escalate=True, max_sessions=4, segment_bytes=4096,
                           timeout_ms=900_000, max_sessions_per_tenant=1, max_creations_per_tenant_per_minute=2)
        store.set_session("a", "openai/gpt-4o-mini", "SIMPLE")
        store.set_session("a", "openai/gpt-4o-mini", "SIMPLE", user_explicit=True)
        store.set_session("b", "anthropic/claude-3", None)
        store.set_session("b", "vllm/llama", "COMPLEX")
        store.touch_session("b")
        for _ in range(3):
            store.record_request_hash("b", "h")
        store.escalate_session("b")
        store.add_session_cost("b", 1_200)
        store.add_session_cost("cost-only", 5)
        store.set_cache_sticky("b", "vllm")
        store.ask(SetDeployment("b", "vllm-eu-1"))
        store.ask(SetDeployment("b", "vllm-eu-2", "vllm/llama-small", "SIMPLE"))  # a bypass's group pin
        store.ask(Decision("b", "route", model="vllm/llama", tier="COMPLEX", provider="vllm", reason="pinned",
                           strategy="sticky", source="session", deployment="vllm-eu-1"))
        store.ask(Decision("nobody", "reject"))
        frozen.tick(timedelta(milliseconds=610_000))  # past the TTL of "b"'s pin, inside the timeout
        store.is_cache_sticky("b")
        with pytest.raises(InvalidEvent):
            store.add_session_cost("b", -1)
        with pytest.raises(InvalidEvent):
            store.set_session("x\n", "m")
        with pytest.raises(ShardFailed):
            store.touch_session("boom")
        restarted = threading.Event()
        while store._rt is not None and store._rt.restarts == 0:
            restarted.wait(0.005)
        for i in range(6):
            store.set_session(f"fill-{i}", "m")  # past max_sessions: evictions
        tenant = "0123456789abcdef01234567"
        for i in range(2):
            store.set_session(f"{tenant}:t-{i}", "m")  # past max_sessions_per_tenant: its own is evicted
        with pytest.raises(SessionRefused):
            store.set_session(f"{tenant}:t-2", "m")  # past its creation rate: refused
        store.set_session("late", "m")
        store.clear_session("late")
        for i in range(60):
            store.set_session(f"bulk-{i}", "m", "MEDIUM")  # enough bytes to rotate
        # A routed turn with a budget: reserved, settled, released, and one left to lapse at the tick.
        rules = RouteRules(models=(("MEDIUM", ("m",)),), max_cost_micros=10**6, reservation_ttl_ms=1_000)
        for rid in ("r1", "r2", "r3"):
            store.ask(Route("budget", "m", "MEDIUM", rules, request_hash="h", tools=True, candidates=("d1",),
                            estimates=(("", 100),), reservation_id=rid))
        store.ask(Cost("budget", 90, "r1", prompt_tokens=10, completion_tokens=20))
        store.ask(Release("budget", "r2"))
        frozen.tick(timedelta(milliseconds=2_000))
        store.tick()  # r3's TTL has passed: the clock's deadline heap lapses it
        frozen.tick(timedelta(milliseconds=1_000_000))
        store.tick()
        store.set_session("z", "m")
        store.clear_all()
        store.close()


def _records(log: Path) -> list[dict[str, Any]]:
    files = [*sorted(log.parent.glob(log.name + ".*")), log]
    return [record for file in files for record in read_log(file)]


def test_every_record_name_is_emitted_and_matches_the_schema(
        make_store: Callable[..., SessionStore], log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _every_record(make_store, log_path, monkeypatch)
    records = _records(log_path)
    assert {r["event"] for r in records} == set(record_names.RECORD_NAMES)
    for record in records:
        errors = [e.message for e in VALIDATOR.iter_errors(record)]
        assert not errors, (record["event"], errors)


def test_schema_rejects_records_that_break_the_contract() -> None:
    good = {"seq": 1, "ts": 0, "event": "session.touched", "session_id": "a", "last_used_at": 1, "request_count": 2}
    assert VALIDATOR.is_valid(good)
    assert not VALIDATOR.is_valid({**good, "seq": 0})
    assert not VALIDATOR.is_valid({**good, "event": "session.renamed"})
    assert not VALIDATOR.is_valid({**good, "content": "raw prompt text"})  # never raw content
    assert not VALIDATOR.is_valid({k: v for k, v in good.items() if k != "session_id"})
    assert not VALIDATOR.is_valid({"seq": 2, "ts": 0, "event": "session.escalated", "session_id": "a",
                                   "tier": None, "escalated": True, "reason": "x", "from_tier": None})


def test_the_run_wide_net_has_found_no_bad_record_so_far() -> None:
    """Records other test modules made the engine write (validated as they were appended)."""
    assert _checked[0] > 0
    assert not _violations, _violations[:5]
