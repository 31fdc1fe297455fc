"""The audit log: a structlog processor chain rendering JSON lines, and a writer.

Each record is a dict ``{"seq", "ts", "event", "session_id", <changed fields>}``.
The writer owns ``seq`` (one counter, no gaps), durability (group commit,
interval fsync), and growth (segments that start with a snapshot); shards
hand it whole batches so the lock and the write are paid once per batch.
docs/audit-log.md describes the format and the policies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from engine import _chain
from engine._core import entry_fields as core_entry_fields
from engine._entry import Entry
from engine._log_fault import AuditLogError, LogFault
from engine._recovery import Layout, Recovered, recover
from engine._replay import LogCorrupt, State, entry_fields, fold
from events import records as R

logger = logging.getLogger("engine")

EventDict = dict[str, Any]
Processor = Callable[[Any, str, EventDict], Any]

#: Keys that could carry raw request content; dropped if any code path ever adds them.
FORBIDDEN_KEYS = frozenset({"content", "messages", "message", "prompt", "text", "value"})


def drop_forbidden(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Never log raw message content, whatever a caller put in a record."""
    for key in FORBIDDEN_KEYS.intersection(event_dict):
        del event_dict[key]
    return event_dict


#: structlog's JSON renderer over orjson, one line per record: the last step of the default chain.
RENDER_LINE: Processor = structlog.processors.JSONRenderer(serializer=orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)


def default_processors() -> list[Processor]:
    """The chain every record goes through: drop content keys, then render a JSON line (bytes)."""
    return [drop_forbidden, RENDER_LINE]


def render(event_dict: EventDict, processors: Iterable[Processor]) -> bytes:
    out: Any = event_dict
    for processor in processors:
        out = processor(None, "info", out)
    return out if isinstance(out, bytes) else str(out).encode()


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


#: Sessions per ``log.snapshot`` record: keeps each line a bounded size however many sessions live.
SNAPSHOT_PART = 1_000


#: Most milliseconds of batch time between two checks that the log file was not removed.
LINK_CHECK_MS = 1_000


class FileLog:
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
    chain (engine/_chain.py); ``signing_key`` (by default the environment's
    ``SESSION_ENGINE_AUDIT_KEY``) signs the chain head at every rotation and
    on close.

    A write or fsync the OS refuses (ENOSPC, EIO, EROFS, EDQUOT, ...) puts
    the log in a *fault* (engine/_log_fault.py): the failing call raises
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
        if chain not in _chain.CHAIN_MODES:
            raise AuditLogError(f"chain must be one of {', '.join(_chain.CHAIN_MODES)}, got {chain!r}")
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
        self._key = _chain.key_from_env() if signing_key == "env" else signing_key  # type: ignore[assignment]
        self._head: bytes | None = None
        self._pending = b""
        self._genesis_due = False
        if chain != "off":
            if found.head is None:  # a new log, or one written without a chain: start one here
                self._head, self._genesis_due = _chain.genesis(), True
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
        if tail.torn_bytes:
            # A record cut by a crash: drop it so the next record starts on a line of its own.
            os.ftruncate(fd, tail.good_end)
        if tail.newline_missing:
            _write_all(os, fd, b"\n")  # a complete record whose newline was cut off
        if tail.torn_bytes or tail.newline_missing:
            os.fsync(fd)
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
            head, pending = self._head, self._pending
            # The batch is rendered into one growing buffer: each record's bytes are copied in and
            # freed at once. Keeping every record's bytes alive until a join (a block each) made glibc
            # grow the calling shard thread's heap past its trim threshold and hand the pages back
            # after every call (measured in a thread, 512 records per call: 2.1 µs and 0.9 page
            # faults per record joined; 0.26 µs and none in one buffer).
            data = bytearray()
            if self._processors is None:
                # default_processors() unrolled for the hot path: drop_forbidden only runs when a
                # record holds one of its keys, then structlog's renderer writes the line.
                forbidden = FORBIDDEN_KEYS
                render_line = RENDER_LINE
                for record in records:
                    seq += 1
                    record["seq"] = seq
                    if not forbidden.isdisjoint(record):
                        drop_forbidden(None, "info", record)
                    if per_record:
                        start = len(data)
                        data += render_line(None, "info", record)
                        head, pending = _chain.seal(data, head, start, pending), b""  # type: ignore[arg-type]
                    else:
                        data += render_line(None, "info", record)
            else:
                for record in records:
                    seq += 1
                    record["seq"] = seq
                    start = len(data)
                    line = render(record, self._processors)
                    data += line if line.endswith(b"\n") else line + b"\n"
                    if per_record:
                        head, pending = _chain.seal(data, head, start, pending), b""  # type: ignore[arg-type]
            if head is not None and data and not per_record:
                head = _chain.seal(data, head, 0, pending)  # one seal for the whole batch
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

    # -- segments -------------------------------------------------------------------------
    def _rotate(self, *, retire: bool = True) -> None:
        """Start a new segment that opens with a snapshot of every live session (under ``_lock``).

        The new segment is written whole and fsynced, with the old one and the
        directory, before it is renamed into place, under every ``fsync``
        policy: a segment on disk always opens with its whole snapshot (a
        rotation is rare, one per ``segment_bytes``). ``retire`` False starts
        the active segment again in place (a cut snapshot, see ``recover``).
        """
        first = self.seq + 1
        if self._source is not None:
            live = [(sid, core_entry_fields(entry)) for sid, entry in self._source()]
        else:
            live = [(sid, entry_fields(fields)) for sid, fields in self._live.items()]
        parts = max(1, -(-len(live) // SNAPSHOT_PART))
        items = iter(live)
        lines = []
        seq = self.seq
        head = self._head
        for part in range(1, parts + 1):
            chunk = {}
            for sid, fields in items:
                chunk[sid] = fields
                if len(chunk) == SNAPSHOT_PART:
                    break
            seq += 1
            record = {"seq": seq, "ts": self._last_ts, "event": R.LOG_SNAPSHOT, "part": part, "parts": parts,
                      "live": len(live), "sessions": chunk}
            if part == 1 and head is not None:
                # The chain continues into the new segment: the snapshot names the head it follows,
                # signed when a key is set, so the segment can be verified on its own.
                record["chain_head"] = head.hex()
                if self._key is not None:
                    record["signature"] = _chain.sign(self._key, self.seq, head)
            lines.append(orjson.dumps(record))
        lines.append(b"")
        data = bytearray(b"\n".join(lines))
        if head is not None:
            head = _chain.seal(data, head, 0, self._pending)
        staging = self.layout.staging(first)
        cond = self._sync_cond
        with cond:
            while self._syncing:
                cond.wait()
            self._syncing = True  # keeps group-commit leaders off the descriptor being retired
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
            try:
                _write_all(os, fd, data)
                os.fsync(fd)
                os.fsync(self._fd)
                target = self.layout.segment(first)
                if retire and not self.layout.directory and self.active.exists():
                    # Keep the old segment under its archive name, then swap the new one in
                    # atomically: the configured path always names a complete log.
                    archive = self.layout.archive(self._active_first)
                    archive.unlink(missing_ok=True)
                    _link_or_copy(self.active, archive)
                _fsync_dir(target.parent)  # the new segment's name (and the archive link) before the rename
                os.replace(staging, target)
                _fsync_dir(target.parent)
            except BaseException:
                os.close(fd)
                staging.unlink(missing_ok=True)
                raise
        except BaseException as exc:
            with cond:
                self._syncing = False
                cond.notify_all()
            if isinstance(exc, OSError):
                raise AuditLogError(f"event_log segment cannot be started: {exc.strerror or exc}") from None
            raise
        old = self._fd
        with cond:
            self._fd = fd
            self.seq = self._written = self._synced = seq
            self._syncing = False
            cond.notify_all()
        os.close(old)
        self.active = target
        self._active_first = first
        self._size = len(data)
        self._rotate_at = self._next_rotation(len(data))
        if head is not None:
            if self._key is not None:
                self._signed_head = self._head
            self._head, self._pending = head, b""
            self._export_head(seq, head)

    def _next_rotation(self, snapshot_bytes: int) -> int:
        """Segment size that triggers rotation: records after the snapshot reach ``segment_bytes``,
        and at least the snapshot's own size, so a large snapshot is not rewritten after every batch."""
        return snapshot_bytes + max(self._segment_bytes, snapshot_bytes)

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

    def _sign_head(self) -> None:
        """On close: append a signed ``log.signed`` record of the head (with a key, when it moved); log the head."""
        head = self._head
        if head is None or self._genesis_due:
            return
        # Unsealed bytes left by a crash, with nothing appended since: the next store seals them, then signs.
        if self._key is not None and head != self._signed_head and not self._pending:
            record = {"seq": self.seq + 1, "ts": self._last_ts, "event": R.LOG_SIGNED, "head_seq": self.seq,
                      "head": head.hex(), "signature": _chain.sign(self._key, self.seq, head)}
            data = bytearray(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            new_head = _chain.seal(data, head)
            try:
                _write_all(self._os, self._fd, data)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
                logger.exception("session-engine: the audit log head could not be signed on close")
                return
            self._size += len(data)
            self.seq = self._written = record["seq"]
            self._head = self._signed_head = head = new_head
        if not self._pending:
            self._export_head(self.seq, head)

    def _export_head(self, seq: int, head: bytes) -> None:
        """Tell the host's log and the watcher (``on_log_head``, e.g. a metric) the head reached at ``seq``."""
        logger.info("session-engine: audit log head seq=%d sha256=%s", seq, head.hex())
        watcher = self.fault.watcher
        if watcher is not None:
            watcher.on_log_head(seq, head.hex())


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


def _hold_lock(lock_file: Path, event_log: str | Path) -> int:
    """Take the log's exclusive lock: two stores appending to one log would interleave seqs.

    The kernel drops the lock when the process dies, so a crashed store never blocks its restart.
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AuditLogError(f"event_log {event_log} is in use by another store (one store per log)") from None
    return fd


def _release_lock(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _write_all(os_calls: Any, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os_calls.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)
