"""Global least-recently-used bookkeeping for ``max_sessions``.

Shards report, once per batch, which sessions they used and which ended; the
capacity keeper answers with the victims to evict. Victims are evicted in
their own shard's turn by an ``Evict`` event that carries the
``last_used_at`` seen here, so a session used in the meantime is kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable


class Capacity:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def note(self, used: Iterable[tuple[str, int]], ended: Iterable[str]) -> list[tuple[str, int]]:
        """Record a batch; return ``(session_id, last_used_at)`` of each victim."""
        lru = self._lru
        victims: list[tuple[str, int]] = []
        with self._lock:
            for sid in ended:
                lru.pop(sid, None)
            for sid, last_used in used:
                lru[sid] = last_used
                lru.move_to_end(sid)
            while len(lru) > self.max_sessions:
                victims.append(lru.popitem(last=False))
        return victims

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()

    def __len__(self) -> int:
        return len(self._lru)
