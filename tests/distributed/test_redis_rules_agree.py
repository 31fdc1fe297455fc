"""Rules the memory shard and the Redis host both run, held equal: the same random inputs through the Python
rule (engine.shell.capacity.Capacity) and through the commit script (engine/distributed/redis_commit.lua, by
EVALSHA on the keys the Redis backend uses, against a real redis-server) must give the same answers and the same state.

- the per-tenant creation token bucket: ``Capacity.admit`` and the script's ``{2}`` refusal;
- the per-tenant limit's eviction choice: ``Capacity.note``'s victims and the script's victims.

One bucket (``redis_buckets=1``), so a bucket's share of a limit is the limit itself.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.scope import scoped
from engine.distributed.redis_host import COMMIT_LUA, Keys, commit_command
from engine.shell.capacity import TENANT_LIMIT, Capacity
from events import SetSession
from tests.support.redis_servers import RedisServer

T0 = 1_700_000_000_000
TENANTS = ["a" * 24, "b" * 24, "c" * 24]
#: Each example's keys get a namespace of their own, so examples share one server.
_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    server = RedisServer(tmp_path_factory.mktemp("rules") / "redis").start()
    try:
        with server.client() as client:
            yield client, client.script_load(COMMIT_LUA)
    finally:
        server.stop()


def _commit(client: Any, sha: str, keys: Keys, sid: str, tenant: str, *, expected: str = "0",
            state: bytes | str = b"{}", cap: str = "", rate: str = "", now: int = 0) -> list[Any]:
    return client.execute_command(*commit_command(
        keys, sha, 0, sid, expected, state, now + 1_000, 60_000, "", uuid.uuid4().hex, tenant, cap, rate, now, now,
        []))


def _version(client: Any, keys: Keys, sid: str) -> str:
    raw = client.hget(keys.session(0, sid), "v")
    return raw.decode() if raw is not None else "0"


def _bucket_in_redis(client: Any, keys: Keys, tenant: str) -> tuple[float, int] | None:
    raw = client.hget(keys.tenant_keys(0, tenant)[1], tenant)
    if raw is None:
        return None
    tokens, at = raw.decode().split(" ")
    return float(tokens), int(at)


# Mostly steps shorter than a token's refill (so refusals happen), some clock steps back, some long gaps.
gaps = st.one_of(st.integers(0, 3_000), st.integers(0, 3_000), st.integers(-5_000, 0), st.integers(0, 200_000))


@_SETTINGS
@given(rate=st.integers(1, 12), steps=st.lists(st.tuples(st.sampled_from(TENANTS), gaps), max_size=40))
def test_the_creation_token_bucket_admits_and_counts_alike(script, rate, steps) -> None:
    client, sha = script
    keys = Keys(f"rate{uuid.uuid4().hex[:10]}", 1)
    capacity = Capacity(None, None, rate)
    now = T0
    for i, (tenant, gap) in enumerate(steps):
        now += gap
        sid = scoped(tenant, f"s{i}")
        admitted = capacity.admit(SetSession(sid, "m"), now)
        reply = _commit(client, sha, keys, sid, tenant, rate=str(rate), now=now)
        assert (int(reply[0]) == 1) == admitted, (i, tenant, now)
        assert int(reply[0]) in (1, 2)
        assert _bucket_in_redis(client, keys, tenant) == capacity._buckets.get(tenant), (i, tenant, now)


# (tenant, session, ends it instead of using it, ms since the previous step: time moves forward)
uses = st.tuples(st.sampled_from(TENANTS[:2]), st.integers(0, 5), st.sampled_from([False, False, True]),
                 st.integers(1, 5_000))


@_SETTINGS
@given(limit=st.integers(1, 3), steps=st.lists(uses, max_size=50))
def test_the_per_tenant_limit_evicts_the_same_sessions(script, limit, steps) -> None:
    client, sha = script
    keys = Keys(f"lru{uuid.uuid4().hex[:10]}", 1)
    capacity = Capacity(None, limit)
    live: set[str] = set()
    now = T0
    for tenant, index, ends, gap in steps:
        now += gap
        sid = scoped(tenant, f"s{index}")
        if ends:
            if sid not in live:
                continue
            live.discard(sid)
            assert capacity.note((), [sid]) == []
            reply = _commit(client, sha, keys, sid, tenant, expected=_version(client, keys, sid), state="-",
                            cap=str(limit), now=now)
            assert int(reply[0]) == 1 and len(reply) == 3
        else:
            live.add(sid)
            victims = capacity.note([(sid, now)], ())
            reply = _commit(client, sha, keys, sid, tenant, expected=_version(client, keys, sid), cap=str(limit),
                            now=now)
            assert int(reply[0]) == 1
            chosen = [(reply[i].decode(), int(float(reply[i + 1])), TENANT_LIMIT) for i in range(3, len(reply), 2)]
            assert chosen == victims, (tenant, sid, now)
            for victim, _, _ in chosen:  # each victim's Evict, as its shard commits it
                live.discard(victim)
                capacity.note((), [victim])
                assert int(_commit(client, sha, keys, victim, tenant, expected=_version(client, keys, victim),
                                   state="-", cap=str(limit), now=now)[0]) == 1
        for t in TENANTS[:2]:
            in_redis = [(m.decode(), int(s)) for m, s in client.zrange(keys.tenant_keys(0, t)[0], 0, -1,
                                                                       withscores=True)]
            assert in_redis == list(capacity._tenants.get(t, {}).items())
