"""session-engine: per-session memory for LLM routers, as an actor-style engine.

Public API (docs/architecture.md lists the public modules); every other module is private and free to change.
"""

from engine.core.backend_url import BackendError, BackendUnavailable
from engine.core.config import Config, default_config
from engine.core.entry import Entry, MessageInfo, SessionInfo, Stats
from engine.core.providers import cache_ttl_for_provider, provider_from_model
from engine.core.requests import derive_session_id, get_session_id, hash_request_content, should_cache_sticky
from engine.identity import keyed_session_id
from engine.log.replay import LogCorrupt, replay
from engine.log.writer import AuditLogError
from engine.policy import BudgetExceeded
from engine.shell.capacity import SessionRefused
from engine.shell.reply import AskTimeout
from engine.shell.shard import ShardFailed
from engine.store import SessionStore, StoreClosed
from events import EngineError, InvalidEvent, Tier

__all__ = [
    "AskTimeout", "AuditLogError", "BackendError", "BackendUnavailable", "BudgetExceeded", "Config", "EngineError",
    "Entry", "InvalidEvent", "LogCorrupt", "MessageInfo", "SessionInfo", "SessionRefused", "SessionStore",
    "ShardFailed", "Stats", "StoreClosed", "Tier", "cache_ttl_for_provider", "default_config", "derive_session_id",
    "get_session_id", "hash_request_content", "keyed_session_id", "provider_from_model", "replay",
    "should_cache_sticky",
]
