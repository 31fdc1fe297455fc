"""A one-shot reply slot: the cheapest way for a shard thread to answer a caller."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from events import EngineError

__all__ = [
    "AskTimeout", "Reply",
]

logger = logging.getLogger("engine")


class AskTimeout(EngineError, TimeoutError):
    """The engine did not answer within the wait the caller allowed."""


class Reply:
    """Completed once by a shard; waited on by a thread or observed by a callback.

    A pre-acquired lock is the waiting primitive: releasing it is the whole
    hand-off, far cheaper than pykka's queue-backed futures on the hot path.
    """

    __slots__ = ("_callback", "_error", "_lock", "_value")

    def __init__(self, callback: Callable[[Reply], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._value: Any = None
        self._error: BaseException | None = None
        self._callback = callback

    def set(self, value: Any) -> None:
        self._value = value
        self._done()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done()

    def _done(self) -> None:
        self._lock.release()
        if self._callback is not None:
            try:
                self._callback(self)
            except Exception:  # a caller's callback must never take an engine thread down
                logger.exception("session-engine: a reply callback failed")

    def result(self) -> Any:
        """The value, or raise the error (only once the reply is complete)."""
        if self._error is not None:
            raise self._error
        return self._value

    def get(self, timeout: float | None = None) -> Any:
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise AskTimeout(f"the engine did not answer within {timeout}s")
        self._lock.release()
        return self.result()
