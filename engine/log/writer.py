"""The audit log's writer: numbering, durability and fault handling (the rest beside it).

Each record is a dict ``{"seq", "ts", "event", "session_id", <changed fields>}``.
The writer owns ``seq`` (one counter, no gaps), durability (group commit,
interval fsync), and growth (segments that start with a snapshot); shards
hand it whole batches so the lock and the write are paid once per batch.
docs/audit-log.md describes the format and the policies.

Split along its seams: engine/log/render.py renders a batch and seals it
into the hash chain, engine/log/segment.py starts segments (rotation and
snapshots) and signs and exports the chain head, engine/log/fault.py holds
the fault state; this module is the writer that ties them together, and
what the rest of the engine imports (``from engine.log.writer import ...``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from engine.core.entry import Entry
from engine.log import chain as hash_chain
from engine.log.fault import AuditLogError, LogFault
from engine.log.recovery import Layout, Recovered, recover
from engine.log.render import (
    FORBIDDEN_KEYS,
    RENDER_LINE,
    EventDict,
    Processor,
    default_processors,
    drop_forbidden,
    render,
    render_batch,
)
from engine.log.replay import LogCorrupt, State, fold
from engine.log.segment import SNAPSHOT_PART, Segments, _hold_lock, _release_lock, _write_all

__all__ = ["FORBIDDEN_KEYS", "RENDER_LINE", "SNAPSHOT_PART", "AuditLogError", "EventDict", "FileLog", "LogSink",
           "NullLog", "Processor", "default_processors", "drop_forbidden", "open_log", "render"]

logger = logging.getLogger("engine")


class LogSink(Protocol):
    """What shards need from the log; the core knows nothing of it."""

    seq: int

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


def open_log(config: Any) -> LogSink:
    """The audit log the config asks for (a no-op sink when ``event_log`` is None)."""
    if config.event_log is None:
        return NullLog()
    # Opening the log recovers what it holds: restored_states() hands that to the shards.
    return FileLog(config.event_log, fsync=config.fsync, fsync_interval_ms=config.fsync_interval_ms,
                   segment_bytes=config.segment_bytes, chain=config.audit_chain)


#: Most milliseconds of batch time between two checks that the log file was not removed.
LINK_CHECK_MS = 1_000


class FileLog(Segments):
    """Appends rendered records to a JSON-lines log under a durability policy.

    Opening it recovers what the log already holds (``recovered_state``),
    cuts a torn last line off and continues ``seq``. Durability (``fsync``):

    - ``"always"``: ``sync(seq)`` returns once ``seq`` is on disk. Writers that
      wait at the same time share one fsync (group commit): the first waiter
      becomes the leader and fsyncs everything written so far; the others
      wait on a condition and usually find their record covered.
    - ``"interval"``: a background thread fsyncs at most every
      ``fsync_interval_ms`` when something is unsynced; ``close()`` stops it
      and fsyncs the rest.
    - ``"never"``: the OS decides; ``close()`` does not fsync either.

    When the active segment passes ``segment_bytes`` it starts a new one
    with a ``log.snapshot`` of every live session, read from the shard
    tables a store ``attach``-es (or, for a log used on its own, from the
    fields it folds as it appends).

    ``chain`` ("batch", "record" or "off") seals the records into a hash
    chain (engine/log/chain.py); ``signing_key`` (by default the environment's
    ``SESSION_ENGINE_AUDIT_KEY``) signs the chain head at every rotation and
    on close.

    A write or fsync the OS refuses (ENOSPC, EIO, EROFS, EDQUOT, ...) puts
    the log in a *fault* (engine/log/fault.py): the failing call raises
    ``AuditLogError``, any part of the batch already written is cut off, and
    later appends are refused at once until the retry delay has passed; the
    first append after it tries again, and its success ends the fault.
    ``os_calls`` (default: the ``os`` module) provides ``write``, ``fsync``
    and ``ftruncate``: the seam where tests inject faults.
    """

    def __init__(self, path: str | Path, *, fsync: str = "interval", fsync_interval_ms: int = 1000,
                 segment_bytes: int = 64 * 1024 * 1024, processors: list[Processor] | None = None,
                 chain: str = "batch", signing_key: bytes | str | None = "env",
                 os_calls: Any = None) -> None:
        if fsync not in ("always", "interval", "never"):
            raise AuditLogError(f"fsync must be always, interval or never, got {fsync!r}")
        if chain not in hash_chain.CHAIN_MODES:
            raise AuditLogError(f"chain must be one of {', '.join(hash_chain.CHAIN_MODES)}, got {chain!r}")
        self.layout = Layout.of(path)
        self.path = self.layout.path
        self._lock_fd = -1
        try:
            (self.path if self.layout.directory else self.path.parent).mkdir(parents=True, exist_ok=True)
            self._lock_fd = _hold_lock(self.layout.lock_file(), path)
            found = recover(self.layout)
            self._fd = self._open_active(found)
        except OSError as exc:
            _release_lock(self._lock_fd)
            raise AuditLogError(f"event_log {path} cannot be opened: {exc.strerror or exc}") from None
        except (AuditLogError, LogCorrupt):  # a log it cannot trust: refused, and left for the next attempt
            _release_lock(self._lock_fd)
            raise
        self.seq = found.last_seq
        self.active = found.active
        self._active_first = found.active_first_seq
        self._live: State = found.state
        self._source: Callable[[], list[tuple[str, Entry]]] | None = None
        self._size = os.fstat(self._fd).st_size
        self._segment_bytes = segment_bytes
        self._rotate_at = self._next_rotation(found.snapshot_bytes)
        self._last_ts = 0
        #: Batch time (ms) of the last check that the file is still linked (see ``append``).
        self._linked_at = 0
        # The hash chain: the head after the last sealed batch, the bytes written after it that the next
        # seal covers (a batch a crash left unsealed), and whether the next record carries the genesis.
        self._chain = chain
        self._key = hash_chain.key_from_env() if signing_key == "env" else signing_key  # type: ignore[assignment]
        self._head: bytes | None = None
        self._pending = b""
        self._genesis_due = False
        if chain != "off":
            if found.head is None:  # a new log, or one written without a chain: start one here
                self._head, self._genesis_due = hash_chain.genesis(), True
            else:
                self._head, self._pending = found.head, self._unsealed(found.head_file or self.active, found.head_end)
        self._signed_head = self._head
        self._policy = fsync
        self._processors = processors
        self._lock = threading.Lock()
        # Group commit: guarded by its own lock so writers keep appending while a leader fsyncs.
        self._sync_cond = threading.Condition(threading.Lock())
        self._written = self.seq
        self._synced = self.seq
        self._syncing = False
        self._closed = False
        self._os: Any = os if os_calls is None else os_calls
        self.fault = LogFault(self.path)
        self._flusher: _Flusher | None = None
        if found.rewrite:
            # A crash cut the active segment inside its opening snapshot (recover() read the sessions from
            # the segment before it, and _open_active emptied it): start it again with a whole snapshot.
            logger.warning("session-engine: %s lost its opening snapshot in a crash; restored the sessions from "
                           "the segment before it and wrote the snapshot again", self.active)
            try:
                self._rotate(retire=False)
            except AuditLogError:
                self._close_fds()
                raise
        if fsync == "interval":
            self._flusher = _Flusher(self, fsync_interval_ms / 1000)
            self._flusher.start()

    def _close_fds(self) -> None:
        os.close(self._fd)
        _release_lock(self._lock_fd)

    def _unsealed(self, path: Path, start: int) -> bytes:
        """A segment's bytes from ``start`` on (after the torn tail was cut): the next seal covers them."""
        with open(path, "rb") as f:  # the append descriptor is write-only
            f.seek(start)
            return f.read()

    def _open_active(self, found: Recovered) -> int:
        fd = os.open(found.active, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        tail = found.tail
        try:
            if tail.torn_bytes:
                # A record cut by a crash: drop it so the next record starts on a line of its own.
                os.ftruncate(fd, tail.good_end)
            if tail.newline_missing:
                _write_all(os, fd, b"\n")  # a complete record whose newline was cut off
            if tail.torn_bytes or tail.newline_missing:
                os.fsync(fd)
        except BaseException:
            os.close(fd)  # the store does not open: nothing may keep the file open behind it
            raise
        return fd

    # -- writing ----------------------------------------------------------------------
    def append(self, records: list[EventDict]) -> int:
        """Number, render and write a batch of records with one write; returns the last seq."""
        with self._lock:
            if self._closed:
                raise AuditLogError("event_log is closed")
            if self.fault.error is not None:
                self._retry()
            ts = records[-1].get("ts", 0) if records else 0
            if ts - self._linked_at >= LINK_CHECK_MS:
                # A removed file (or directory) still takes writes through its descriptor, but a
                # restart would never see them: look, at most once a second of batch time.
                self._linked_at = ts
                if os.fstat(self._fd).st_nlink == 0:
                    raise self.fault.failed("removed", OSError(errno.ENOENT, "the log file was removed"))
            seq = self.seq
            if self._genesis_due and records:
                records[0]["genesis"] = self._head.hex()  # type: ignore[union-attr]
            per_record = self._chain == "record" and self._head is not None
            data, seq, head = render_batch(records, seq, self._processors, self._head, self._pending, per_record)
            try:
                _write_all(self._os, self._fd, data)
            except OSError as exc:
                # Leave no partial line behind; the batch was not written (the retry cuts again
                # should this truncate fail too).
                with contextlib.suppress(OSError):
                    self._cut_back()
                raise self.fault.failed("write", exc) from None
            self._size += len(data)
            self.seq = seq
            self._written = seq
            if head is not None and records:
                self._head, self._pending, self._genesis_due = head, b"", False
            if self.fault.error is not None:
                self.fault.recovered()
            if self._source is None:
                live = self._live
                for record in records:
                    fold(live, record)
            self._last_ts = records[-1].get("ts", self._last_ts) if records else self._last_ts
            if self._size >= self._rotate_at:
                try:
                    self._rotate()
                except AuditLogError:
                    # The records are written; keep appending here and try again one segment later.
                    logger.exception("session-engine: audit log rotation failed")
                    self._rotate_at = self._size + self._segment_bytes
            return seq

    def sync(self, seq: int) -> None:
        """Return once every record up to ``seq`` is on disk (policy ``"always"``; otherwise at once)."""
        if self._policy == "always":
            self._sync_to(seq)

    def _sync_to(self, seq: int) -> None:
        cond = self._sync_cond
        with cond:
            while self._synced < seq:
                if self._syncing:
                    cond.wait()
                    continue
                if self._closed_fd():
                    return
                fault = self.fault
                if fault.op == "fsync" and fault.waiting():
                    raise fault.refuse(applied=True)  # these records were written: not known durable
                # Leader: one fsync covers every record written so far, for every waiter.
                self._syncing = True
                target = self._written
                fd = self._fd
                cond.release()
                ok = False
                try:
                    self._os.fsync(fd)
                    ok = True
                except OSError as exc:
                    raise fault.failed("fsync", exc) from None
                finally:
                    cond.acquire()
                    self._syncing = False
                    if ok and target > self._synced:
                        self._synced = target
                    cond.notify_all()
                if fault.op == "fsync":
                    fault.recovered()

    def _closed_fd(self) -> bool:
        return self._fd < 0

    @property
    def synced(self) -> int:
        """The last ``seq`` known to be on disk (under ``"always"``; otherwise as far as fsyncs went)."""
        return self._synced

    # -- faults -----------------------------------------------------------------------------
    @property
    def writable(self) -> bool:
        """False while the log is in a fault (a refused write or fsync not yet retried successfully)."""
        return self.fault.error is None

    def watch(self, observer: Any) -> None:
        """Report faults to ``observer.on_log_failure(op, error)`` and ``on_log_writable(bool)``, and the
        chain's head to ``on_log_head(seq, hex)``: now (a log that holds one) and at every rotation and close."""
        self.fault.watcher = observer
        head = self.head()
        if head is not None:
            observer.on_log_head(*head)

    def _retry(self) -> None:
        """In a fault (under ``_lock``): refuse at once until the retry is due, then repair the tail.

        The repair cuts whatever a failed write left past the last good record and, when an
        fsync failed, fsyncs again; the append that called it then writes its own batch, and
        that write's success ends a write fault.
        """
        fault = self.fault
        if fault.waiting():
            raise fault.refuse(applied=False)
        if fault.op == "removed":
            try:
                # A new segment at the log's path that opens with a snapshot of every live session:
                # what the removed file held (and what went to it since) is in the log again.
                self._rotate()
            except AuditLogError as exc:
                raise fault.failed("removed", OSError(errno.ENOENT, str(exc))) from None
            return
        try:
            self._cut_back()
        except OSError as exc:
            raise fault.failed("write", exc) from None
        if fault.op == "fsync":
            self._sync_to(self._written)  # raises, or ends the fault

    def _cut_back(self) -> None:
        """Truncate the file to the end of the last record written whole (a failed write's bytes)."""
        if os.fstat(self._fd).st_size > self._size:
            self._os.ftruncate(self._fd, self._size)

    def flush_due(self) -> None:
        """fsync what was written since the last fsync (the interval policy's timer)."""
        if self._synced < self._written:
            self._sync_to(self._written)

    # -- recovery and lifecycle ---------------------------------------------------------------
    def recovered_state(self) -> State:
        """The live sessions' fields as the log holds them (read at start-up, before serving)."""
        return self._live

    def attach(self, source: Callable[[], list[tuple[str, Entry]]]) -> None:
        """Take snapshots from the shards' session tables instead of folding every record.

        This keeps the hot path free of bookkeeping: a store attaches its
        shard tables at start-up. The tables are read, one atomic copy each,
        under the log's lock; a shard may already have applied records it has
        not written yet, so a snapshot can be slightly *ahead* of its seq.
        That is harmless: every record carries the new absolute values of the
        fields it changed, so folding those records again after the snapshot
        yields the same state (docs/audit-log.md, "Snapshots").
        """
        with self._lock:
            self._source = source
            self._live = {}

    def close(self) -> None:
        """Stop the fsync timer, fsync what is left (unless ``"never"``) and close; idempotent."""
        if self._flusher is not None:
            self._flusher.stop()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._sign_head()
            cond = self._sync_cond
            with cond:
                while self._syncing:
                    cond.wait()
                fd, self._fd = self._fd, -1
                cond.notify_all()
            try:
                if self._policy != "never":
                    self._os.fsync(fd)
            except OSError as exc:
                raise AuditLogError(f"event_log cannot be synced to disk at close: {exc.strerror or exc}") from None
            finally:
                os.close(fd)
                _release_lock(self._lock_fd)

    def head(self) -> tuple[int, str] | None:
        """(seq, hex) of the chain head after the last sealed record; None when the log is not chained.

        Export it (metrics, the host's log): the newest records' truncation is
        detectable only against a head kept outside the log (docs/audit-log.md).
        """
        with self._lock:
            head = self._head if not self._pending else None
            return None if head is None or self._genesis_due else (self.seq, head.hex())

class _Flusher(threading.Thread):
    """The interval policy's timer: fsyncs the log every period while something is unsynced."""

    def __init__(self, log: FileLog, period: float) -> None:
        super().__init__(name="session-engine-fsync", daemon=True)
        self._log = log
        self._period = period
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self._period):
            # A failed fsync puts the log in its fault (logged and reported there, once); this
            # timer goes on and is one of the ways the log is tried again.
            with contextlib.suppress(AuditLogError, OSError):
                self._log.flush_due()

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


