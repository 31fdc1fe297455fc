"""session-engine: per-session memory for LLM routers, as an actor-style engine.

Public API (docs/architecture.md lists the public modules); every other module is private and free to change.
"""

from engine._backend_url import BackendError, BackendUnavailable
from engine._capacity import SessionRefused
from engine._config import Config, default_config
from engine._entry import Entry, MessageInfo, SessionInfo, Stats
from engine._log import AuditLogError
from engine._providers import cache_ttl_for_provider, provider_from_model
from engine._replay import LogCorrupt, replay
from engine._reply import AskTimeout
from engine._requests import derive_session_id, get_session_id, hash_request_content, should_cache_sticky
from engine._shard import ShardFailed
from engine.identity import keyed_session_id
from engine.policy import BudgetExceeded
from engine.store import SessionStore, StoreClosed
from events import EngineError, InvalidEvent, Tier

__all__ = [
    "AskTimeout", "AuditLogError", "BackendError", "BackendUnavailable", "BudgetExceeded", "Config", "EngineError",
    "Entry", "InvalidEvent", "LogCorrupt", "MessageInfo", "SessionInfo", "SessionRefused", "SessionStore",
    "ShardFailed", "Stats", "StoreClosed", "Tier", "cache_ttl_for_provider", "default_config", "derive_session_id",
    "get_session_id", "hash_request_content", "keyed_session_id", "provider_from_model", "replay",
    "should_cache_sticky",
]
