"""Bad input raises InvalidEvent naming the field; state and other sessions are untouched."""

from __future__ import annotations

import pytest

import events
from engine import Config, EngineError, InvalidEvent
from tests.conftest import read_log

BAD_CALLS = [
    ("set_session", (123, "m"), "session_id"),
    ("set_session", ("x" * 257, "m"), "session_id"),
    ("set_session", ("bad\nid", "m"), "session_id"),
    ("set_session", ("bad\x00id", "m"), "session_id"),
    ("set_session", ("s2", 5), "model"),
    ("set_session", ("s2", "m", "ULTRA"), "tier"),
    ("set_session", ("s2", "m", 3), "tier"),
    ("set_session", ("s2", "m", "SIMPLE", 1), "user_explicit"),
    ("add_session_cost", ("good", -1), "micros"),
    ("add_session_cost", ("good", True), "micros"),
    ("add_session_cost", ("good", 1.5), "micros"),
    ("add_session_cost", ("good", "10"), "micros"),
    ("add_session_cost", ("good", 10**16), "micros"),
    ("record_request_hash", ("good", None), "hash"),
    ("record_request_hash", ("good", 7), "hash"),
    ("set_cache_sticky", ("good", b"anthropic"), "provider"),
    ("touch_session", (None,), "session_id"),
    ("get_session", (["s"],), "session_id"),
]


@pytest.mark.parametrize(("method", "args", "field"), BAD_CALLS)
def test_malformed_call_names_the_field_and_changes_nothing(make_store, log_path, method, args, field):
    store = make_store(event_log=str(log_path))
    store.set_session("good", "m", "MEDIUM")
    store.add_session_cost("good", 10)
    store.set_session("other", "m2")
    before = (store.get_session("good"), store.get_session("other"), store.get_stats())
    with pytest.raises(InvalidEvent) as info:
        getattr(store, method)(*args)
    assert info.value.field == field
    assert str(info.value).startswith(field)
    assert isinstance(info.value, ValueError) and isinstance(info.value, EngineError)
    assert (store.get_session("good"), store.get_session("other"), store.get_stats()) == before
    store.touch_session("other")  # still serving
    assert store.get_session("other").request_count == 2
    rejected = [r for r in read_log(log_path) if r["event"] == "input.rejected"]
    assert len(rejected) == 1 and rejected[0]["field"] == field


def test_rejected_value_is_never_logged(make_store, log_path):
    store = make_store(event_log=str(log_path))
    secret = "sk-live-SECRET\x01"
    with pytest.raises(InvalidEvent):
        store.set_session(secret, "m")
    with pytest.raises(InvalidEvent):
        store.set_session("s", "m", "TOPSECRETTIER")
    text = log_path.read_text()
    assert "SECRET" not in text and "TOPSECRETTIER" not in text
    assert text.count("input.rejected") == 2


def test_unknown_event_type_is_rejected(make_store):
    store = make_store()
    with pytest.raises(InvalidEvent) as info:
        store.tell("Touch(s)")
    assert info.value.field == "event"
    with pytest.raises(InvalidEvent):
        store.ask(object())


def test_events_validate_at_construction():
    with pytest.raises(InvalidEvent) as info:
        events.Cost("s", -5)
    assert info.value.field == "micros"
    with pytest.raises(InvalidEvent):
        events.Hash("s", "x" * 129)
    assert events.SetSession("s", "m", "SIMPLE").tier is events.Tier.SIMPLE


@pytest.mark.parametrize(("field", "value"), [
    ("enabled", "yes"), ("timeout_ms", 0), ("timeout_ms", True), ("tick_ms", -1), ("max_sessions", 0),
    ("strike_limit", 0), ("shards", 0), ("fsync", "sometimes"), ("event_log", 5), ("event_log", ""),
    ("ask_timeout_s", 0), ("header_name", 3),
])
def test_config_is_validated_at_construction(field, value):
    with pytest.raises(InvalidEvent) as info:
        Config(**{field: value})
    assert info.value.field == field


def test_store_rejects_a_non_config():
    from engine import SessionStore

    with pytest.raises(InvalidEvent) as info:
        SessionStore({"enabled": True})  # type: ignore[arg-type]
    assert info.value.field == "config"


@pytest.mark.parametrize("char", [chr(c) for c in (*range(0x20), *range(0x7F, 0xA0))])
def test_every_control_character_is_rejected_in_an_id(char):
    with pytest.raises(InvalidEvent) as info:
        events.Touch(f"id{char}x")
    assert info.value.field == "session_id"


def test_printable_unicode_ids_are_accepted():
    for sid in ("café-42", "会话-1", "id with spaces", "x\u2028y"):  # \u2028: not printable, not a control
        assert events.Touch(sid).session_id == sid
