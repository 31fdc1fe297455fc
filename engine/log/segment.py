"""Segments of the audit log: rotation to a new segment that opens with a snapshot, and the chain head.

``Segments`` is the part of ``FileLog`` (engine/log/writer.py) that starts new
segments and signs and exports the hash chain's head; it shares the
writer's state and runs under the writer's lock. The functions at the end
are the file-system steps (lock, whole writes, directory fsync, links).
docs/audit-log.md, "Segments and snapshots", describes the layout.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from engine.core.entry import Entry
from engine.core.transitions import entry_fields
from engine.log import chain
from engine.log.fault import AuditLogError, LogFault
from engine.log.recovery import Layout
from engine.log.replay import State, fields_mapping
from events import records as record_names

__all__ = ["SNAPSHOT_PART", "Segments"]

logger = logging.getLogger("engine")

#: Sessions per ``log.snapshot`` record: keeps each line a bounded size however many sessions live.
SNAPSHOT_PART = 1_000


class Segments:
    """Rotation, head signing and head export: the writer's segment side (mixed into ``FileLog``)."""

    # The writer's state these methods share (set by FileLog.__init__).
    layout: Layout
    active: Path
    seq: int
    fault: LogFault
    _active_first: int
    _chain: str
    _fd: int
    _head: bytes | None
    _key: bytes | None
    _last_ts: int
    _live: State
    _os: Any
    _pending: bytes
    _genesis_due: bool
    _rotate_at: int
    _segment_bytes: int
    _signed_head: bytes | None
    _size: int
    _source: Callable[[], list[tuple[str, Entry]]] | None
    _sync_cond: threading.Condition
    _synced: int
    _syncing: bool
    _written: int

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
            live = [(sid, entry_fields(entry)) for sid, entry in self._source()]
        else:
            live = [(sid, fields_mapping(fields)) for sid, fields in self._live.items()]
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
            record = {"seq": seq, "ts": self._last_ts, "event": record_names.LOG_SNAPSHOT, "part": part, "parts": parts,
                      "live": len(live), "sessions": chunk}
            if part == 1 and head is not None:
                # The chain continues into the new segment: the snapshot names the head it follows,
                # signed when a key is set, so the segment can be verified on its own.
                record["chain_head"] = head.hex()
                if self._key is not None:
                    record["signature"] = chain.sign(self._key, self.seq, head)
            lines.append(orjson.dumps(record))
        lines.append(b"")
        data = bytearray(b"\n".join(lines))
        if head is not None:
            head = chain.seal(data, head, 0, self._pending)
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

    def _sign_head(self) -> None:
        """On close: append a signed ``log.signed`` record of the head (with a key, when it moved); log the head."""
        head = self._head
        if head is None or self._genesis_due:
            return
        # Unsealed bytes left by a crash, with nothing appended since: the next store seals them, then signs.
        if self._key is not None and head != self._signed_head and not self._pending:
            record = {"seq": self.seq + 1, "ts": self._last_ts, "event": record_names.LOG_SIGNED, "head_seq": self.seq,
                      "head": head.hex(), "signature": chain.sign(self._key, self.seq, head)}
            data = bytearray(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
            new_head = chain.seal(data, head)
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
    except BaseException:
        os.close(fd)  # any other failure to lock: the descriptor must not outlive the attempt
        raise
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
