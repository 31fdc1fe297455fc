"""Replay and restart rebuild exactly what the live store serves, after thousands of random operations.

A seeded random driver (several seeds) runs every store operation under a
moving frozen clock: sessions are created, updated, hashed into strikes,
escalated, charged, cache-pinned, left idle until pins lapse and sessions
expire, cleared and evicted. Then ``replay(log)`` must equal the state read
through ``get_session``, and a store restarted on the log must serve the
same state and continue ``seq`` with no gap.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from freezegun import freeze_time

from engine import Entry, SessionStore, replay
from events import Decision, SetDeployment

SIDS = [f"s{i:02d}" for i in range(14)] + ["a-long-session-id-" + "x" * 40]
MODELS = ["openai/gpt-4o-mini", "anthropic/claude-3-5-sonnet", "vllm/llama-3-70b", ""]
TIERS = [None, "SIMPLE", "MEDIUM", "COMPLEX", "REASONING", ""]
PROVIDERS = ["openai", "anthropic", "vllm", "dosrouter", "groq", "other"]
#: Idle gaps (ms) the clock moves by: most small, some past a pin's TTL, a few past the timeout.
GAPS = [0, 0, 5, 50, 1_000, 20_000, 90_000, 320_000, 650_000]
TIMEOUT_MS = 600_000


def drive(store: SessionStore, rng: random.Random, frozen: Any, ops: int) -> None:
    """Run ``ops`` random store operations, moving the frozen clock between them."""
    for _ in range(ops):
        if rng.random() < 0.2:
            frozen.tick(timedelta(milliseconds=rng.choice(GAPS)))
        sid = rng.choice(SIDS)
        roll = rng.random()
        if roll < 0.2:
            store.set_session(sid, rng.choice(MODELS), rng.choice(TIERS), user_explicit=rng.random() < 0.1)
        elif roll < 0.3:
            store.touch_session(sid)
        elif roll < 0.45:
            store.record_request_hash(sid, rng.choice(["h1", "h1", "h2", "h3"]))
        elif roll < 0.5:
            store.escalate_session(sid)
        elif roll < 0.6:
            store.add_session_cost(sid, rng.choice([0, 1, 250, 10_000, 3_000_000]))
        elif roll < 0.68:
            store.set_cache_sticky(sid, rng.choice(PROVIDERS))
        elif roll < 0.74:
            store.is_cache_sticky(sid)
        elif roll < 0.8:
            store.get_session(sid)
        elif roll < 0.84:
            store.ask(SetDeployment(sid, rng.choice(["eu-1", "us-2", "key-3"])))
        elif roll < 0.88:
            store.ask(Decision(sid, "route", model=rng.choice(MODELS), tier=rng.choice(TIERS),
                               reason="test", strategy="tier", source="driver"))
        elif roll < 0.92:
            store.clear_session(sid)
        elif roll < 0.96:
            store.tick()
        elif roll < 0.965:
            store.clear_all()
        else:
            store.get_session_cost_usd(sid)


def live_state(store: SessionStore, sids: list[str] = SIDS) -> dict[str, Entry]:
    """What the store serves now, read through get_session for every id the driver uses."""
    return {sid: entry for sid in sids if (entry := store.get_session(sid)) is not None}


def last_seq(log: Path) -> int:
    """The seq of the last record of a log file (or of the newest segment of a directory)."""
    path = sorted(log.glob("*.jsonl"))[-1] if log.is_dir() else log
    return orjson.loads(path.read_bytes().splitlines()[-1])["seq"]


def run_workload(make_store: Callable[..., SessionStore], log: Path, seed: int, ops: int,
                 **config: Any) -> tuple[dict[str, Entry], datetime]:
    """Drive a store on ``log`` under a frozen clock; returns the live state it ends with, and when."""
    with freeze_time("2025-03-01 09:00:00") as frozen:
        store = make_store(event_log=log, timeout_ms=TIMEOUT_MS, **config)
        drive(store, random.Random(seed), frozen, ops)
        state = live_state(store)
        store.close()
        return state, datetime.now()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_replay_and_restart_match_the_live_store_after_random_operations(
        make_store: Callable[..., SessionStore], tmp_path: Path, seed: int) -> None:
    log = tmp_path / "audit.jsonl"
    with freeze_time("2025-03-01 09:00:00") as frozen:
        store = make_store(event_log=log, timeout_ms=TIMEOUT_MS, auto_escalate=seed % 2 == 1,
                           max_sessions=10 if seed == 3 else None)
        rng = random.Random(seed)
        for _round in range(3):
            drive(store, rng, frozen, 1_000)
            live = live_state(store)
            assert replay(log) == live
        store.close()
        seq = last_seq(log)

        restarted = make_store(event_log=log, timeout_ms=TIMEOUT_MS)
        assert live_state(restarted) == live
        assert last_seq(log) == seq  # reading changed nothing
        restarted.set_session("after-restart", "m")
        assert last_seq(log) == seq + 1
        records = [orjson.loads(line) for line in log.read_bytes().splitlines()]
        assert [r["seq"] for r in records] == list(range(1, seq + 2))


def test_restarted_store_keeps_serving_the_workload_like_one_that_never_stopped(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    """Stopping and restarting between batches of operations changes nothing a caller sees."""
    straight, stopped = tmp_path / "straight.jsonl", tmp_path / "stopped.jsonl"
    results = []
    for log, restarts in ((straight, False), (stopped, True)):
        with freeze_time("2025-03-01 09:00:00") as frozen:
            rng = random.Random(11)
            store = make_store(event_log=log, timeout_ms=TIMEOUT_MS)
            for _ in range(4):
                drive(store, rng, frozen, 500)
                if restarts:
                    store.close()
                    store = make_store(event_log=log, timeout_ms=TIMEOUT_MS)
            results.append(live_state(store))
    assert results[0] == results[1]
    assert replay(straight) == replay(stopped) == results[0]


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_rotated_log_recovers_the_same_state_as_an_unrotated_one(
        make_store: Callable[..., SessionStore], tmp_path: Path, layout: str) -> None:
    plain = tmp_path / "plain.jsonl"
    rotated = tmp_path / "rotated.jsonl" if layout == "file" else tmp_path / "segments"
    if layout == "directory":
        rotated.mkdir()
    expected, _ = run_workload(make_store, plain, seed=5, ops=2_500)
    got, end = run_workload(make_store, rotated, seed=5, ops=2_500, segment_bytes=4096)

    segments = sorted(tmp_path.glob("rotated.jsonl.*")) if layout == "file" else sorted(rotated.glob("*.jsonl"))
    assert len(segments) >= 5, "the small segment size must have rotated the log several times"
    assert got == expected
    assert replay(rotated) == replay(plain) == expected
    restarted = make_store(event_log=rotated, timeout_ms=TIMEOUT_MS)
    with freeze_time(end):
        assert live_state(restarted) == expected
    # Every new segment opens with a snapshot of the live sessions.
    newest = rotated if layout == "file" else segments[-1]
    head = orjson.loads(newest.read_bytes().split(b"\n", 1)[0])
    assert head["event"] == "log.snapshot" and head["part"] == 1


def test_deleting_segments_before_the_newest_snapshot_changes_nothing(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "segments"
    log.mkdir()
    expected, end = run_workload(make_store, log, seed=8, ops=2_500, segment_bytes=4096)
    segments = sorted(log.glob("*.jsonl"))
    assert len(segments) >= 3
    before = replay(log)
    seq = last_seq(log)
    for old in segments[:-1]:
        old.unlink()

    assert replay(log) == before == expected
    restarted = make_store(event_log=log, timeout_ms=TIMEOUT_MS)
    with freeze_time(end):
        assert live_state(restarted) == expected
        restarted.set_session("after-delete", "m")
    assert last_seq(log) == seq + 1


def test_deleting_archived_segments_of_a_file_log_changes_nothing(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    expected, end = run_workload(make_store, log, seed=9, ops=2_000, segment_bytes=4096)
    archives = sorted(tmp_path.glob("audit.jsonl.*"))
    assert archives
    for old in archives:
        old.unlink()
    assert replay(log) == expected
    restarted = make_store(event_log=log, timeout_ms=TIMEOUT_MS)
    with freeze_time(end):
        assert live_state(restarted) == expected


def test_snapshots_taken_while_many_callers_write_recover_the_live_state(
        make_store: Callable[..., SessionStore], tmp_path: Path) -> None:
    """Rotation reads the shard tables while other shards are mid-batch; recovery still matches."""
    import threading

    log = tmp_path / "segments"
    log.mkdir()
    with freeze_time("2025-03-01 09:00:00"):
        store = make_store(event_log=log, timeout_ms=TIMEOUT_MS, segment_bytes=4096, shards=4)

        def caller(n: int) -> None:
            rng = random.Random(n)
            for i in range(400):
                sid = f"c{n}-{rng.randrange(12)}"
                if i % 3 == 0:
                    store.set_session(sid, rng.choice(MODELS), rng.choice(TIERS))
                elif i % 3 == 1:
                    store.add_session_cost(sid, rng.randint(1, 500))
                else:
                    store.tell(SetDeployment(sid, f"d{i}"))

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        sids = [f"c{n}-{k}" for n in range(6) for k in range(12)]
        live = live_state(store, sids)
        store.close()
        assert len(list(log.glob("*.jsonl"))) >= 5
        assert replay(log) == live
        restarted = make_store(event_log=log, timeout_ms=TIMEOUT_MS)
        assert live_state(restarted, sids) == live
