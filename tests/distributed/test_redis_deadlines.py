"""A session key in Redis outlives its next deadline (engine.core.transitions.next_deadline), so Redis frees it only
once the reaper could have settled it, even when no replica runs: a budget ledger kept past its
session's idle expiry lives until its window ends (docs/policy.md), not only ``timeout_ms`` more."""

from __future__ import annotations

from datetime import timedelta

from freezegun import freeze_time

from engine import SessionStore
from engine._time import now_ms
from engine.core.transitions import next_deadline
from engine.distributed.redis_host import EXPIRY_MARGIN_MS, Keys, bucket_of, sessions_in_redis
from tests.distributed.test_redis_backend import redis_config
from tests.support.redis_servers import RedisServer


def test_a_ledger_kept_past_idle_expiry_keeps_its_key_until_its_window_ends(redis_server: RedisServer) -> None:
    config = redis_config(redis_server.url, redis_buckets=1, timeout_ms=1_000, budget_window_ms=3_600_000)
    keys = Keys("se", 1)
    with freeze_time("2026-03-01 12:00:00") as clock, SessionStore(config) as store, \
            redis_server.client() as client:
        store.set_session("s", "gpt-4o")
        store.add_session_cost("s", 500)
        clock.tick(timedelta(seconds=5))
        store.tick()  # the session expires; its ledger stays for the rest of the window
        entry = sessions_in_redis(client, keys)["s"]
        assert not entry.model and entry.session_cost_micros == 500
        left = next_deadline(entry, config) - now_ms()
        assert left > config.timeout_ms + EXPIRY_MARGIN_MS  # the case a fixed timeout-based TTL got wrong
        ttl = client.pttl(keys.session(bucket_of("s", 1), "s"))
        assert left < ttl <= left + EXPIRY_MARGIN_MS
