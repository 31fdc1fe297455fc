"""The audit log proves itself: a hash chain over the records, `audit --verify`, checked replay.

Logs here are written by the engine (real stores, real files); tampering is
done to the bytes on disk, as an operator's editor or an attacker would.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from engine import SessionStore, replay
from engine.cli import app
from engine.log import chain
from engine.log.replay import LogCorrupt
from engine.log.verify import verify
from events import Cost, Hash, SetSession, Touch
from tests.conftest import read_log

KEY = "test-signing-key-0123456789"


def _workload(store: SessionStore, rounds: int = 12, prefix: str = "s") -> None:
    """Asks (batches of one) and tell_many (batches of many), costs, hashes, escalations, expiry, clears."""
    for i in range(rounds):
        sid = f"{prefix}{i % 5}"
        store.set_session(sid, "openai/gpt-4o-mini", "SIMPLE")
        store.tell_many([Touch(sid), Hash(sid, "h"), Cost(sid, 10 + i), SetSession(f"{prefix}x{i}", "m", "MEDIUM")])
        store.record_request_hash(sid, "h")
        if i % 4 == 3:
            store.escalate_session(sid)
            store.clear_session(f"{prefix}x{i - 1}")
        store.add_session_cost(sid, 7)


class _Heads(logging.Handler):
    """The chain heads a store exports to the host's log (logger "engine", INFO) at rotation and close."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.heads: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = re.search(r"audit log head seq=(\d+) sha256=([0-9a-f]{64})", record.getMessage())
        if match:
            self.heads.append((int(match.group(1)), match.group(2)))

    def __enter__(self) -> _Heads:
        self.logger = logging.getLogger("engine")
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


@pytest.fixture(scope="module")
def written_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, tuple[int, str]]:
    """A log the engine wrote (across a restart), and the chain head the store exported when it closed."""
    from engine import Config

    path = tmp_path_factory.mktemp("chain") / "audit.jsonl"
    with freeze_time("2025-03-01 09:00:00") as frozen, _Heads() as exported:
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=path, auto_escalate=True, timeout_ms=60_000))
        _workload(store)
        store.close()
        frozen.tick(120)  # everything idle past the timeout: expiry records after the restart
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=path, auto_escalate=True, timeout_ms=60_000))
        store.tick()
        _workload(store, rounds=6, prefix="t")
        store.close()
    assert len(exported.heads) == 2
    return path.read_bytes(), exported.heads[-1]


def _verify_bytes(tmp_path: Path, data: bytes, key: bytes | None = None) -> object:
    path = tmp_path / "copy.jsonl"
    path.write_bytes(data)
    return verify(path, key)


def _caught(report: object, head: tuple[int, str]) -> bool:
    """Detected: a bad record, a torn or unsealed tail, or a head that is not the one exported."""
    r = report
    return (r.status != "verified" or bool(r.torn_tail_bytes) or bool(r.unsealed_tail_records)  # type: ignore[attr-defined]
            or (r.head_seq, r.head) != head)  # type: ignore[attr-defined]


# -- logs the engine writes verify clean ---------------------------------------------------------------------

def test_a_log_written_across_a_restart_verifies_clean(tmp_path: Path, written_log: tuple[bytes, tuple]) -> None:
    data, head = written_log
    report = _verify_bytes(tmp_path, data)
    assert report.status == "verified" and report.problem is None, report.problem
    assert report.anchor == "genesis" and report.anchor_seq == 1
    assert (report.head_seq, report.head) == head == (report.last_seq, report.head)
    records = [orjson.loads(line) for line in data.splitlines()]
    assert "genesis" in records[0] and sum("genesis" in r for r in records) == 1  # one chain, across the restart
    # Batches share one seal: fewer seals than records (tell_many wrote several records per write).
    assert 0 < report.seals < report.records == len(records)


def test_logs_across_rotations_and_snapshots_verify_clean_as_a_file_and_as_a_directory(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    for name in ("file.jsonl", "segments/"):
        target = tmp_path / name
        store = make_store(event_log=f"{tmp_path}/{name}", segment_bytes=4096)  # a trailing / makes a directory
        _workload(store, rounds=40)
        store.close()
        with _Heads() as exported:
            store = make_store(event_log=f"{tmp_path}/{name}", segment_bytes=4096)
            _workload(store, rounds=10, prefix="r")
            store.close()
        head = exported.heads[-1]
        report = verify(target)
        assert report.status == "verified", (target, report.problem)
        assert report.files > 3 and (report.head_seq, report.head) == head
        # Older segments deleted: the newest snapshot's chain_head anchors what is left.
        old = sorted(target.glob("*.jsonl"))[:-1] if target.is_dir() else sorted(tmp_path.glob("file.jsonl.*"))
        assert len(old) >= 3
        for segment in old:
            segment.unlink()
        report = verify(target)
        assert report.status == "verified" and report.anchor == "snapshot", report.problem
        assert (report.head_seq, report.head) == head


@pytest.mark.parametrize("mode", ["record", "batch"])
def test_both_chain_modes_verify_and_the_default_is_batch(make_store: Callable[..., SessionStore], log_path: Path,
                                                          mode: str) -> None:
    store = make_store(event_log=log_path, audit_chain=mode)
    assert make_store().config.audit_chain == "batch"
    store.tell_many([SetSession(f"s{i}", "m") for i in range(50)])
    store.get_stats()
    store.close()
    report = verify(log_path)
    assert report.status == "verified"
    assert report.seals == (50 if mode == "record" else report.seals) and report.seals >= 1


def test_a_log_without_a_chain_replays_and_verifies_as_unchained_then_gets_one(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    old = Path(__file__).parents[1] / "golden" / "known.jsonl"  # a log without a chain
    log = tmp_path / "old.jsonl"
    log.write_bytes(old.read_bytes())
    assert replay(log) == replay(old)
    report = verify(log)
    assert report.status == "unchained" and report.exit_code == 3 and report.unchained_records == 20
    store = make_store(event_log=log)  # a newer store continues it: the chain starts at its first record
    store.set_session("new", "m")
    store.close()
    report = verify(log)
    assert report.status == "verified" and report.unchained_records == 20 and report.anchor_seq == 21


# -- tampering is caught ----------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_changing_any_one_byte_is_caught(tmp_path: Path, written_log: tuple[bytes, tuple], position: int,
                                         byte: int) -> None:
    data, head = written_log
    position %= len(data)
    if data[position] == byte:
        byte ^= 0x01
    mutated = data[:position] + bytes([byte]) + data[position + 1:]
    assert _caught(_verify_bytes(tmp_path, mutated), head), (position, data[position:position + 1], bytes([byte]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["drop", "duplicate", "swap", "renumber"]), index=st.integers(min_value=0),
       other=st.integers(min_value=1, max_value=50))
def test_dropping_duplicating_swapping_or_renumbering_lines_is_caught(
        tmp_path: Path, written_log: tuple[bytes, tuple], kind: str, index: int, other: int) -> None:
    data, head = written_log
    lines = data.splitlines(keepends=True)
    index %= len(lines)
    if kind == "drop":
        del lines[index]
    elif kind == "duplicate":
        lines.insert(index, lines[index])
    elif kind == "swap":
        j = (index + other) % len(lines)
        if j == index:
            j = (index + 1) % len(lines)
        lines[index], lines[j] = lines[j], lines[index]
    else:  # drop a record and renumber every later seq, so seq continuity holds again
        del lines[index]
        for n in range(index, len(lines)):
            record = orjson.loads(lines[n])
            old = f'{{"seq":{record["seq"]},'.encode()
            lines[n] = lines[n].replace(old, f'{{"seq":{record["seq"] - 1},'.encode(), 1)
    report = _verify_bytes(tmp_path, b"".join(lines))
    assert _caught(report, head), (kind, index)


def test_the_first_bad_record_is_named_by_seq_byte_offset_and_rule(tmp_path: Path,
                                                                   written_log: tuple[bytes, tuple]) -> None:
    data, _ = written_log
    lines = data.splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if b'"event":"cost.added"' in line and b'"chain"' not in line)
    lines[n] = lines[n].replace(b'"session_cost_micros":', b'"session_cost_micros":-', 1)
    report = _verify_bytes(tmp_path, b"".join(lines))
    assert report.status == "bad" and report.exit_code == 1
    assert report.problem.seq == n + 1 and report.problem.offset == sum(map(len, lines[:n]))
    assert report.problem.field == "session_cost_micros" and ">= 0" in report.problem.rule
    # A value changed within its domain is caught by the chain, at the seal of its batch.
    lines = data.splitlines(keepends=True)
    lines[n] = lines[n].replace(b'"micros":', b'"micros":1', 1)
    report = _verify_bytes(tmp_path, b"".join(lines))
    assert report.problem.field == "chain" and report.problem.seq > n + 1 > 0
    assert f"seq {report.problem.seq}" in report.problem.rule or f"..{report.problem.seq}" in report.problem.rule


def test_a_rebuilt_chain_passes_without_a_key_and_fails_against_the_signatures(
        make_store: Callable[..., SessionStore], log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(chain.KEY_ENV, KEY)
    store = make_store(event_log=log_path, segment_bytes=4096)
    _workload(store, rounds=30)
    # The segment rotates after the batch that fills it, so how the batches fell decides whether the active
    # file still holds a cost: add costs until it does (a few at most: a fresh segment holds only its snapshot).
    for _ in range(20):
        if b'"event":"cost.added"' in log_path.read_bytes():
            break
        store.add_session_cost("s0", 1)
    store.close()
    key = KEY.encode()
    report = verify(log_path, key)
    assert report.status == "verified" and report.signatures_checked >= 2, report.problem
    records = read_log(log_path)
    assert records[-1]["event"] == "log.signed" and report.signed_through_seq == records[-1]["head_seq"]
    assert verify(log_path, b"another key").problem.field == "signature"
    # Someone who can write the file but lacks the key edits a cost and rebuilds every seal after it.
    data = log_path.read_bytes()
    lines = data.splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if b'"event":"cost.added"' in line)
    lines[n] = lines[n].replace(b'"session_cost_micros":', b'"session_cost_micros":1', 1)
    log_path.write_bytes(_rechain(b"".join(lines)))
    assert verify(log_path).status == "verified"  # unkeyed: a rebuilt chain is consistent (documented)
    report = verify(log_path, key)
    assert report.status == "bad" and report.problem.field in ("head", "chain_head", "signature")


def _rechain(data: bytes) -> bytes:
    """An attacker's tool: recompute every seal from the genesis (and every chain_head and signed head)."""
    out = bytearray()
    head = None
    batch = bytearray()
    for line in data.splitlines(keepends=True):
        sealed = chain.unseal(line)
        content = sealed[0] if sealed else line
        record = orjson.loads(content)
        if head is None:
            head = bytes.fromhex(record.get("genesis") or record["chain_head"])
        for name in ("chain_head", "head"):
            if name in record:
                content = content.replace(record[name].encode(), head.hex().encode())
        batch += content
        if sealed:
            head = chain.seal(batch, head)
            out += batch
            batch = bytearray()
    return bytes(out + batch)


# -- replay and restart refuse what they cannot trust -----------------------------------------------------------

def _hand_edit(log: Path, edit: Callable[[list[dict]], None]) -> None:
    records = read_log(log)
    edit(records)
    log.write_bytes(b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in records))


def _costs(make_store: Callable[..., SessionStore], log: Path) -> None:
    store = make_store(event_log=log)
    for i in range(5):
        store.set_session(f"s{i}", "m")
        store.add_session_cost(f"s{i}", 1_000)
        store.touch_session(f"s{i}")
    store.close()


def test_replay_refuses_a_negative_session_cost_naming_its_seq(make_store: Callable[..., SessionStore],
                                                                log_path: Path) -> None:
    _costs(make_store, log_path)
    seq = {}

    def negative(records: list[dict]) -> None:
        record = next(r for r in records if r["event"] == "cost.added" and r["session_id"] == "s2")
        record["session_cost_micros"] = -5000
        seq["bad"] = record["seq"]

    _hand_edit(log_path, negative)
    with pytest.raises(LogCorrupt, match=rf"seq {seq['bad']}: field session_cost_micros must be an integer >= 0"):
        replay(log_path)
    with pytest.raises(LogCorrupt, match=rf"seq {seq['bad']}:"):
        make_store(event_log=log_path)  # restart refuses it too, and leaves the file as it is
    result = CliRunner().invoke(app, ["replay", str(log_path)])
    assert result.exit_code == 2 and f"seq {seq['bad']}" in result.output


def test_replay_refuses_an_unknown_event_name_mid_file(make_store: Callable[..., SessionStore],
                                                       log_path: Path) -> None:
    _costs(make_store, log_path)

    def renamed(records: list[dict]) -> None:
        records[4]["event"] = "session.renamed"

    _hand_edit(log_path, renamed)
    with pytest.raises(LogCorrupt, match=r"seq 5: event 'session.renamed' is not a record name"):
        replay(log_path)
    report = verify(log_path)
    assert report.problem.seq == 5 and report.problem.field == "event"


@pytest.mark.parametrize(("event", "field", "value"), [
    ("session.touched", "request_count", -1), ("session.touched", "last_used_at", "soon"),
    ("hash.recorded", "strikes", -2), ("session.created", "tier", "HUGE"), ("cost.added", "micros", -1)])
def test_replay_checks_the_value_domains_of_every_record_shape(make_store: Callable[..., SessionStore],
                                                               log_path: Path, event: str, field: str,
                                                               value: object) -> None:
    store = make_store(event_log=log_path, audit_chain="off")  # the fast path's six-key records
    store.set_session("a", "m", "SIMPLE")
    store.touch_session("a")
    store.record_request_hash("a", "h")
    store.add_session_cost("a", 5)
    store.close()

    def edit(records: list[dict]) -> None:
        next(r for r in records if r["event"] == event)[field] = value

    _hand_edit(log_path, edit)
    with pytest.raises(LogCorrupt, match=rf"field {field} must be"):
        replay(log_path)


# -- restarts continue the chain ------------------------------------------------------------------------------

def test_a_torn_last_batch_is_truncated_and_the_chain_continues(make_store: Callable[..., SessionStore],
                                                                log_path: Path) -> None:
    store = make_store(event_log=log_path)
    store.tell_many([SetSession(f"s{i}", "m") for i in range(30)])
    store.get_stats()
    store.close()
    data = log_path.read_bytes()
    lines = data.splitlines(keepends=True)
    # A crash mid-write: the batch's last (sealing) line is cut, and with it the half before.
    cut = len(data) - len(lines[-1]) - len(lines[-2]) // 2
    log_path.write_bytes(data[:cut])
    report = verify(log_path)
    assert report.status == "verified" and report.torn_tail_bytes > 0 and report.unsealed_tail_records > 0
    with _Heads() as exported:
        store = make_store(event_log=log_path)  # restart: cut the torn line, seal the unsealed with the next batch
        store.set_session("after", "m")
        store.close()
    head = exported.heads[-1]
    report = verify(log_path)
    assert report.status == "verified" and not report.unsealed_tail_records and not report.torn_tail_bytes
    assert (report.head_seq, report.head) == head


def _child(log: Path, seed: int, ready_fd: int) -> None:
    code = 0
    try:
        from engine import Config

        rng = random.Random(seed)
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=log, fsync="never", segment_bytes=8192))
        os.write(ready_fd, b"r")
        while True:
            sid = f"k{rng.randrange(8)}"
            store.tell_many([SetSession(sid, "m"), Cost(sid, rng.randint(1, 99)), Touch(sid)])
            store.record_request_hash(sid, "h")
    except BaseException:
        code = 1
    finally:
        os._exit(code)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_logs_left_by_kill_9_and_torn_tails_verify_clean_after_each_restart(tmp_path: Path) -> None:
    log = tmp_path / "killed.jsonl"
    rng = random.Random(15)
    for kill in range(6):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(log, kill, write_fd)
        os.close(write_fd)
        try:
            assert os.read(read_fd, 1) == b"r"
            threading.Event().wait(rng.random() * 0.05)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
        if kill % 2:  # and a power cut on top: a random number of the newest bytes never reached the disk
            # (after the segment's first line: a segment whose opening snapshot is torn recovers as an
            # empty log, a limit of recovery that this test does not cover)
            size, first = log.stat().st_size, len(log.read_bytes().split(b"\n", 1)[0]) + 1
            if size - first > 1:
                os.truncate(log, size - rng.randint(1, min(size - first - 1, 400)))
        report = verify(log)
        assert report.status == "verified", (kill, report.problem)
    from engine import Config

    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log)) as store:
        store.set_session("final", "m")
    report = verify(log)
    assert report.status == "verified" and report.unsealed_tail_records == 0, report.problem


# -- the command ---------------------------------------------------------------------------------------------------

def test_audit_verify_command_reports_text_and_json_with_exit_status(tmp_path: Path,
                                                                     written_log: tuple[bytes, tuple]) -> None:
    data, head = written_log
    log = tmp_path / "a.jsonl"
    log.write_bytes(data)
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "--verify", str(log)])
    assert result.exit_code == 0 and "VERIFIED" in result.output and head[1] in result.output
    result = runner.invoke(app, ["audit", "--verify", str(log), "--json"])
    report = orjson.loads(result.output)
    assert result.exit_code == 0 and report["ok"] and report["head"] == head[1] and report["problem"] is None
    log.write_bytes(data.replace(b'"strikes":1', b'"strikes":-1', 1))
    result = runner.invoke(app, ["audit", "--verify", str(log), "--json"])
    report = orjson.loads(result.output)
    assert result.exit_code == 1 and not report["ok"] and report["problem"]["field"] == "strikes"
    assert report["problem"]["seq"] >= 1 and report["problem"]["offset"] >= 0
    result = runner.invoke(app, ["audit", "--verify", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2


def test_a_key_without_signatures_in_the_log_is_unsigned_and_a_filelog_exports_its_head(log_path: Path) -> None:
    from engine.log.writer import FileLog

    log = FileLog(log_path, fsync="never", signing_key=None)
    assert log.head() is None  # nothing chained yet: the genesis is written with the first record
    log.append([{"seq": 0, "ts": 1, "event": "session.touched", "session_id": "a", "last_used_at": 1,
                 "request_count": 1}])
    head = log.head()
    log.close()
    report = verify(log_path)
    assert report.status == "verified" and head == (report.head_seq, report.head) == (1, report.head)
    report = verify(log_path, KEY.encode())
    assert report.status == "unsigned" and report.exit_code == 3
