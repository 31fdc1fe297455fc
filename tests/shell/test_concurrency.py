"""Many threads, overlapping sessions: exact sums, and one log record per transition."""

from __future__ import annotations

import random
import threading
from collections import Counter

from events import Cost, Touch
from tests.conftest import read_log

THREADS = 8
OPS_PER_THREAD = 20_000
SESSIONS = 64


def test_eight_threads_mixed_operations_sum_exactly(make_store, log_path):
    store = make_store(event_log=str(log_path), fsync="never")
    for i in range(SESSIONS):
        store.set_session(f"s{i}", "m", "MEDIUM")
    expected_cost: Counter[str] = Counter()
    expected_requests: Counter[str] = Counter({f"s{i}": 1 for i in range(SESSIONS)})
    operations: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        cost: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        ops: Counter[str] = Counter()
        start.wait()
        for n in range(OPS_PER_THREAD):
            sid = f"s{rng.randrange(SESSIONS)}"
            op = rng.random()
            if op < 0.35:
                micros = rng.randrange(1, 5000)
                store.tell(Cost(sid, micros))
                cost[sid] += micros
                ops["cost.added"] += 1
            elif op < 0.7:
                store.tell(Touch(sid))
                requests[sid] += 1
                ops["session.touched"] += 1
            elif op < 0.8:
                store.touch_session(sid)
                requests[sid] += 1
                ops["session.touched"] += 1
            elif op < 0.9:
                store.add_session_cost(sid, 3)
                cost[sid] += 3
                ops["cost.added"] += 1
            else:
                store.record_request_hash(sid, f"h{n % 3}")
                ops["hash.recorded"] += 1
        with lock:
            expected_cost.update(cost)
            expected_requests.update(requests)
            operations.update(ops)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(SESSIONS):
        entry = store.get_session(f"s{i}")
        assert entry.session_cost_micros == expected_cost[f"s{i}"]
        assert entry.request_count == expected_requests[f"s{i}"]
    store.close()
    records = read_log(log_path)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    kinds = Counter(r["event"] for r in records)
    # Exactly one record per transition: one per operation sent, plus the creations.
    assert kinds == Counter({**operations, "session.created": SESSIONS})
    assert sum(operations.values()) == THREADS * OPS_PER_THREAD
