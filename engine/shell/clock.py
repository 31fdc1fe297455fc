"""The clock: one thread that sends every shard a Tick every ``tick_ms``.

It reads the time through ``engine._time.now_ms`` (see there why) and skips a
shard whose previous pass has not finished, so ticks never pile up behind a
busy shard. A pass that raises is reported through the runtime's guard
(engine/shell/guard.py) and the clock keeps ticking.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Protocol

from engine._time import now_ms
from events import Tick

__all__ = [
    "Clock", "ClockHost",
]


class ClockHost(Protocol):
    """What the clock uses of the runtime (engine.shell.runtime.Runtime is one)."""

    #: Runs a pass, reporting what it raises (engine/shell/guard.py).
    guard: Any
    #: One per shard: its ``index`` and whether a pass is already queued (``tick_pending``).
    mailboxes: Sequence[Any]

    def send(self, index: int, event: Any, now: int, reply: Any) -> None: ...

_TICK = Tick()


class Clock(threading.Thread):
    def __init__(self, runtime: ClockHost, tick_ms: int) -> None:
        super().__init__(name="session-engine-clock", daemon=True)
        self._rt = runtime
        self._period = tick_ms / 1000
        self._stopped = threading.Event()

    def run(self) -> None:
        guard = self._rt.guard
        while not self._stopped.wait(self._period):
            guard.run("clock", self.emit)

    def emit(self) -> None:
        """Send one Tick, stamped with the current time, to every idle shard."""
        now = now_ms()
        for mailbox in self._rt.mailboxes:
            if not mailbox.tick_pending:
                mailbox.tick_pending = True
                self._rt.send(mailbox.index, _TICK, now, None)

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()
