"""One router replica PROCESS for the Redis tests: mixed operations on shared sessions.

Run as ``python -m tests.support.redis_replica URL REPLICA OPS SESSIONS [NAMESPACE]``. It prints one JSON line per
acknowledged operation (``{"op", "sid", ...}``) as soon as the store answers, so a test that
kills this process knows exactly what was acknowledged; then ``{"done": true}``.
"""

from __future__ import annotations

import sys
import time

import orjson

from engine import BackendUnavailable, Config, SessionStore


def main() -> None:
    url, replica, ops, sessions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    namespace = sys.argv[5] if len(sys.argv) > 5 else "se"
    out = sys.stdout.buffer
    config = Config(enabled=True, tick_ms=0, backend=url, auto_escalate=True, strike_limit=1, ask_timeout_s=5.0,
                    redis_namespace=namespace)
    with SessionStore(config) as store:
        for i in range(ops):
            sid = f"s{(i * 7 + replica) % sessions}"
            kind = i % 4
            micros = 1 + (i % 97)
            try:
                if kind == 0:
                    store.set_session(sid, "gpt-4o", "MEDIUM")
                    line = {"op": "set", "sid": sid}
                elif kind == 1:
                    # Said before the call: a replica killed mid-call may or may not have had it applied.
                    out.write(orjson.dumps({"op": "begin-cost", "sid": sid, "micros": micros}) + b"\n")
                    out.flush()
                    store.add_session_cost(sid, micros)
                    line = {"op": "cost", "sid": sid, "micros": micros}
                elif kind == 2:
                    strikes = store.record_request_hash(sid, "stalled")
                    line = {"op": "hash", "sid": sid, "strikes": strikes}
                else:
                    entry = store.get_session(sid)
                    line = {"op": "get", "sid": sid, "tier": entry.tier.value if entry and entry.tier else None}
            except BackendUnavailable:
                # Not acknowledged: it may or may not have been applied (a reply lost with the server).
                line = {"op": "unavailable", "sid": sid}
                time.sleep(0.02)  # a router backs off before its next request while its backend is down
            out.write(orjson.dumps(line) + b"\n")
            out.flush()
    out.write(b'{"done":true}\n')
    out.flush()


if __name__ == "__main__":
    main()
