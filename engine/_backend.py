"""Where a store's sessions live: the seam between the shard actors and their state.

A ``Backend`` gives the runtime three things: the audit sink for records written outside a
shard batch, the shard tables to start with, and the shard actor class that applies the pure
core (``engine.core.transitions.apply``) to the state it holds and commits it. ``open_backend`` opens the
one ``Config.backend`` names (engine/core/backend_url.py parses it): the memory backend (shard
dicts, the file log and its restart recovery) or the Redis backend (engine/distributed/redis_host.py).
"""

from __future__ import annotations

from typing import Any, Protocol

from engine.core.backend_url import parse_backend

__all__ = ["Backend", "MemoryBackend", "open_backend"]


class Backend(Protocol):
    """What ``SessionStore`` runs on (see the module docstring)."""

    #: Sink for records no shard batch carries (rejected input, shard restarts).
    log: Any
    #: The shard actor class (engine.shell.shard.Shard or a subclass).
    shard_class: type

    def states(self) -> list[Any] | None:
        """The shard tables to start with (None: empty). The runtime closes ``log`` last, which
        releases what the backend holds (the file and its lock, or the Redis connections)."""


class MemoryBackend:
    """Today's engine: shard dicts, the file log and its restart recovery."""

    def __init__(self, config: Any) -> None:
        from engine.log.recovery import restored_states
        from engine.log.writer import open_log
        from engine.shell.shard import Shard

        self.shard_class = Shard
        self.log = open_log(config)
        try:
            self._states = restored_states(self.log, config)
        except BaseException:
            self.log.close()  # its lock and fsync timer must not outlive a store that never started
            raise

    def states(self) -> list[Any] | None:
        return self._states


def open_backend(config: Any) -> Backend:
    """The backend ``config.backend`` names."""
    target = parse_backend(config.backend)
    if target is None:
        return MemoryBackend(config)
    from engine.distributed.redis_host import RedisBackend

    return RedisBackend(config, target)
