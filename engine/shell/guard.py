"""Isolation for code the engine runs but does not own: observer hooks and the clock's passes.

A hook that raises must never stop a shard, delay or drop an answer, or change state (reply
callbacks are isolated the same way, in engine/shell/reply.py). ``Guard`` is the one place that
catches such an exception: it counts it, tells the observer (``on_hook_error``, e.g. a metric)
and logs it to the host's ``logging``, at most once per hook and error type per minute so a
hook failing on every batch cannot flood the host's log. Minutes are read through
``engine._time.now_ms``, so a frozen test controls the rate limit too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from engine._time import now_ms

__all__ = ["HOOKS", "Guard", "guarded_observer"]

logger = logging.getLogger("engine")

#: The Observer hooks a guard wraps (``on_hook_error`` is the guard's own report, never wrapped).
HOOKS = ("on_start", "on_batch", "on_records", "on_log_write", "on_log_sync", "on_log_failure",
         "on_log_writable", "on_log_head")

#: A hook's failures of one error type are logged at most once per this many milliseconds.
REPORT_EVERY_MS = 60_000


class Guard:
    """Runs a callable so that an exception it raises is reported, never propagated."""

    __slots__ = ("_last", "_lock", "_sink", "errors")

    def __init__(self, sink: Callable[[str, BaseException], None] | None = None) -> None:
        #: Failures so far, by hook name (the metric lives with the observer, this count with the store).
        self.errors: dict[str, int] = {}
        self._sink = sink
        self._last: dict[tuple[str, type], int] = {}
        self._lock = threading.Lock()

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, or None once ``report`` has dealt with what it raised."""
        try:
            return fn(*args)
        except Exception as exc:
            self.report(name, exc)
            return None

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., None]:
        """``fn`` guarded once, so a hot call site pays one call and no lookup."""
        report = self.report

        def guarded(*args: Any) -> None:
            try:
                fn(*args)
            except Exception as exc:
                report(name, exc)

        return guarded

    def report(self, name: str, exc: BaseException) -> None:
        """Count, tell the observer, and log (rate-limited) one failure of ``name``."""
        key = (name, type(exc))
        now = now_ms()
        with self._lock:
            self.errors[name] = self.errors.get(name, 0) + 1
            last = self._last.get(key)
            due = last is None or now - last >= REPORT_EVERY_MS
            if due:
                self._last[key] = now
        if due:
            logger.error("session-engine: %s raised %s; the engine goes on without it (reported at most "
                         "once a minute per hook and error type)", name, type(exc).__name__, exc_info=exc)
        if self._sink is not None:
            try:
                self._sink(name, exc)
            except Exception:  # the report itself failing must not recurse or escape
                if due:
                    logger.exception("session-engine: on_hook_error raised too")


class _GuardedObserver:
    """The observer a runtime calls: each hook of the host's observer, guarded."""

    def __init__(self, observer: Any, guard: Guard) -> None:
        self.inner = observer
        for hook in HOOKS:
            fn = getattr(observer, hook, None)
            setattr(self, hook, guard.wrap(hook, fn) if fn is not None else _ignore)


def _ignore(*_args: Any) -> None:
    return None


def guarded_observer(observer: Any | None) -> tuple[Any | None, Guard]:
    """The guarded form of ``observer`` (None stays None) and the guard that reports its failures."""
    sink = getattr(observer, "on_hook_error", None) if observer is not None else None
    guard = Guard(sink)
    return (None if observer is None else _GuardedObserver(observer, guard)), guard
