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
    """A ticker task advances during every await: the loop is never parked on an actor."""

    async def main() -> tuple[int, int, int]:
        store = SessionStore(Config(enabled=True, tick_ms=0, shards=2))
        async with AsyncSessionStore(store) as a:
            ticks = 0
            parked = 0  # awaits during which the loop ran nothing else
            stop = asyncio.Event()

            async def ticker() -> None:
                nonlocal ticks
                while not stop.is_set():
                    ticks += 1
                    await asyncio.sleep(0)

            async def client(i: int) -> None:
                nonlocal parked
                for n in range(20):
                    before = ticks
                    await a.set_session(f"s{i}", f"m{n}")
                    parked += ticks == before

            ticking = asyncio.create_task(ticker())
            await asyncio.sleep(0)  # the ticker is running
            await asyncio.gather(*(client(i) for i in range(200)))
            stop.set()
            await ticking
            total = 0
            for i in range(200):
                total += (await a.get_session(f"s{i}")).request_count
            return ticks, total, parked

    ticks, total, parked = asyncio.run(main())
    assert total == 200 * 20
    # 4,000 awaits on actor threads: a call that blocked the loop would return without the ticker (always
    # ready) getting a turn; every await suspended the coroutine, so the ticker ran during each of them.
    assert parked == 0
    assert ticks >= 20


def test_disabled_async_store_is_a_no_op():
    async def main() -> None:
        a = AsyncSessionStore(SessionStore(Config()))
        await a.set_session("s", "m")
        assert await a.get_session("s") is None
        assert await a.record_request_hash("s", "h") == 0
        assert (await a.get_stats()).count == 0

    asyncio.run(main())
