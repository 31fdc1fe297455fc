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
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        cost: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        start.wait()
        for n in range(OPS_PER_THREAD):
            sid = f"s{rng.randrange(SESSIONS)}"
            op = rng.random()
            if op < 0.35:
                micros = rng.randrange(1, 5000)
                store.tell(Cost(sid, micros))
                cost[sid] += micros
            elif op < 0.7:
                store.tell(Touch(sid))
                requests[sid] += 1
            elif op < 0.8:
                store.touch_session(sid)
                requests[sid] += 1
            elif op < 0.9:
                store.add_session_cost(sid, 3)
                cost[sid] += 3
            else:
                store.record_request_hash(sid, f"h{n % 3}")
        with lock:
            expected_cost.update(cost)
            expected_requests.update(requests)

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
    assert kinds["cost.added"] == sum(1 for r in records if r["event"] == "cost.added")
    assert kinds["session.touched"] == sum(expected_requests.values()) - SESSIONS
    assert kinds["hash.recorded"] == THREADS * OPS_PER_THREAD - kinds["session.touched"] - kinds["cost.added"]
    assert kinds["session.created"] == SESSIONS
