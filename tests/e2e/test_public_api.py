"""Every public name of SPEC.md imports from engine / events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import engine
import events

SPEC_ENGINE_NAMES = (
    "SessionStore", "Config", "default_config", "Entry", "Stats", "SessionInfo", "MessageInfo", "Tier", "replay",
    "cache_ttl_for_provider", "derive_session_id", "get_session_id", "hash_request_content", "provider_from_model",
    "should_cache_sticky", "EngineError", "InvalidEvent", "BackendError", "BackendUnavailable",
)
SPEC_EVENTS = (
    "Touch", "Hash", "Escalate", "Cost", "Expire", "SetSession", "GetSession", "SetCacheSticky", "IsCacheSticky",
    "Clear", "ClearAll",
)


def test_engine_exports_every_spec_name():
    for name in SPEC_ENGINE_NAMES:
        assert name in engine.__all__ and hasattr(engine, name), name
    assert issubclass(engine.InvalidEvent, engine.EngineError) and issubclass(engine.InvalidEvent, ValueError)
    assert issubclass(engine.BackendError, engine.EngineError)
    assert issubclass(engine.BackendUnavailable, engine.EngineError)


def test_events_export_the_typed_events():
    for name in SPEC_EVENTS:
        cls = getattr(events, name)
        assert cls.__dataclass_params__.frozen and "__slots__" in cls.__dict__, name


def test_tier_is_a_str_enum_ranked_by_declaration():
    assert [t.value for t in engine.Tier] == ["SIMPLE", "MEDIUM", "COMPLEX", "REASONING"]
    assert engine.Tier("COMPLEX") == "COMPLEX"
    assert [events.tier_rank(t) for t in engine.Tier] == [0, 1, 2, 3]


def test_python_dash_m_engine_shows_the_commands():
    out = subprocess.run([sys.executable, "-m", "engine", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).parents[2], check=True).stdout
    for command in ("simulate", "audit", "replay"):
        assert command in out
