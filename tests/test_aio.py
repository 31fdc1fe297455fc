"""The asyncio facade never blocks the event loop while actors work."""

from __future__ import annotations

import asyncio

from engine import Config, SessionStore, Tier
from engine.aio import AsyncSessionStore
from events import Touch


def test_async_operations_round_trip():
    async def main() -> None:
        async with AsyncSessionStore(SessionStore(Config(enabled=True, tick_ms=0, auto_escalate=True))) as a:
            await a.set_session("s", "m", "SIMPLE")
            for _ in range(3):
                strikes = await a.record_request_hash("s", "h")
            assert strikes == 2
            assert (await a.get_session("s")).tier is Tier.MEDIUM
            await a.add_session_cost("s", 2_000_000)
            assert await a.get_session_cost_usd("s") == 2.0
            assert (await a.get_stats()).count == 1
            assert await a.ask(Touch("s")) is None
            assert (await a.get_session("s")).request_count == 2
            await a.clear_all()
            assert await a.get_session("s") is None
            assert await a.tick() == 0

    asyncio.run(main())


def test_loop_keeps_running_while_many_awaits_are_in_flight():
    """A ticker task advances between awaits: the loop is never parked on an actor."""

    async def main() -> tuple[int, int]:
        store = SessionStore(Config(enabled=True, tick_ms=0, shards=2))
        async with AsyncSessionStore(store) as a:
            ticks = 0
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            async def client(i: int) -> None:
                for n in range(20):
                    await a.set_session(f"s{i}", f"m{n}")

            ticking = asyncio.create_task(ticker())
            await asyncio.gather(*(client(i) for i in range(200)))
            stop.set()
            await ticking
            total = 0
            for i in range(200):
                total += (await a.get_session(f"s{i}")).request_count
            return ticks, total

    ticks, total = asyncio.run(main())
    assert total == 200 * 20
    # 4,000 awaits on actor threads: had any of them blocked the loop, the ticker could not
    # have interleaved; it runs once per loop iteration, i.e. many times while they were pending.
    assert ticks > 200


def test_disabled_async_store_is_a_no_op():
    async def main() -> None:
        a = AsyncSessionStore(SessionStore(Config()))
        await a.set_session("s", "m")
        assert await a.get_session("s") is None
        assert await a.record_request_hash("s", "h") == 0
        assert (await a.get_stats()).count == 0

    asyncio.run(main())
