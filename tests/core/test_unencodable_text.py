"""Text the log's writer cannot encode is refused at the call, and a shard never fails a batch for one record.

A JSON body's ``"\\ud800"`` escape carries a lone surrogate into a Python str. orjson (UTF-8) cannot
write one, so every text check (events/_validate.py) refuses it as ``InvalidEvent`` naming the field, in
the caller's thread; the fallbacks that do not raise (``is_valid_session_id``, the identity chain) agree.
Past validation, a record the log still cannot render (forced here) costs only the event that made it:
its caller gets ``UnrenderableRecord``, its session is unchanged, and every other event of the same batch
is applied and logged.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import engine.shell.shard
from engine import Config, EngineError, InvalidEvent, SessionStore, replay
from engine.core.transitions import apply as real_apply
from engine.identity import IdentityResolver
from engine.log.render import UnrenderableRecord
from engine.log.replay import read_log
from engine.log.verify import verify
from engine.policy import Policy, Request
from engine.shell.reply import Reply
from events import Cost, Decision, Hash, Route, RouteRules, SetCacheSticky, SetDeployment, SetSession, Touch
from events import records as record_names
from events._validate import UNENCODABLE, check_session_id, check_text, is_valid_session_id

LONE = ["\ud800", "\udcff", "ok \udfff end", "会话\ud83d"]  # a high or low surrogate alone, among text


@pytest.mark.parametrize("value", LONE)
def test_a_lone_surrogate_is_refused_by_every_text_check_naming_the_field(value: str) -> None:
    for build, field in [
        (lambda: check_session_id(value), "session_id"),
        (lambda: check_text(value, "model"), "model"),
        (lambda: Touch(value), "session_id"),
        (lambda: SetSession("s", value), "model"),
        (lambda: SetCacheSticky("s", value), "provider"),
        (lambda: SetDeployment("s", value), "deployment"),
        (lambda: SetDeployment("s", "d", value), "model"),
        (lambda: Hash("s", value), "hash"),
        (lambda: Decision("s", "route", reason=value), "reason"),
        (lambda: Cost("s", 1, value), "reservation_id"),
        (lambda: Route("s", value, None, RouteRules()), "model"),
    ]:
        with pytest.raises(InvalidEvent) as refused:
            build()
        assert (refused.value.field, refused.value.rule) == (field, UNENCODABLE)
    assert not is_valid_session_id(value)


def test_printable_unicode_and_astral_text_still_pass() -> None:
    for value in ["会话-ünïcødé", "emoji \U0001f600", "\u2028 separator", "plain-ascii-0001"]:
        check_session_id(value)
        assert is_valid_session_id(value)
    with pytest.raises(InvalidEvent, match="control characters"):
        check_session_id("a\tb")  # a control character is named first, as before


def test_policy_route_with_a_surrogate_id_or_model_raises_invalid_event(
        make_store: Callable[..., SessionStore]) -> None:
    policy = Policy(make_store(), {"MEDIUM": "m"})
    with pytest.raises(InvalidEvent) as refused:
        policy.route(Request(model="m", session_id="\udcff"))
    assert refused.value.field == "session_id"
    with pytest.raises(InvalidEvent) as refused:
        policy.route(Request(model="m\ud800", session_id="s"))
    assert refused.value.field == "model"
    assert policy.route(Request(model="m", session_id="s")).model == "m"  # the engine was not hurt


def test_the_identity_chain_treats_a_surrogate_id_as_invalid_and_hashes_surrogate_text() -> None:
    identity = IdentityResolver(secret="identity-test-secret-0123")
    assert identity.resolve({"x-session-id": "a\ud800"}) == ("", "invalid:header:x-session-id")
    sid, source = identity.resolve(None, {"messages": [{"role": "user", "content": "hi \ud800"}]})
    assert source == "fingerprint" and is_valid_session_id(sid)


def test_surrogate_ids_from_one_thread_never_fail_another_callers_calls(
        make_store: Callable[..., SessionStore], log_path: Path) -> None:
    store = make_store(event_log=str(log_path), shards=1)
    refused: list[str] = []
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def hostile() -> None:
        start.wait()
        for i in range(200):
            try:
                store.set_session(f"bad-{i}-\ud800", "m")
            except InvalidEvent as exc:
                refused.append(exc.field)
            try:
                store.add_session_cost(f"\udcff{i}", 5)
            except InvalidEvent as exc:
                refused.append(exc.field)

    def normal() -> None:
        start.wait()
        for i in range(3_000):
            try:
                store.set_session(f"good-{i % 50}", "m")
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=hostile), threading.Thread(target=normal)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert refused == ["session_id"] * 400  # every one refused at the call
    assert store._rt.restarts == 0  # type: ignore[union-attr]
    assert store.get_session("good-0").request_count == 60
    store.close()
    records = list(read_log(log_path))  # the engine's own reader
    assert sum(r["event"] == record_names.INPUT_REJECTED for r in records) == 400
    assert set(replay(log_path)) == {f"good-{i}" for i in range(50)}


def test_an_unrenderable_record_fails_only_its_own_event_and_the_rest_of_the_batch_is_logged(
        make_store: Callable[..., SessionStore], log_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced past validation: the core's outcome for session "poison" carries an int orjson cannot write
    (the shape of the defect: a value the writer cannot encode). A held shard makes one batch of six asks."""
    entered, release = threading.Event(), threading.Event()

    def faulty(state: Any, event: Any, now: int, config: Any) -> Any:
        out = real_apply(state, event, now, config)
        if event.session_id == "hold" and not release.is_set():
            entered.set()
            release.wait()
        if event.session_id == "poison" and type(event) is SetSession and event.model == "after":
            name, fields = out.records[0]
            out = out._replace(records=((name, {**fields, "request_count": 2**64}),))
        return out

    monkeypatch.setattr(engine.shell.shard, "apply", faulty)
    store = make_store(event_log=str(log_path), shards=1)
    store.set_session("poison", "before")  # created; its updates are the ones that cannot be rendered
    store.tell(Touch("hold"))  # the shard waits inside this turn while the batch queues up
    assert entered.wait(10)
    asks = [SetSession("a", "m"), SetSession("poison", "after"), Touch("poison"), Cost("b", 7),
            SetSession("c", "m"), Touch("a")]
    replies = [Reply() for _ in asks]
    for event, reply in zip(asks, replies, strict=True):
        store.submit(event, reply)
    release.set()
    results: list[Any] = []
    for reply in replies:
        try:
            results.append(reply.get(10))
        except EngineError as exc:
            results.append(exc)
    assert [type(r).__name__ for r in results] == ["NoneType", "UnrenderableRecord", "NoneType", "NoneType",
                                                   "NoneType", "NoneType"]
    assert isinstance(results[1], UnrenderableRecord) and "nothing changed" in str(results[1])
    assert store._rt.restarts == 0  # type: ignore[union-attr]
    poison = store.get_session("poison")
    assert (poison.model, poison.request_count) == ("before", 2)  # only the Touch after it applied
    assert store.get_session("a").request_count == 2 and store.get_session("c") is not None
    assert store.get_session_cost_usd("b") == pytest.approx(7e-6)
    store.close()
    live = replay(log_path)  # nothing recorded is lost: the log holds every applied change
    assert {sid: e.request_count for sid, e in live.items()} == {"poison": 2, "a": 2, "c": 1, "b": 0}
    assert live["poison"].model == "before"
    assert verify(log_path).status in ("verified", "unchained")
    again = SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log_path)))
    try:
        assert again.get_session("poison").model == "before"
    finally:
        again.close()
