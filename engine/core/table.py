"""A shard's session table: plain data, no actors (recovery builds these; shards host them)."""

from __future__ import annotations

import heapq
from typing import Any

from engine.core.entry import Entry
from engine.core.transitions import deadline_checks

__all__ = [
    "ShardState", "shard_index",
]


class ShardState:
    """The sessions of one shard: immutable entries plus the deadline heap.

    Entries are frozen snapshots written only after a transition completed, so
    the table stays consistent when a shard fails and is handed to its restart.
    """

    __slots__ = ("deadlines", "sessions")

    def __init__(self) -> None:
        self.sessions: dict[str, Entry] = {}
        #: (deadline_ms, session_id, generation), one per ``engine.core.transitions.deadline_checks``
        #: of the entry (``Check`` names the generations). Stale entries are skipped when popped.
        self.deadlines: list[tuple[int, str, int]] = []

    def restore(self, session_id: str, entry: Entry, config: Any) -> None:
        """Host ``entry`` with every deadline check it needs (recovery, or a batch put back)."""
        self.sessions[session_id] = entry
        for deadline, generation in deadline_checks(entry, config):
            heapq.heappush(self.deadlines, (deadline, session_id, generation))


def shard_index(session_id: str, shards: int) -> int:
    """The shard hosting a session (str hashes are per process: the mapping lives as long as it)."""
    return hash(session_id) % shards
