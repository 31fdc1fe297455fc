"""SessionStore: the seed's Store API, each method a thin wrapper sending one event."""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any

from engine._backend import open_backend
from engine._time import now_ms
from engine.core.config import Config, default_config
from engine.core.entry import Entry, SessionInfo, Stats
from engine.shell.reply import Reply
from engine.shell.runtime import Observer, Runtime, StoreClosed
from events import (
    SESSION_EVENTS,
    STORE_EVENTS,
    Clear,
    ClearAll,
    Cost,
    Escalate,
    Event,
    GetCost,
    GetSession,
    GetStats,
    Hash,
    InvalidEvent,
    IsCacheSticky,
    SessionEvent,
    SetCacheSticky,
    SetSession,
    Tick,
    Tier,
    Touch,
)
from events import records as record_names

__all__ = [
    "NO_OP_RESULTS", "SessionStore", "StoreClosed", "merge_results",
]


def _short_id(session_id: str) -> str:
    return session_id[:8] + "..." if len(session_id) > 8 else session_id


class SessionStore:
    """A concurrent session store: sessions are actors hosted on a fixed pool of shards.

    When ``config.enabled`` is False, or a session id is ``""``, every method
    is a no-op returning None, 0, 0.0 or False as its type says.
    """

    def __init__(self, config: Config | None = None, *, observer: Observer | None = None) -> None:
        if config is None:
            config = default_config()
        if not isinstance(config, Config):
            raise InvalidEvent("config", f"must be an engine.Config, got {type(config).__name__}")
        self.config = config
        self._timeout = config.ask_timeout_s
        self._rt: Runtime | None = None
        self._closed = False
        if config.enabled:
            backend = open_backend(config)  # the file log's or Redis's state, and the shard class
            self._rt = Runtime(config, backend.log, observer, states=backend.states(),
                               shard_class=backend.shard_class)

    # -- context manager / lifecycle -------------------------------------------------
    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop every actor and thread this store started; idempotent."""
        self._closed = True
        if self._rt is not None:
            self._rt.close()

    @property
    def enabled(self) -> bool:
        return self._rt is not None

    # -- the generic paths --------------------------------------------------------
    def _runtime(self) -> Runtime | None:
        if self._closed and self._rt is not None:
            raise StoreClosed("the session store is closed")
        return self._rt

    def build(self, cls: type[SessionEvent], session_id: Any, *args: Any) -> SessionEvent | None:
        """Validate and build one event; None when the call is a no-op (disabled, empty id).

        A rejected input is logged (``input.rejected``, without the value) and re-raised.
        """
        if self._runtime() is None or (type(session_id) is str and session_id == ""):
            return None
        try:
            return cls(session_id, *args)
        except InvalidEvent as exc:
            self._reject(cls.__name__, exc, session_id)
            raise

    def _reject(self, operation: str, exc: InvalidEvent, session_id: Any) -> None:
        record: dict[str, Any] = {"seq": 0, "ts": now_ms(), "event": record_names.INPUT_REJECTED}
        if exc.field != "session_id" and type(session_id) is str:
            record["session_id"] = session_id
        record.update(operation=operation, field=exc.field, rule=exc.rule)
        assert self._rt is not None
        self._rt.write([record])

    def _check_event(self, event: Any) -> Runtime | None:
        rt = self._runtime()
        if type(event) not in _KNOWN_EVENT_TYPES:  # a subclass could reach an actor it would fail
            exc = InvalidEvent("event", f"must be one of the events of `events`, got {type(event).__name__}")
            if rt is not None:
                self._reject("event", exc, None)
            raise exc
        return rt

    def submit(self, event: Event, reply: Reply | None) -> list[Reply] | None:
        """Send an event; session events go to one mailbox, store-wide ones to every shard."""
        rt = self._rt
        assert rt is not None
        now = now_ms()
        if isinstance(event, SessionEvent):
            rt.route(event, now, reply)
            return None
        return rt.broadcast(event, now)

    def tell(self, event: Event) -> None:
        """Fire and forget: the event is applied in its session's turn, in send order."""
        rt = self._rt
        if rt is not None and not self._closed and type(event) in _SESSION_EVENT_TYPES:
            # The common case in one step (an event was validated when it was built).
            if event.session_id != "":
                rt.route(event, now_ms(), None)  # type: ignore[arg-type]
            return
        rt = self._check_event(event)
        if rt is None or event.session_id == "":
            return
        self.submit(event, None)

    def tell_many(self, events: Iterable[SessionEvent]) -> None:
        """Tell several session events at once, waking each shard at most once."""
        batch = []
        for event in events:
            self._check_event(event)
            if not isinstance(event, SessionEvent):
                raise InvalidEvent("event", f"must be a session event, got {type(event).__name__}")
            if event.session_id != "":
                batch.append(event)
        if self._rt is not None and batch:
            self._rt.route_many(batch, now_ms())

    def ask(self, event: Event, timeout: float | None = None) -> Any:
        """Send an event and wait for its result (see each event for what it returns)."""
        rt = self._check_event(event)
        if rt is None or event.session_id == "":
            return NO_OP_RESULTS.get(type(event))
        wait = self._timeout if timeout is None else timeout
        if isinstance(event, SessionEvent):
            reply = Reply()
            self.submit(event, reply)
            return reply.get(wait)
        replies = self.submit(event, None) or []
        results = [r.get(wait) for r in replies]
        return merge_results(event, results, now_ms())

    def _ask(self, default: Any, cls: type[SessionEvent], session_id: Any, *args: Any) -> Any:
        event = self.build(cls, session_id, *args)
        if event is None:
            return default
        reply = Reply()
        self._rt.route(event, now_ms(), reply)  # type: ignore[union-attr]  # build() returned: it is open
        return reply.get(self._timeout)

    # -- the seed's methods ---------------------------------------------------------
    def set_session(self, session_id: str, model: str, tier: Tier | str | None = None,
                    user_explicit: bool = False) -> None:
        """Pin a model to a session: create it, or update it (see SPEC.md)."""
        self._ask(None, SetSession, session_id, model, tier, user_explicit)

    def get_session(self, session_id: str) -> Entry | None:
        """A snapshot of the session, or None when absent or idle past the timeout."""
        return self._ask(None, GetSession, session_id)

    def touch_session(self, session_id: str) -> None:
        """Extend the session's timeout and count a request."""
        self._ask(None, Touch, session_id)

    def record_request_hash(self, session_id: str, request_hash: str) -> int:
        """Record a request hash; returns the strike count (0 when absent)."""
        return self._ask(0, Hash, session_id, request_hash)

    def escalate_session(self, session_id: str) -> Tier | None:
        """Bump the tier one step unless the pin is user-explicit; returns the tier after."""
        return self._ask(None, Escalate, session_id)

    def add_session_cost(self, session_id: str, micros: int) -> None:
        """Add spend in micro-USD; an absent session gets a cost-only entry."""
        self._ask(None, Cost, session_id, micros)

    def get_session_cost_usd(self, session_id: str) -> float:
        return self._ask(0.0, GetCost, session_id)

    def set_cache_sticky(self, session_id: str, provider: str) -> None:
        """Pin the session to a provider while its prefix cache is warm."""
        self._ask(None, SetCacheSticky, session_id, provider)

    def is_cache_sticky(self, session_id: str) -> bool:
        return self._ask(False, IsCacheSticky, session_id)

    def clear_session(self, session_id: str) -> None:
        self._ask(None, Clear, session_id)

    def clear_all(self) -> None:
        if self._runtime() is not None:
            self.ask(ClearAll())

    def get_stats(self) -> Stats:
        if self._runtime() is None:
            return Stats(0, [])
        return self.ask(GetStats())

    def tick(self) -> int:
        """One clock pass now, synchronously; returns the number of sessions expired."""
        if self._runtime() is None:
            return 0
        return self.ask(Tick())


_SESSION_EVENT_TYPES = frozenset(SESSION_EVENTS)
_KNOWN_EVENT_TYPES = _SESSION_EVENT_TYPES | frozenset(STORE_EVENTS)
#: What an event returns when the call is a no-op (store disabled, empty session id).
NO_OP_RESULTS: dict[type, Any] = {Hash: 0, GetCost: 0.0, IsCacheSticky: False, Tick: 0, GetStats: Stats(0, [])}


def merge_results(event: Event, results: list[Any], now: int) -> Any:
    """Combine the per-shard answers to a store-wide event."""
    if isinstance(event, GetStats):
        pairs = sorted((pair for part in results for pair in part), key=lambda p: p[0])
        infos = [SessionInfo(_short_id(sid), e.model, max(0, (now - e.created_at) // 1000))
                 for sid, e in pairs]
        return Stats(len(infos), infos)
    if isinstance(event, Tick):
        return sum(results)
    return None
