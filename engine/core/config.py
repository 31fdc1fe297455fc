"""Config: one frozen dataclass, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.core.backend_url import parse_backend
from events import InvalidEvent
from events._validate import check_bool, check_text

__all__ = [
    "Config", "default_config",
]

FSYNC_POLICIES = ("always", "interval", "never")


def _check_int(value: object, field: str, minimum: int) -> None:
    if type(value) is not int:
        raise InvalidEvent(field, f"must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidEvent(field, f"must be >= {minimum}")


@dataclass(frozen=True, slots=True)
class Config:
    """Store settings. The first three are the seed's; docs/architecture.md explains the rest."""

    enabled: bool = False
    timeout_ms: int = 1_800_000
    header_name: str = "x-session-id"
    #: Path of the JSON-lines audit log (a file, or a directory of segments), or None.
    event_log: str | Path | None = None
    #: Background clock period in ms; 0 turns the clock off (only ``tick()`` expires).
    tick_ms: int = 1_000
    #: Capacity; the least recently used session is evicted beyond it. None: unbounded.
    max_sessions: int | None = None
    #: Most live sessions of one tenant (engine/core/scope.py); at the limit the tenant's own least
    #: recently used session is evicted, never another tenant's. None: no per-tenant limit.
    max_sessions_per_tenant: int | None = 10_000
    #: Most sessions one tenant may create per minute (a token bucket: that many in a burst, then
    #: that many a minute); a creation past it is refused and logged. None: no limit.
    max_creations_per_tenant_per_minute: int | None = 6_000
    auto_escalate: bool = False
    strike_limit: int = 2
    #: Shard actors (threads) hosting the sessions; fixed, whatever the number of sessions.
    #: Under CPython's GIL more shards than cores add hand-offs, not parallelism (docs/performance.md).
    shards: int = 2
    #: Most sessions one shard expires per mailbox turn, so others keep being served.
    expiry_batch: int = 1_000
    #: Most queued events one shard applies per mailbox turn before writing their records.
    drain_batch: int = 512
    #: Durability of the audit log: "always", "interval" or "never" (docs/audit-log.md).
    fsync: str = "interval"
    fsync_interval_ms: int = 1_000
    #: Rotate the log into a new segment once the current one passes this size.
    segment_bytes: int = 64 * 1024 * 1024
    #: Hash chain over the audit log: "batch" (one seal per write), "record" or "off" (docs/audit-log.md).
    audit_chain: str = "batch"
    #: Default wait of a blocking store method, in seconds.
    ask_timeout_s: float = 10.0
    #: How long a session's budget ledger (spend and open reservations) outlives its idle expiry,
    #: counted from the session's first request (docs/policy.md); 0: the ledger ends with the session.
    budget_window_ms: int = 3_600_000
    #: Where sessions live: "memory", or redis://, rediss://, unix://, redis+cluster:// (docs/distributed.md).
    backend: str = "memory"
    #: Redis backend: hash-tag buckets (fixed per namespace; stored in Redis and checked at start).
    redis_buckets: int = 64
    #: Redis backend: key prefix of every key the engine owns.
    redis_namespace: str = "se"
    #: Redis backend: keep about this many records per bucket stream (XADD MAXLEN ~); None keeps all.
    redis_stream_maxlen: int | None = None

    def __post_init__(self) -> None:
        check_bool(self.enabled, "enabled")
        _check_int(self.timeout_ms, "timeout_ms", 1)
        check_text(self.header_name, "header_name", 128)
        if self.event_log is not None and not isinstance(self.event_log, (str, Path)):
            raise InvalidEvent("event_log", f"must be a path or None, got {type(self.event_log).__name__}")
        if isinstance(self.event_log, str) and not self.event_log:
            raise InvalidEvent("event_log", "must not be empty (use None for no log)")
        _check_int(self.tick_ms, "tick_ms", 0)
        if self.max_sessions is not None:
            _check_int(self.max_sessions, "max_sessions", 1)
        if self.max_sessions_per_tenant is not None:
            _check_int(self.max_sessions_per_tenant, "max_sessions_per_tenant", 1)
        if self.max_creations_per_tenant_per_minute is not None:
            _check_int(self.max_creations_per_tenant_per_minute, "max_creations_per_tenant_per_minute", 1)
        check_bool(self.auto_escalate, "auto_escalate")
        _check_int(self.strike_limit, "strike_limit", 1)
        _check_int(self.budget_window_ms, "budget_window_ms", 0)
        _check_int(self.shards, "shards", 1)
        _check_int(self.expiry_batch, "expiry_batch", 1)
        _check_int(self.drain_batch, "drain_batch", 1)
        if self.fsync not in FSYNC_POLICIES:
            raise InvalidEvent("fsync", "must be one of always, interval, never")
        _check_int(self.fsync_interval_ms, "fsync_interval_ms", 1)
        _check_int(self.segment_bytes, "segment_bytes", 4096)
        if self.audit_chain not in ("batch", "record", "off"):
            raise InvalidEvent("audit_chain", "must be one of batch, record, off")
        if type(self.ask_timeout_s) not in (int, float) or not self.ask_timeout_s > 0:
            raise InvalidEvent("ask_timeout_s", "must be a positive number")
        if parse_backend(self.backend) is not None:
            if self.event_log is not None:
                raise InvalidEvent("event_log", "must be None with a Redis backend (its audit log is in Redis streams)")
            if self.max_sessions is not None:
                raise InvalidEvent("max_sessions", "is not supported with a Redis backend (Redis frees idle "
                                   "sessions by expiry and PEXPIRE; docs/distributed.md)")
        _check_int(self.redis_buckets, "redis_buckets", 1)
        check_text(self.redis_namespace, "redis_namespace", 64)
        if not self.redis_namespace or any(c in self.redis_namespace for c in "{}: "):
            raise InvalidEvent("redis_namespace", "must be non-empty, without braces, colons or spaces")
        if self.redis_stream_maxlen is not None:
            _check_int(self.redis_stream_maxlen, "redis_stream_maxlen", 1)


def default_config() -> Config:
    """The seed's defaults: disabled, 30-minute timeout, header x-session-id."""
    return Config()
