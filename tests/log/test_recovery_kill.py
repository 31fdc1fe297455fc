"""Kill -9: with fsync="always", every operation a store acknowledged survives a SIGKILL at any moment.

A forked child opens a store on the log (recovering what the previous
child left), performs operations and reports each one after the store
method returned. The parent kills it with SIGKILL after a random number of
acknowledgements, many times, then checks the log: every acknowledged
operation is there (at most the one in flight is there too), and the next
child appends to the same log.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path

import pytest

from engine import Config, SessionStore, replay
from tests.conftest import read_log

SIDS = [f"k{i}" for i in range(6)]
KILLS = 24


def _child(log: Path, seed: int, ack_fd: int) -> None:
    """Runs in the forked process: operate until killed, acknowledging each returned call."""
    code = 0
    try:
        rng = random.Random(seed)
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=log, fsync="always"))
        os.write(ack_fd, b"ready\n")
        while True:
            sid = rng.choice(SIDS)
            if rng.random() < 0.5:
                micros = rng.randint(1, 1_000)
                store.add_session_cost(sid, micros)
                os.write(ack_fd, f"cost {sid} {micros}\n".encode())
            else:
                store.set_session(sid, "openai/gpt-4o")
                os.write(ack_fd, f"set {sid}\n".encode())
    except BaseException as exc:  # reported to the parent, which fails the test
        os.write(ack_fd, f"error {type(exc).__name__}: {exc}\n".encode())
        code = 1
    finally:
        os._exit(code)


def _read_acks(fd: int, want: int, lines: list[str], buffer: bytearray) -> bool:
    """Read acknowledgements until ``want`` operations were acked (False at end of stream)."""
    while sum(1 for line in lines if line.startswith(("cost", "set"))) < want:
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        buffer.extend(chunk)
        *complete, rest = buffer.split(b"\n")
        lines.extend(line.decode() for line in complete)
        buffer[:] = rest
    return True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_every_acknowledged_operation_survives_sigkill(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    rng = random.Random(2024)
    cost: Counter[str] = Counter()
    sets: Counter[str] = Counter()
    for kill in range(KILLS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _child(log, seed=kill, ack_fd=write_fd)
        os.close(write_fd)
        lines: list[str] = []
        buffer = bytearray()
        try:
            # Kill at a random moment: sometimes before the store finished recovering.
            if rng.random() < 0.15:
                threading.Event().wait(rng.random() * 0.02)
            else:
                _read_acks(read_fd, rng.randint(0, 40), lines, buffer)
                if rng.random() < 0.5:
                    threading.Event().wait(rng.random() * 0.003)
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        # Acks already in the pipe were sent after the call returned: they count as acknowledged.
        _read_acks(read_fd, 10**9, lines, buffer)
        os.close(read_fd)
        errors = [line for line in lines if line.startswith("error")]
        assert not errors, errors

        for line in lines:
            kind, *rest = line.split()
            if kind == "cost":
                cost[rest[0]] += int(rest[1])
            elif kind == "set":
                sets[rest[0]] += 1
        state = replay(log)
        in_flight = 0
        for sid in SIDS:
            entry = state.get(sid)
            got_cost = entry.session_cost_micros if entry else 0
            got_sets = entry.request_count if entry else 0
            assert got_cost >= cost[sid], f"kill {kill}: acknowledged cost of {sid} lost"
            assert got_sets >= sets[sid], f"kill {kill}: acknowledged set_session of {sid} lost"
            in_flight += (got_cost > cost[sid]) + (got_sets - sets[sid])
            # The log is the truth from here on (an unacknowledged op may have reached it).
            cost[sid], sets[sid] = got_cost, got_sets
        assert in_flight <= 1, f"kill {kill}: more than the one operation in flight appeared"

    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log, fsync="always")) as store:
        for sid in SIDS:
            entry = store.get_session(sid)
            assert (entry.session_cost_micros if entry else 0) == cost[sid]
            assert (entry.request_count if entry else 0) == sets[sid]
        store.set_session("final", "m")
    records = read_log(log)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["session_id"] == "final"
