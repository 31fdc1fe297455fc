"""Tenant scoping and the per-tenant limits on the Redis backend, against real redis-server processes.

The limits are enforced inside the commit script, per (tenant, bucket): each bucket allows its share
``ceil(limit / redis_buckets)`` (docs/distributed.md, "Per-tenant limits"). Two stores on one Redis are
two replicas: neither holds the truth, the script does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from freezegun import freeze_time

from engine import SessionStore
from engine.core.scope import SECRET_ENV, Scope, scoped, tenant_of
from engine.distributed.redis_host import Keys, bucket_of, bucket_share, sessions_in_redis
from engine.shell.capacity import SessionRefused
from events import SetSession
from tests.distributed.test_redis_backend import ROOT, check_agreement, records_of, redis_config
from tests.support.redis_servers import RedisServer

SECRET = "redis-tenancy-secret-4f2a9c81"


def _live(client: Any, keys: Keys, tenant: str) -> list[str]:
    return [sid for sid in sessions_in_redis(client, keys) if tenant_of(sid) == tenant]


def test_a_flooding_caller_evicts_only_its_own_sessions_across_replicas(redis_server: RedisServer) -> None:
    scope = Scope(SECRET)
    a, b = scope.tenant("key:a"), scope.tenant("key:b")
    config = redis_config(redis_server.url, redis_buckets=4, max_sessions_per_tenant=16,
                          max_creations_per_tenant_per_minute=None)
    keys = Keys("se", 4)
    flood = [scoped(b, f"flood-{i}") for i in range(200)]
    with freeze_time("2026-03-01 12:00:00") as clock, SessionStore(config) as one, SessionStore(config) as two, \
            redis_server.client() as client:
        mine = [scoped(a, f"a-{i}") for i in range(6)]
        for sid in mine:
            one.set_session(sid, "strong", "COMPLEX")
        for i, sid in enumerate(flood):  # B floods new ids through both replicas, one ms apart
            clock.tick(timedelta(milliseconds=1))
            (one, two)[i % 2].set_session(sid, "mid", "MEDIUM")
        for _ in range(1_000):  # evictions are told to their shards: wait for them, bounded (the clock is frozen)
            if len(_live(client, keys, b)) <= 16:
                break
            threading.Event().wait(0.01)
        live_b = _live(client, keys, b)
        # Every bucket holds B's share (4) of its 16, B's newest in each bucket.
        assert Counter(bucket_of(sid, 4) for sid in live_b) == {0: 4, 1: 4, 2: 4, 3: 4}
        for bucket in range(4):
            newest = [sid for sid in flood if bucket_of(sid, 4) == bucket][-4:]
            assert sorted(sid for sid in live_b if bucket_of(sid, 4) == bucket) == sorted(newest)
        assert all(one.get_session(sid) is not None and two.get_session(sid) is not None for sid in mine)
        assert client.zcard(keys.tenant_keys(bucket_of(flood[0], 4), b)[0]) == 4  # the script's own count too
        check_agreement(client, keys, one, two)
        records = records_of(client, keys)
    evicted = [r for r in records if r["event"] == "session.evicted"]
    assert len(evicted) == 200 - 16
    assert {(tenant_of(r["session_id"]), r["reason"]) for r in evicted} == {(b, "tenant_limit")}


def test_a_caller_past_its_creation_rate_is_refused_across_replicas(redis_server: RedisServer) -> None:
    scope = Scope(SECRET)
    a, b = scope.tenant("key:a"), scope.tenant("key:b")
    config = redis_config(redis_server.url, redis_buckets=1, max_creations_per_tenant_per_minute=5)
    keys = Keys("se", 1)
    with freeze_time("2026-03-01 12:00:00") as clock, SessionStore(config) as one, SessionStore(config) as two, \
            redis_server.client() as client:
        for i in range(5):  # five creations in all, through either replica
            (one, two)[i % 2].set_session(scoped(a, f"s{i}"), "m")
        with pytest.raises(SessionRefused, match="max_creations_per_tenant_per_minute"):
            two.set_session(scoped(a, "s5"), "m")
        with pytest.raises(SessionRefused):
            one.set_session(scoped(a, "s5"), "m")
        one.tell(SetSession(scoped(a, "s6"), "m"))  # told: refused all the same, and logged
        one.set_session(scoped(a, "s0"), "m2")  # an existing session is not a creation
        two.set_session(scoped(b, "s0"), "m")  # another caller is not limited by A
        two.set_session("unscoped", "m")  # nor is the "" tenant
        assert one.get_session(scoped(a, "s6")) is None and two.get_session(scoped(a, "s5")) is None
        clock.tick(timedelta(seconds=12))  # one minute / 5: one more creation
        two.set_session(scoped(a, "s7"), "m")
        with pytest.raises(SessionRefused):
            one.set_session(scoped(a, "s8"), "m")
        assert set(sessions_in_redis(client, keys)) == {scoped(a, f"s{i}") for i in (0, 1, 2, 3, 4, 7)} | {
            scoped(b, "s0"), "unscoped"}
        check_agreement(client, keys, one, two)
        records = records_of(client, keys)
    refused = [r for r in records if r["event"] == "session.refused"]
    assert [(r["session_id"], r["reason"], r["limit"]) for r in refused] == [
        (scoped(a, s), "tenant_rate", 5) for s in ("s5", "s5", "s6", "s8")]


def test_each_bucket_allows_its_share_of_the_creation_rate(redis_server: RedisServer) -> None:
    """8 a minute over 4 buckets: 2 a minute in each bucket (the documented guarantee)."""
    tenant = Scope(SECRET).tenant("key:a")
    config = redis_config(redis_server.url, redis_buckets=4, max_creations_per_tenant_per_minute=8)
    assert bucket_share(8, 4) == 2 and bucket_share(10_000, 64) == 157 and bucket_share(3, 64) == 1
    ids = [scoped(tenant, f"s{i}") for i in range(200)]
    same_bucket = [sid for sid in ids if bucket_of(sid, 4) == 0][:3]
    other = next(sid for sid in ids if bucket_of(sid, 4) == 1)
    with freeze_time("2026-03-01 12:00:00"), SessionStore(config) as store:
        store.set_session(same_bucket[0], "m")
        store.set_session(same_bucket[1], "m")
        with pytest.raises(SessionRefused):
            store.set_session(same_bucket[2], "m")
        store.set_session(other, "m")  # another bucket has its own share


_REPLICA = """
import sys
from engine import Config, SessionStore
from engine.core.scope import Scope, scoped
url, op = sys.argv[1], sys.argv[2]
sid = scoped(Scope.from_env().tenant("key:a"), "conversation-0001")
with SessionStore(Config(enabled=True, tick_ms=0, backend=url, ask_timeout_s=5.0)) as store:
    if op == "pin":
        store.set_session(sid, "strong", "COMPLEX")
    entry = store.get_session(sid)
    print(sid, entry.model if entry else None)
"""


def _replica(url: str, op: str, secret: str) -> list[str]:
    env = {**os.environ, SECRET_ENV: secret}
    done = subprocess.run([sys.executable, "-c", _REPLICA, url, op], cwd=ROOT, env=env, capture_output=True,
                          timeout=60, check=True)
    return done.stdout.decode().split()


def test_scoped_ids_are_the_same_in_every_replica_process(redis_server: RedisServer) -> None:
    """The tenant scoping is stable across replicas. Two processes with the same secret reach the same
    session (same scoped id, same bucket); a process with another secret reaches none of it."""
    pinned = _replica(redis_server.url, "pin", SECRET)
    assert pinned[1] == "strong"
    assert _replica(redis_server.url, "read", SECRET) == pinned
    other = _replica(redis_server.url, "read", SECRET + "-other")
    assert other[0] != pinned[0] and other[1] == "None"
    assert pinned[0] == scoped(Scope(SECRET).tenant("key:a"), "conversation-0001")
