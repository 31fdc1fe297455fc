"""A session's running cost has a ceiling: 2^63-1 micro-USD, the int the log's JSON writer and readers hold.

Each Cost is capped at MAX_MICROS, but a session's total is the sum of many: the core refuses a cost that
would push it past MAX_TOTAL_MICROS as ``InvalidEvent("micros", ...)`` in the session's turn. The session is
unchanged, the refusal is logged as ``input.rejected`` (never the value), and the log still replays,
reopens and verifies. The same pure core runs on the Redis backend, so the refusal holds there too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from engine import Config, InvalidEvent, SessionStore, replay
from engine.core.entry import Entry
from engine.core.transitions import Rejected, apply
from engine.log.replay import read_log
from engine.log.verify import verify
from events import Cost, Route, RouteRules
from events import records as record_names
from events._validate import MAX_MICROS, MAX_TOTAL_MICROS
from tests.support.redis_servers import RedisServer

#: Costs of MAX_MICROS that leave the total just under the ceiling, and what is left below it then.
FULL = MAX_TOTAL_MICROS // MAX_MICROS
LEFT = MAX_TOTAL_MICROS - FULL * MAX_MICROS


def _fill(store: SessionStore, sid: str) -> None:
    """Bring ``sid``'s total to FULL * MAX_MICROS (told, then one ask so every tell is applied)."""
    store.tell_many([Cost(sid, MAX_MICROS) for _ in range(FULL)])
    assert store.get_session(sid).session_cost_micros == FULL * MAX_MICROS


def _check_ceiling(store: SessionStore, sid: str) -> None:
    with pytest.raises(InvalidEvent) as refused:
        store.add_session_cost(sid, MAX_MICROS)  # would pass 2^63-1
    assert refused.value.field == "micros" and "2^63-1" in refused.value.rule
    assert store.get_session(sid).session_cost_micros == FULL * MAX_MICROS  # unchanged
    store.tell(Cost(sid, MAX_MICROS))  # told: dropped all the same (logged), never a shard restart
    store.add_session_cost(sid, LEFT)  # exactly up to the ceiling is fine
    assert store.get_session(sid).session_cost_micros == MAX_TOTAL_MICROS
    with pytest.raises(InvalidEvent, match="micros"):
        store.add_session_cost(sid, 1)
    store.add_session_cost(sid, 0)  # adds nothing: never refused
    assert store.get_session(sid).session_cost_micros == MAX_TOTAL_MICROS
    assert store._rt.restarts == 0  # type: ignore[union-attr]


def test_the_core_refuses_a_cost_past_the_ceiling_and_leaves_the_session_unchanged() -> None:
    config = Config(enabled=True)
    entry = Entry("m", None, 0, 0, 1, session_cost_micros=MAX_TOTAL_MICROS - 5)
    out = apply(entry, Cost("s", 6), 0, config)
    assert out.state is entry and type(out.result) is Rejected
    assert (out.result.error.field, out.result.error.rule) == ("micros", out.records[-1][1]["rule"])
    assert [name for name, _ in out.records] == [record_names.INPUT_REJECTED]
    assert out.records[0][1]["operation"] == "Cost" and out.records[0][1]["field"] == "micros"
    assert apply(entry, Cost("s", 5), 0, config).state.session_cost_micros == MAX_TOTAL_MICROS


def test_a_settlement_past_the_ceiling_is_refused_and_keeps_its_reservation() -> None:
    config = Config(enabled=True)
    rules = RouteRules(models=(("MEDIUM", ("m",)),), max_cost_micros=MAX_MICROS)
    entry = Entry("m", None, 0, 0, 1)
    out = apply(entry, Route("s", "m", "MEDIUM", rules, estimates=(("", 100),), reservation_id="r1"), 0, config)
    held = out.state
    assert held.reservations and held.reservations[0][0] == "r1"
    near = replace(held, session_cost_micros=MAX_TOTAL_MICROS - 10)
    settled = apply(near, Cost("s", 11, "r1"), 0, config)
    assert settled.state is near and type(settled.result) is Rejected  # the reservation stays open
    assert apply(near, Cost("s", 10, "r1"), 0, config).state.reservations == ()


@pytest.mark.parametrize("fsync", ["interval", "always"])  # always: the acknowledger answers the refusal
def test_a_store_refuses_a_cost_past_the_ceiling_and_its_log_still_reads(
        make_store: Callable[..., SessionStore], log_path: Path, fsync: str) -> None:
    store = make_store(event_log=str(log_path), fsync=fsync)
    _fill(store, "s")
    _check_ceiling(store, "s")
    store.close()
    rejected = [r for r in read_log(log_path) if r["event"] == record_names.INPUT_REJECTED]  # the engine's own reader
    assert [(r["session_id"], r["operation"], r["field"]) for r in rejected] == [("s", "Cost", "micros")] * 3
    assert replay(log_path)["s"].session_cost_micros == MAX_TOTAL_MICROS
    again = SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log_path)))
    try:
        assert again.get_session("s").session_cost_micros == MAX_TOTAL_MICROS
    finally:
        again.close()
    assert verify(log_path).status in ("verified", "unchained")


def test_the_redis_backend_refuses_a_cost_past_the_ceiling(redis_server: RedisServer) -> None:
    from engine.distributed.redis_host import Keys, read_streams

    config = Config(enabled=True, tick_ms=0, backend=redis_server.url, redis_buckets=8, ask_timeout_s=30.0)
    with SessionStore(config) as store:
        _fill(store, "s")
        _check_ceiling(store, "s")
        with redis_server.client() as client:
            records = [record for _, record in read_streams(client, Keys("se", 8))]
    rejected = [r for r in records if r["event"] == record_names.INPUT_REJECTED]
    assert [(r["session_id"], r["field"]) for r in rejected] == [("s", "micros")] * 3
    with SessionStore(config) as again:  # another replica reads what Redis holds
        assert again.get_session("s").session_cost_micros == MAX_TOTAL_MICROS
