"""asyncio facade: the store's operations as coroutines that never block the loop.

Each call sends its event with a reply whose completion, in the shard's
thread, resolves an asyncio future through ``loop.call_soon_threadsafe``;
the coroutine awaits that future, so the loop keeps running while actors work.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from engine._time import now_ms
from engine.core.entry import Entry, Stats
from engine.shell.reply import Reply
from engine.store import NO_OP_RESULTS, SessionStore, merge_results
from events import (
    Clear,
    ClearAll,
    Cost,
    Escalate,
    Event,
    GetCost,
    GetSession,
    GetStats,
    Hash,
    IsCacheSticky,
    SessionEvent,
    SetCacheSticky,
    SetSession,
    Tick,
    Tier,
    Touch,
)

__all__ = [
    "AsyncSessionStore",
]


def _resolve(future: asyncio.Future[Any], reply: Reply) -> None:
    if future.done():
        return
    try:
        future.set_result(reply.result())
    except BaseException as exc:
        future.set_exception(exc)


def _resolver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]) -> Callable[[Reply], None]:
    """The reply callback, run in an engine thread: hand the result to the loop's thread."""

    def resolve(reply: Reply) -> None:
        # The loop may be gone (asyncio.run returned while the event was queued): nobody awaits.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, future, reply)

    return resolve


class AsyncSessionStore:
    """Coroutine twin of ``SessionStore``; wraps (and closes) a store."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store

    async def __aenter__(self) -> AsyncSessionStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.store.close()

    def _await(self, event: Event) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.store.submit(event, Reply(_resolver(loop, future)))
        return future

    async def ask(self, event: Event, timeout: float | None = None) -> Any:
        """Await the result of any event (store-wide events gather every shard)."""
        self.store._check_event(event)
        if not self.store.enabled or event.session_id == "":
            return NO_OP_RESULTS.get(type(event))
        wait = self.store.config.ask_timeout_s if timeout is None else timeout
        if isinstance(event, SessionEvent):
            return await asyncio.wait_for(self._await(event), wait)
        rt = self.store._rt
        assert rt is not None
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in rt.mailboxes]
        rt.broadcast(event, now_ms(), [Reply(_resolver(loop, future)) for future in futures])
        results = await asyncio.wait_for(asyncio.gather(*futures), wait)
        return merge_results(event, list(results), now_ms())

    async def _ask(self, default: Any, cls: type[SessionEvent], session_id: Any, *args: Any) -> Any:
        event = self.store.build(cls, session_id, *args)
        if event is None:
            return default
        return await asyncio.wait_for(self._await(event), self.store.config.ask_timeout_s)

    async def set_session(self, session_id: str, model: str, tier: Tier | str | None = None,
                          user_explicit: bool = False) -> None:
        await self._ask(None, SetSession, session_id, model, tier, user_explicit)

    async def get_session(self, session_id: str) -> Entry | None:
        return await self._ask(None, GetSession, session_id)

    async def touch_session(self, session_id: str) -> None:
        await self._ask(None, Touch, session_id)

    async def record_request_hash(self, session_id: str, request_hash: str) -> int:
        return await self._ask(0, Hash, session_id, request_hash)

    async def escalate_session(self, session_id: str) -> Tier | None:
        return await self._ask(None, Escalate, session_id)

    async def add_session_cost(self, session_id: str, micros: int) -> None:
        await self._ask(None, Cost, session_id, micros)

    async def get_session_cost_usd(self, session_id: str) -> float:
        return await self._ask(0.0, GetCost, session_id)

    async def set_cache_sticky(self, session_id: str, provider: str) -> None:
        await self._ask(None, SetCacheSticky, session_id, provider)

    async def is_cache_sticky(self, session_id: str) -> bool:
        return await self._ask(False, IsCacheSticky, session_id)

    async def clear_session(self, session_id: str) -> None:
        await self._ask(None, Clear, session_id)

    async def clear_all(self) -> None:
        await self.ask(ClearAll())

    async def get_stats(self) -> Stats:
        if not self.store.enabled:
            return Stats(0, [])
        return await self.ask(GetStats())

    async def tick(self) -> int:
        if not self.store.enabled:
            return 0
        return await self.ask(Tick())
