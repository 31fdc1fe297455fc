"""The actor shell: shard registry, routing, the supervisor, the clock, lifecycle."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any

import pykka

from engine._time import now_ms
from engine.core.config import Config
from engine.core.table import ShardState
from engine.log.writer import AuditLogError, LogSink
from engine.shell.capacity import Capacity
from engine.shell.clock import Clock
from engine.shell.guard import guarded_observer
from engine.shell.reply import Reply
from engine.shell.shard import DRAIN, Mailbox, Shard
from events import EngineError, SessionEvent
from events import records as record_names

__all__ = [
    "Observer", "Runtime", "StoreClosed",
]

log = logging.getLogger("engine")


class StoreClosed(EngineError):
    """The store was closed; it serves nothing more."""


class Observer:
    """What the engine reports as it works (engine.metrics implements it).

    Every hook is a no-op here, so an observer overrides only what it needs.
    Hooks run on engine threads and must be quick. A hook that raises is isolated
    (engine/shell/guard.py): it is logged (at most once a minute per hook and error type) and
    reported to ``on_hook_error``; the engine's answers and state never depend on it.
    """

    def on_start(self, live_sessions: int) -> None:
        """The store restored ``live_sessions`` from its log and is about to serve."""

    def on_batch(self, shard: int, n_events: int, records: list[dict[str, Any]],
                 apply_seconds: float, queue_depth: int) -> None:
        """A shard applied ``n_events`` (in ``apply_seconds``) and wrote ``records``."""

    def on_records(self, records: list[dict[str, Any]]) -> None:
        """Records written outside a shard batch: rejected input, shard restarts, start-up evictions."""

    def on_log_write(self, seconds: float) -> None:
        """One batch of records was handed to the audit log in ``seconds``."""

    def on_log_sync(self, seconds: float) -> None:
        """One group-commit fsync (``fsync="always"``) took ``seconds``."""

    def on_log_failure(self, op: str, error: BaseException) -> None:
        """The audit log refused a batch: ``op`` is "write" or "fsync" (the OS call failed),
        "removed" (the log file was removed) or "refused" (turned away without a try while the
        log waits to retry; docs/audit-log.md, "Failures")."""

    def on_log_writable(self, writable: bool) -> None:
        """The audit log stopped (False) or resumed (True) taking records."""

    def on_log_head(self, seq: int, head: str) -> None:
        """The audit log's hash chain reached ``head`` (hex) at record ``seq``: reported when the store
        starts on a chained log, at every segment rotation and on close. Export it off the machine: a
        log truncated or rebuilt later no longer holds this head at this seq (docs/audit-log.md)."""

    def on_hook_error(self, hook: str, error: BaseException) -> None:
        """Hook ``hook`` (or "clock", a clock pass) raised ``error``; the engine went on without it."""


class Supervisor(pykka.ThreadingActor):
    """Restarts a failed shard with the same mailbox and the committed session table."""

    use_daemon_thread = True  # as the shards: a forgotten close() never blocks interpreter exit

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self._rt = runtime

    def on_receive(self, message: Any) -> Any:
        kind, index, error = message
        if kind == "shard_failed":
            # A restart that raises must not end the supervisor: the next failure needs it.
            self._rt.guard.run("supervisor", self._rt.restart_shard, index, error)
        return None


class Acknowledger(threading.Thread):
    """Under ``fsync="always"``, waits for the log's fsync on the shards' behalf, then answers.

    A shard that waited for the fsync itself would hold its mailbox for the whole fsync, and the
    records the other shards wrote meanwhile would need a second one. Shards instead hand over
    each batch's replies with the last ``seq`` it wrote and go on; this thread fsyncs up to the
    highest ``seq`` handed over (one fsync for every shard: group commit) and completes the
    replies in the order they were handed over, so no reply, not even a read, is completed
    before every record written before it is on disk.
    """

    def __init__(self, log: LogSink, observer: Observer | None) -> None:
        super().__init__(name="session-engine-ack", daemon=True)
        self._log = log
        self._observer = observer
        self._cond = threading.Condition(threading.Lock())
        self._pending: deque[tuple[int, list[tuple[Reply, Any]]]] = deque()
        self._stopping = False

    def submit(self, seq: int, answers: list[tuple[Reply, Any]]) -> None:
        with self._cond:
            self._pending.append((seq, answers))
            self._cond.notify()

    def run(self) -> None:
        log = self._log
        cond = self._cond
        while True:
            with cond:
                while not self._pending and not self._stopping:
                    cond.wait()
                if not self._pending:
                    return
                items = list(self._pending)
                self._pending.clear()
            error: BaseException | None = None
            started = time.perf_counter()
            try:
                log.sync(max(seq for seq, _ in items))
            except Exception as exc:  # the callers learn that their records may not be durable
                error = exc if isinstance(exc, EngineError) else AuditLogError(
                    f"event_log cannot be synced to disk: {exc}", applied=True)  # written, not known durable
            if self._observer is not None:
                self._observer.on_log_sync(time.perf_counter() - started)
            # A failed fsync fails only the batches it was to cover: those written before the
            # last good fsync, and reads that wrote nothing (seq 0), are answered as usual.
            synced = getattr(log, "synced", 0) if error is not None else 0
            for seq, answers in items:
                if error is None or seq <= synced:
                    for reply, result in answers:
                        reply.set(result)
                else:
                    for reply, _ in answers:
                        reply.fail(error)

    def stop(self) -> None:
        """Answer everything handed over (after its fsync), then end; idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()


class Runtime:
    """Owns every thread the store starts; ``close()`` stops them all."""

    def __init__(self, config: Config, log_sink: LogSink, observer: Observer | None = None,
                 states: list[ShardState] | None = None, shard_class: type[Shard] = Shard) -> None:
        self.config = config
        self.log = log_sink
        # Every hook call goes through the guard: a raising hook never reaches an engine thread.
        self.observer, self.guard = guarded_observer(observer)
        observer = self.observer
        watch = getattr(log_sink, "watch", None)
        if observer is not None and watch is not None:
            watch(observer)
        self.mailboxes = [Mailbox(i) for i in range(config.shards)]
        self.states = states or [ShardState() for _ in range(config.shards)]
        #: session id -> int; the shard is that modulo ``shards`` (the shard class decides: Redis's follows buckets).
        self._hash = shard_class.route_hash
        self.capacity = Capacity(config.max_sessions, config.max_sessions_per_tenant,
                                 config.max_creations_per_tenant_per_minute) if (
            config.max_sessions or config.max_sessions_per_tenant or config.max_creations_per_tenant_per_minute
        ) else None
        if states is not None and self.capacity is not None:
            self._restore_capacity()
        if observer is not None:
            observer.on_start(sum(len(state.sessions) for state in self.states))
        self.restarts = 0
        self._closing = False
        self._lock = threading.Lock()
        self.acknowledger: Acknowledger | None = None
        if config.fsync == "always" and config.event_log is not None:
            self.acknowledger = Acknowledger(log_sink, observer)
            self.acknowledger.start()
        self.supervisor = Supervisor.start(self)
        self.shard_class = shard_class  # engine._backend: the memory backend's Shard or Redis's
        self.shards: list[pykka.ActorRef[Any]] = [
            shard_class.start(self, i, self.states[i]) for i in range(config.shards)
        ]
        self.clock = Clock(self, config.tick_ms) if config.tick_ms > 0 else None
        if self.clock is not None:
            self.clock.start()

    def _restore_capacity(self) -> None:
        """Order restored sessions by last use; evict those a smaller limit leaves out."""
        assert self.capacity is not None
        victims = self.capacity.restore((sid, e.last_used_at) for st in self.states for sid, e in st.sessions.items())
        if not victims:
            return
        now = now_ms()
        for sid, _, _ in victims:
            self.states[self.shard_of(sid)].sessions.pop(sid, None)  # its deadlines go stale
        records = [{"seq": 0, "ts": now, "event": record_names.SESSION_EVICTED, "session_id": sid, "reason": reason}
                   for sid, _, reason in victims]
        self.log.append(records)  # transitions: a log that refuses them fails the store's start
        if self.observer is not None:
            self.observer.on_records(records)

    def write(self, records: list[dict[str, Any]]) -> bool:
        """Log records that no shard batch carries (notes, not transitions), and tell the observer.

        While the log cannot be written the note is dropped (False): the log has already reported
        the fault, and the call that caused the note (an ``InvalidEvent``, a shard restart) must go
        on as it would with a healthy log.
        """
        try:
            self.log.append(records)
        except AuditLogError:
            return False
        if self.observer is not None:
            self.observer.on_records(records)
        return True

    # -- routing -------------------------------------------------------------
    def shard_of(self, session_id: str) -> int:
        return self._hash(session_id) % len(self.mailboxes)

    def send(self, index: int, event: Any, now: int, reply: Reply | None) -> None:
        self.mailboxes[index].queue.append((event, now, reply))
        self._wake(index)

    def _wake(self, index: int) -> None:
        """Send the shard one DRAIN unless one is already on its way (coalesced wake-ups)."""
        mailbox = self.mailboxes[index]
        if not mailbox.scheduled:
            mailbox.scheduled = True
            # A dead shard is being restarted: the supervisor drains the mailbox then.
            with contextlib.suppress(pykka.ActorDeadError):
                self.shards[index].tell(DRAIN)

    def route(self, event: SessionEvent, now: int, reply: Reply | None) -> None:
        # send(), _wake() and shard_of() inlined: this runs once per store call.
        mailbox = self.mailboxes[self._hash(event.session_id) % len(self.mailboxes)]
        mailbox.queue.append((event, now, reply))
        if not mailbox.scheduled:
            self._wake(mailbox.index)

    def route_many(self, events: list[SessionEvent], now: int) -> None:
        """Append a batch of told events, waking each shard at most once."""
        n = len(self.mailboxes)
        appends = [mailbox.queue.append for mailbox in self.mailboxes]
        touched = set()
        for event in events:
            index = self._hash(event.session_id) % n
            appends[index]((event, now, None))
            touched.add(index)
        for index in touched:
            self._wake(index)

    def broadcast(self, event: Any, now: int, replies: list[Reply] | None = None) -> list[Reply]:
        """Send a store-wide event to every shard, each answering its own reply (one per shard)."""
        if replies is None:
            replies = [Reply() for _ in self.mailboxes]
        for index, reply in enumerate(replies):
            self.send(index, event, now, reply)
        return replies

    # -- supervision ----------------------------------------------------------
    def shard_failed(self, index: int, error: BaseException | None) -> None:
        """Called in the failing shard's thread: hand the restart to the supervisor."""
        with contextlib.suppress(pykka.ActorDeadError):
            self.supervisor.tell(("shard_failed", index, error))

    def restart_shard(self, index: int, error: BaseException | None) -> None:
        with self._lock:
            if self._closing:
                return
            self.restarts += 1
            self.shards[index] = self.shard_class.start(self, index, self.states[index])
            record = {"seq": 0, "ts": now_ms(), "event": record_names.SHARD_RESTARTED, "shard": index,
                      "error": type(error).__name__ if error else None,
                      "sessions": len(self.states[index].sessions)}
            # A note: a log that cannot take it must not keep the new incarnation from draining.
            self.write([record])
            mailbox = self.mailboxes[index]
            mailbox.scheduled = True
            mailbox.tick_pending = False
            self.shards[index].tell(DRAIN)
        log.warning("session-engine: shard %d failed (%s) and was restarted", index,
                    type(error).__name__ if error else "unknown")

    # -- lifecycle --------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self.clock is not None:
            self.clock.stop()
        for ref in self.shards:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.stop()
        if self.acknowledger is not None:
            self.acknowledger.stop()
        self.supervisor.stop()
        # A restart the supervisor skipped, or an ask that raced close(): answer, never strand.
        for mailbox in self.mailboxes:
            while mailbox.queue:
                reply = mailbox.queue.popleft()[2]
                if reply is not None:
                    reply.fail(StoreClosed("the session store was closed before this event was applied"))
        self.log.close()
