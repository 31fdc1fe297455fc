"""Restart recovery: where a log lives on disk, what it holds, and the shard tables it restores.

A store opened on an existing ``event_log`` reads the newest snapshot and
the records after it, cuts off a torn last line (a process killed
mid-write) so new records never fuse with it, and hands every live session,
with its expiry and cache-pin deadlines, to the shards before serving.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.core.config import Config
from engine.core.entry import Entry
from engine.core.table import ShardState, shard_index
from engine.log.replay import (
    LogCorrupt,
    State,
    Tail,
    fold_files,
    history_files,
    paused_gc,
    readable_segments,
    segment_name,
    segment_seq,
    to_entry,
)
from events import records as record_names

__all__ = [
    "Layout", "Recovered", "recover", "restored_states",
]

logger = logging.getLogger("engine")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the segments of a log live.

    A file path is a single-file log: the active segment always keeps that
    name, and rotation leaves the old one beside it as ``<name>.<first seq>``.
    A directory (an existing one, or a path ending in ``/``) holds segments
    named ``<first seq>.jsonl``; the newest is the active one.
    """

    path: Path
    directory: bool

    @classmethod
    def of(cls, event_log: str | Path) -> Layout:
        text = str(event_log)
        path = Path(event_log)
        return cls(path, path.is_dir() or text.endswith(("/", os.sep)))

    def archive(self, first_seq: int) -> Path:
        """The name a retired single-file segment keeps (directory segments keep theirs)."""
        return self.path.with_name(f"{self.path.name}.{first_seq:020d}")

    def lock_file(self) -> Path:
        """Locked (flock) by the one store appending to this log; hidden, so replay ignores it."""
        return self.path / ".lock" if self.directory else self.path.with_name(f".{self.path.name}.lock")

    def segment(self, first_seq: int) -> Path:
        return self.path / segment_name(first_seq) if self.directory else self.path

    def staging(self, first_seq: int) -> Path:
        """Where a new segment is written before it is renamed into place (hidden: replay ignores it)."""
        if self.directory:
            return self.path / f".{segment_name(first_seq)}.tmp"
        return self.path.with_name(f".{self.path.name}.{first_seq:020d}.tmp")

    def segments(self) -> list[Path]:
        """Every segment on disk, oldest first (``engine.log.replay.history_files``, the one listing), after
        removing the archive an interrupted rotation left.

        Rotation links the active file to its archive name, then renames the
        new segment over it. A crash between the two leaves the archive
        naming the active segment itself (a hard link, or a copy where links
        are not supported): it is removed, and the next rotation makes it again.
        """
        strays: list[Path] = []
        found = history_files(self.path, strays=strays)
        for archive in strays:
            archive.unlink()
            logger.warning("session-engine: removed %s, left by an interrupted rotation", archive)
        return found

    def clean_staging(self) -> None:
        """Remove segments a crash left half-written: they were never renamed into place."""
        folder, pattern = (self.path, ".*.jsonl.tmp") if self.directory else (
            self.path.parent, f".{self.path.name}.*.tmp")
        if folder.is_dir():
            for leftover in folder.glob(pattern):
                leftover.unlink(missing_ok=True)


@dataclass(slots=True)
class Recovered:
    """The state of a log found on disk, and where appending resumes."""

    state: State
    last_seq: int
    active: Path
    active_first_seq: int
    tail: Tail
    #: Size of the snapshot at the head of the active segment (0 when it has none).
    snapshot_bytes: int
    #: The file ``head_end`` is an offset in (None: ``active``): a predecessor when the active segment is cut.
    head_file: Path | None = None
    #: A crash cut the active segment inside its opening snapshot: the writer empties it and starts it
    #: again with a whole snapshot of ``state`` (``recover``).
    rewrite: bool = False

    @property
    def head(self) -> bytes | None:
        """The hash chain's head where appending resumes (None: the log holds no chain; start one)."""
        return bytes.fromhex(self.tail.chain) if self.tail.chain else None

    @property
    def head_end(self) -> int:
        """Offset in the active segment from which the bytes are not yet sealed: the next seal covers them."""
        return self.tail.chain_end


def recover(layout: Layout) -> Recovered:
    """Fold what the log holds; raises ``LogCorrupt`` (naming file and line) on a bad middle line.

    When a crash cut the newest segment inside its opening snapshot (a
    rotation not yet on disk), the sessions are read from the segments
    before it and ``Recovered.rewrite`` asks the writer to start that
    segment again with a whole snapshot; with no earlier segment on disk
    the log is refused (``LogCorrupt``), never read as empty.
    """
    layout.clean_staging()
    state: State = {}
    tail = Tail()
    if layout.directory:
        layout.path.mkdir(parents=True, exist_ok=True)
    elif not layout.path.exists():
        return Recovered(state, 0, layout.path, 1, tail, 0)
    segments = layout.segments()
    if not segments:
        return Recovered(state, 0, layout.segment(1), 1, tail, 0)
    active = segments[-1]
    files, cut = readable_segments(segments)
    fold_files(files, state, tail)
    if cut is None:
        if layout.directory:
            first = segment_seq(active.name)
        else:
            first = tail.first["seq"] if tail.first else (tail.last_seq or 0) + 1
        last = tail.last_seq or 0
        return Recovered(state, last, active, first if tail.last_seq is not None else last + 1, tail,
                         _snapshot_bytes(active))
    # The cut segment is dropped whole (its snapshot is rewritten); the segment before it must be whole.
    last = tail.last_seq or 0
    if tail.torn_bytes or (layout.directory and segment_seq(active.name) != last + 1):
        raise LogCorrupt(f"{active}: a crash cut the snapshot this segment opens with, and {files[-1]} before it "
                         f"{'ends with a torn record' if tail.torn_bytes else f'ends at seq {last}'}: "
                         f"records are missing")
    size = active.stat().st_size
    cut_tail = Tail(first=None, last_seq=last, good_end=0, torn_bytes=size, chain=tail.chain,
                    chain_end=tail.chain_end)
    return Recovered(state, last, active, last + 1, cut_tail, 0, head_file=files[-1], rewrite=True)


def _snapshot_bytes(path: Path) -> int:
    """Bytes of the leading ``log.snapshot`` lines (rotation keeps segments at least this long)."""
    size = 0
    marker = f'"event":"{record_names.LOG_SNAPSHOT}"'.encode()
    with open(path, "rb") as f:
        for line in f:
            if marker not in line:
                break
            size += len(line)
    return size


def shard_states(state: State, config: Config) -> list[ShardState] | None:
    """Shard tables holding the recovered sessions, with their idle and pin deadlines (None: nothing)."""
    if not state:
        return None
    states = [ShardState() for _ in range(config.shards)]
    with paused_gc():
        for sid, fields in state.items():
            states[shard_index(sid, config.shards)].restore(sid, to_entry(fields), config)
    return states


def restored_states(log: object, config: Config) -> list[ShardState] | None:
    """The shard tables a store starts with: what its log recovered, if it has one.

    The log is attached to the same tables, so its snapshots read the live
    sessions from the shards rather than tracking every record itself.
    """
    recovered = getattr(log, "recovered_state", None)
    if not callable(recovered):
        return None
    states = shard_states(recovered(), config) or [ShardState() for _ in range(config.shards)]

    def live_sessions() -> list[tuple[str, Entry]]:
        # list(dict.items()) of str keys runs without releasing the GIL: an atomic copy per shard.
        return [item for state in states for item in list(state.sessions.items())]

    log.attach(live_sessions)  # type: ignore[attr-defined]
    return states

