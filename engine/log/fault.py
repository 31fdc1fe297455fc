"""The audit log's fault state: what a refused write or fsync turns on, and what ends it.

A ``FileLog`` whose OS call fails (ENOSPC, EIO, EROFS, EDQUOT, ...) enters a fault: the call
raises ``AuditLogError``, later appends are refused at once until a retry delay has passed
(``RETRY_FIRST_MS``, doubling after each failed try up to ``RETRY_MAX_MS``, read through
``engine._time.now_ms`` so a frozen test controls it), and the first success ends it. The host's
logger gets one line when a fault begins and one when it ends; a watcher (the store's observer)
hears every failure and each change of state. docs/audit-log.md, "Failures".
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from engine._time import now_ms
from events import EngineError

__all__ = ["RETRY_FIRST_MS", "RETRY_MAX_MS", "AuditLogError", "LogFault"]

logger = logging.getLogger("engine")

#: After the log refuses a write or fsync it is tried again no sooner than this, the wait doubling
#: after each failed try up to ``RETRY_MAX_MS``.
RETRY_FIRST_MS = 50
RETRY_MAX_MS = 5_000


class AuditLogError(EngineError):
    """The audit log cannot be opened or written.

    ``applied`` tells a caller whose change it answers what became of the change: False (a
    refused write: the change was put back, retrying it is safe) or True (its record was
    written but the fsync after it failed: the store serves the change, whose durability is
    unknown; do not retry it). docs/integration.md, "AuditLogError".
    """

    def __init__(self, message: str, *, applied: bool = False) -> None:
        super().__init__(message)
        self.applied = applied


class LogFault:
    """One log's fault: ``error`` is None while the log is writable."""

    __slots__ = ("_backoff", "_lock", "_retry_at", "error", "op", "path", "watcher")

    def __init__(self, path: Any) -> None:
        self.path = path
        self.error: AuditLogError | None = None
        #: "write", "fsync" or "removed": what failed last ("" while writable).
        self.op = ""
        #: Told ``on_log_failure(op, error)`` and ``on_log_writable(bool)`` (the store's observer).
        self.watcher: Any = None
        self._retry_at = 0
        self._backoff = RETRY_FIRST_MS
        self._lock = threading.Lock()

    def failed(self, op: str, exc: OSError) -> AuditLogError:
        """Enter (or stay in) the fault: schedule the next try; log the first failure only."""
        what = "synced to disk" if op == "fsync" else "written"
        error = AuditLogError(f"event_log cannot be {what}: {exc.strerror or exc}", applied=op == "fsync")
        with self._lock:
            first = self.error is None
            self._backoff = RETRY_FIRST_MS if first else min(self._backoff * 2, RETRY_MAX_MS)
            self._retry_at = now_ms() + self._backoff
            self.error = error
            self.op = op
        if first:
            logger.error("session-engine: the audit log %s cannot be %s (%s); writes are refused and retried "
                         "with backoff, reads are served from the last logged state", self.path, what,
                         exc.strerror or exc)
        watcher = self.watcher
        if watcher is not None:
            watcher.on_log_failure(op, error)
            if first:
                watcher.on_log_writable(False)
        return error

    def waiting(self) -> bool:
        """True while the retry delay runs: a call should be refused without touching the disk."""
        return self.error is not None and now_ms() < self._retry_at

    def refuse(self, *, applied: bool) -> AuditLogError:
        """The error for a call turned away while ``waiting()`` (counted as op "refused" when not applied)."""
        error = AuditLogError(f"{self.error} (retrying)", applied=applied)
        watcher = self.watcher
        if watcher is not None and not applied:
            watcher.on_log_failure("refused", error)
        return error

    def recovered(self) -> None:
        """End the fault (a no-op while writable): one line to the logger, the watcher told."""
        with self._lock:
            if self.error is None:
                return
            self.error = None
            self.op = ""
            self._backoff = RETRY_FIRST_MS
        logger.warning("session-engine: the audit log %s is written again; the store takes writes again", self.path)
        if self.watcher is not None:
            self.watcher.on_log_writable(True)
