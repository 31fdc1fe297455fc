"""The audit log: a structlog processor chain rendering JSON lines, and a writer.

Each record is a dict ``{"seq", "ts", "event", "session_id", <changed fields>}``.
The writer owns ``seq`` (one counter, no gaps) and durability; shards hand it
whole batches so the lock, the write and the flush are paid once per batch.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from events import EngineError

EventDict = dict[str, Any]
Processor = Callable[[Any, str, EventDict], Any]

#: Keys that could carry raw request content; dropped if any code path ever adds them.
FORBIDDEN_KEYS = frozenset({"content", "messages", "message", "prompt", "text", "value"})


def drop_forbidden(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Never log raw message content, whatever a caller put in a record."""
    for key in FORBIDDEN_KEYS.intersection(event_dict):
        del event_dict[key]
    return event_dict


def default_processors() -> list[Processor]:
    """The chain every record goes through, ending in orjson rendering (bytes)."""
    return [drop_forbidden, structlog.processors.JSONRenderer(serializer=orjson.dumps)]


def render(event_dict: EventDict, processors: Iterable[Processor]) -> bytes:
    out: Any = event_dict
    for processor in processors:
        out = processor(None, "info", out)
    return out if isinstance(out, bytes) else str(out).encode()


class LogSink(Protocol):
    """What shards need from the log; the core knows nothing of it."""

    def append(self, records: list[EventDict]) -> int: ...
    def sync(self, seq: int) -> None: ...
    def close(self) -> None: ...


class NullLog:
    """No audit log configured: records are dropped, seq still counts."""

    def __init__(self) -> None:
        self.seq = 0
        self._lock = threading.Lock()

    def append(self, records: list[EventDict]) -> int:
        with self._lock:
            self.seq += len(records)
            return self.seq

    def sync(self, seq: int) -> None:
        return None

    def close(self) -> None:
        return None


class AuditLogError(EngineError):
    """The audit log cannot be opened or written."""


class FileLog:
    """Appends rendered records to one JSON-lines file under a durability policy."""

    def __init__(self, path: str | Path, *, fsync: str = "interval", fsync_interval_ms: int = 1000,
                 start_seq: int = 0, processors: list[Processor] | None = None) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - owned until close()
        except OSError as exc:
            raise AuditLogError(f"event_log cannot be opened: {exc.strerror}") from None
        self.seq = start_seq
        self._fsync = fsync
        self._interval = fsync_interval_ms / 1000
        self._last_sync = time.monotonic()
        self._processors = processors or default_processors()
        self._lock = threading.Lock()
        self._closed = False

    def append(self, records: list[EventDict]) -> int:
        with self._lock:
            if self._closed:
                raise AuditLogError("event_log is closed")
            seq = self.seq
            lines = []
            for record in records:
                seq += 1
                record["seq"] = seq
                lines.append(render(record, self._processors))
            lines.append(b"")
            self._file.write(b"\n".join(lines))
            self._file.flush()
            self.seq = seq
            if self._fsync == "always" or (
                self._fsync == "interval" and time.monotonic() - self._last_sync >= self._interval
            ):
                os.fsync(self._file.fileno())
                self._last_sync = time.monotonic()
            return seq

    def sync(self, seq: int) -> None:
        return None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.flush()
            if self._fsync != "never":
                os.fsync(self._file.fileno())
            self._file.close()
