"""The chain head leaves the machine: the log_head_seq metric, and `audit --verify --expect-head` checks it."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from freezegun import freeze_time
from typer.testing import CliRunner

from engine import Config, SessionStore
from engine.cli import app
from engine.log.chain import unseal
from engine.log.verify import parse_head, verify
from engine.metrics import Metrics
from tests.conftest import read_log

START = "2025-03-01 09:00:00"


def head_series(metrics: Metrics) -> list[tuple[str, float]]:
    """(head label, seq) of every log_head_seq sample exposed now."""
    return [(s.labels["head"], s.value) for family in metrics.registry.collect()
            if family.name == "session_engine_log_head_seq" for s in family.samples]


def seal_at(log: Path, seq: int) -> str:
    files = [*sorted(log.parent.glob(f"{log.name}.*")), log]
    for file in files:
        for record in read_log(file):
            if record["seq"] == seq:
                return record["chain"]
    raise AssertionError(f"no record {seq}")


def open_store(log: Path, metrics: Metrics, **settings: object) -> SessionStore:
    return SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log), **settings), observer=metrics)


def work(store: SessionStore, rounds: int) -> None:
    for round_ in range(rounds):
        for i in range(10):
            store.set_session(f"s{i}", f"m{round_}", "MEDIUM")
            store.add_session_cost(f"s{i}", 10 * (i + 1))


def test_the_metric_exports_the_head_at_every_rotation_and_close_as_one_series(
        log_path: Path) -> None:
    metrics = Metrics()
    with freeze_time(START):
        store = open_store(log_path, metrics, segment_bytes=4096)
        assert head_series(metrics) == [], "a new log has no head yet"
        seen = set()
        for _ in range(6):
            work(store, 2)
            series = head_series(metrics)
            assert len(series) <= 1, "the previous head's series is removed"
            seen.update(series)
        assert len(seen) >= 2, "rotations exported new heads"
        for label, seq in seen:  # each exported head is the seal the log holds at that seq
            assert seal_at(log_path, int(seq)).startswith(label) and len(label) == 16
        store.close()
    [(label, seq)] = head_series(metrics)
    report = verify(log_path)
    assert report.status == "verified" and report.head_seq == seq and report.head.startswith(label)

    restarted = Metrics()
    with freeze_time(START):
        store = open_store(log_path, restarted)
        assert head_series(restarted) == [(label, seq)], "a store started on a chained log exports its head at once"
        store.close()


def rebuild_chain(log: Path, edit: Callable[[dict], None]) -> None:
    """What someone with the code but no key can do: change a record, then recompute every seal."""
    out = bytearray()
    hasher = None
    for raw in log.read_bytes().splitlines(keepends=True):
        record = orjson.loads(raw)
        if hasher is None:
            hasher = hashlib.sha256(bytes.fromhex(record["genesis"]))
        sealed = unseal(raw)
        if sealed is None:
            edit(record)
            line = orjson.dumps(record) + b"\n"
            hasher.update(line)
            out += line
            continue
        del record["chain"]
        edit(record)
        content = orjson.dumps(record) + b"\n"
        hasher.update(content)
        head = hasher.digest()
        out += content[:-2] + b',"chain":"' + head.hex().encode() + b'"}\n'
        hasher = hashlib.sha256(head)
    log.write_bytes(bytes(out))


def test_an_exported_head_catches_a_rebuilt_chain_and_a_truncated_log(
        log_path: Path) -> None:
    metrics = Metrics()
    with freeze_time(START):
        store = open_store(log_path, metrics)
        work(store, 3)
        store.close()
    [(label, seq)] = head_series(metrics)
    exported = f"{int(seq)}:{label}"
    original = log_path.read_bytes()
    runner = CliRunner()

    result = runner.invoke(app, ["audit", "--verify", "--expect-head", exported, str(log_path)])
    assert result.exit_code == 0, result.output
    assert f"expected head {exported}: matched" in result.output

    def cheaper(record: dict) -> None:
        if record.get("event") == "cost.added" and record["session_id"] == "s9":
            record["micros"] = 1
    rebuild_chain(log_path, cheaper)
    assert verify(log_path).status == "verified", "without a key or an exported head a rebuilt chain passes"
    result = runner.invoke(app, ["audit", "--verify", "--json", "--expect-head", exported, str(log_path)])
    assert result.exit_code == 1
    problem = orjson.loads(result.output)["problem"]
    assert problem["seq"] == int(seq) and "rebuilt" in problem["rule"]

    lines = original.splitlines(keepends=True)
    log_path.write_bytes(b"".join(lines[:-4]))  # the newest records cut, after an earlier batch's seal
    assert verify(log_path).status == "verified", "without an exported head a truncation passes"
    report = verify(log_path, expect=parse_head(exported))
    assert report.status == "bad" and "were cut" in report.problem.rule


@pytest.mark.parametrize("text", ["12", "x:abcdef12", "5:abc", "5:" + "g" * 16, "5:" + "a" * 65])
def test_a_malformed_expected_head_is_a_usage_error(log_path: Path, text: str) -> None:
    log_path.write_bytes(b"")
    result = CliRunner().invoke(app, ["audit", "--verify", "--expect-head", text, str(log_path)])
    assert result.exit_code == 2 and "--expect-head" in result.output


def test_expect_head_needs_verify(log_path: Path) -> None:
    log_path.write_bytes(b"")
    result = CliRunner().invoke(app, ["audit", "--expect-head", "1:abcdef12", str(log_path)])
    assert result.exit_code == 2
