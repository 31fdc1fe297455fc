"""A shard's session table: plain data, no actors (recovery builds these; shards host them)."""

from __future__ import annotations

import heapq
from typing import Any

from engine._core import LAPSE_GEN, idle_deadline, pin_deadline, reservation_deadlines
from engine._entry import Entry


class ShardState:
    """The sessions of one shard: immutable entries plus the deadline heap.

    Entries are frozen snapshots written only after a transition completed, so
    the table stays consistent when a shard fails and is handed to its restart.
    """

    __slots__ = ("deadlines", "sessions")

    def __init__(self) -> None:
        self.sessions: dict[str, Entry] = {}
        #: (deadline_ms, session_id, generation): generation >= 0 is the idle
        #: check of the session created at that ms; < 0 the pin check of the pin
        #: set at ``-generation - 1``; ``LAPSE_GEN`` a budget reservation's lapse.
        #: Stale entries are skipped when popped.
        self.deadlines: list[tuple[int, str, int]] = []

    def restore(self, session_id: str, entry: Entry, config: Any) -> None:
        """Host ``entry`` with both of its deadline checks (recovery, or a batch put back)."""
        self.sessions[session_id] = entry
        heapq.heappush(self.deadlines, (idle_deadline(entry, config), session_id, entry.created_at))
        if entry.cache_sticky:
            heapq.heappush(self.deadlines, (pin_deadline(entry), session_id, -entry.cache_sticky_at - 1))
        for deadline in reservation_deadlines(entry):
            heapq.heappush(self.deadlines, (deadline, session_id, LAPSE_GEN))


def shard_index(session_id: str, shards: int) -> int:
    """The shard hosting a session (str hashes are per process: the mapping lives as long as it)."""
    return hash(session_id) % shards
