"""Typed events of session-engine: pure data, validated at construction.

No dependency on ``engine``: a router can build and queue events without it.
"""

from events import _records as records
from events._errors import EngineError, InvalidEvent
from events._events import (
    SESSION_EVENTS,
    STORE_EVENTS,
    Clear,
    ClearAll,
    Cost,
    Decision,
    Escalate,
    Event,
    Evict,
    Expire,
    GetCost,
    GetSession,
    GetStats,
    Hash,
    IsCacheSticky,
    Release,
    Route,
    RouteRules,
    SessionEvent,
    SetCacheSticky,
    SetDeployment,
    SetSession,
    Tick,
    Touch,
)
from events._records import RECORD_NAMES
from events._tier import Tier, parse_tier, tier_above, tier_rank

__all__ = [
    "RECORD_NAMES", "SESSION_EVENTS", "STORE_EVENTS", "Clear", "ClearAll", "Cost",
    "Decision", "EngineError", "Escalate", "Event", "Evict", "Expire", "GetCost",
    "GetSession", "GetStats", "Hash", "InvalidEvent", "IsCacheSticky", "Release", "Route", "RouteRules", "SessionEvent",
    "SetCacheSticky", "SetDeployment", "SetSession", "Tick", "Tier", "Touch",
    "parse_tier", "records", "tier_above", "tier_rank",
]
