"""Restart recovery: where a log lives on disk, what it holds, and the shard tables it restores.

A store opened on an existing ``event_log`` reads the newest snapshot and
the records after it, cuts off a torn last line (a process killed
mid-write) so new records never fuse with it, and hands every live session,
with its expiry and cache-pin deadlines, to the shards before serving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine._config import Config
from engine._entry import Entry
from engine._replay import (
    State,
    Tail,
    fold_file,
    fold_files,
    list_segments,
    log_files,
    paused_gc,
    segment_name,
    to_entry,
)
from engine._shard import ShardState, shard_index
from events import records as R


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

    @property
    def head(self) -> bytes | None:
        """The hash chain's head where appending resumes (None: the log holds no chain; start one)."""
        return bytes.fromhex(self.tail.chain) if self.tail.chain else None

    @property
    def head_end(self) -> int:
        """Offset in the active segment from which the bytes are not yet sealed: the next seal covers them."""
        return self.tail.chain_end


def recover(layout: Layout) -> Recovered:
    """Fold what the log holds; raises ``LogCorrupt`` (naming file and line) on a bad middle line."""
    layout.clean_staging()
    state: State = {}
    tail = Tail()
    if layout.directory:
        layout.path.mkdir(parents=True, exist_ok=True)
        segments = list_segments(layout.path)
        if not segments:
            return Recovered(state, 0, layout.segment(1), 1, tail, 0)
        fold_files(log_files(layout.path), state, tail)
        active = segments[-1]
        first = int(active.name.split(".")[0])
    else:
        active = layout.path
        if not active.exists():
            return Recovered(state, 0, active, 1, tail, 0)
        fold_file(active, state, tail)
        first = tail.first["seq"] if tail.first else (tail.last_seq or 0) + 1
    last = tail.last_seq or 0
    return Recovered(state, last, active, first if tail.last_seq is not None else last + 1, tail,
                     _snapshot_bytes(active))


def _snapshot_bytes(path: Path) -> int:
    """Bytes of the leading ``log.snapshot`` lines (rotation keeps segments at least this long)."""
    size = 0
    marker = f'"event":"{R.LOG_SNAPSHOT}"'.encode()
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

