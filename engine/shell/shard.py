"""Shard actors: each hosts many logical session actors.

A session always maps to the same shard; the shard's mailbox is FIFO and the
shard applies one message at a time, so every session gets actor semantics
(one turn at a time, per-sender order) while the number of OS threads stays
fixed whatever the number of sessions ("virtual actors", as in Orleans).

Producers append ``(event, now, reply)`` to the shard's ``Mailbox`` deque
and send the pykka actor one ``DRAIN`` message only when it is idle; the
shard then applies everything queued in batches, writes each batch's
records with one log call, and answers the batch's callers.
"""

from __future__ import annotations

import heapq
import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pykka

from engine.core.entry import Entry
from engine.core.table import ShardState
from engine.core.transitions import (
    Rejected,
    apply,
    check_due_again,
    clear_for_all,
    needs_check,
    new_deadline_checks,
    settle,
    stats_sessions,
)
from engine.log.fault import AuditLogError
from engine.log.render import UnrenderableRecord
from events import ClearAll, EngineError, Evict, GetCost, GetSession, GetStats, IsCacheSticky, Tick
from events import records as record_names

__all__ = [
    "DRAIN", "Mailbox", "Shard", "ShardFailed", "ShardHost",
]


class ShardHost(Protocol):
    """What a shard uses of the runtime that hosts it (engine.shell.runtime.Runtime is one): the shard
    knows this much of its host and nothing else."""

    config: Any
    #: The audit sink (``append`` a batch's records, ``sync`` up to a seq).
    log: Any
    observer: Any
    #: The shards' mailboxes, by index.
    mailboxes: Sequence[Mailbox]
    #: The capacity keeper (engine/shell/capacity.py), or None without limits.
    capacity: Any
    #: Completes replies after the group-commit fsync (``fsync="always"``), or None.
    acknowledger: Any

    def send(self, index: int, event: Any, now: int, reply: Any) -> None: ...

    def route(self, event: Any, now: int, reply: Any) -> None: ...

    def shard_failed(self, index: int, error: BaseException | None) -> None: ...

DRAIN = "drain"
logger = logging.getLogger("engine")


class ShardFailed(EngineError):
    """The shard hosting the session failed while applying this event; it was restarted."""


class Mailbox:
    """A shard's queue; outlives shard incarnations so a restart loses no message."""

    __slots__ = ("index", "queue", "scheduled", "tick_pending")

    def __init__(self, index: int) -> None:
        self.index = index
        self.queue: deque[tuple[Any, int, Any]] = deque()
        self.scheduled = False
        self.tick_pending = False


#: Sessions a clock pass handles before it checks for waiting callers (it yields to them after
#: that many, so a pass always progresses and an ask waits for at most this much expiry work).
_MIN_PASS = 32


class _TickPass:
    """Continuation of a clock pass that had more due sessions than one batch."""

    __slots__ = ("count",)
    session_id = None  # store-wide, like Tick

    def __init__(self, count: int) -> None:
        self.count = count


_PASSES = (Tick, _TickPass)

#: Events that only read: while the log refuses records they are answered from the logged state.
_READS = frozenset({GetSession, GetCost, IsCacheSticky})


class _Refused:
    """Stands in for a reply whose change the log refused: completing it fails it with the log's
    error, so a refused batch's answers keep their place in the acknowledger's order."""

    __slots__ = ("error", "reply")

    def __init__(self, reply: Any, error: BaseException) -> None:
        self.reply = reply
        self.error = error

    def set(self, _value: Any) -> None:
        self.reply.fail(self.error)

    def fail(self, _error: BaseException) -> None:
        self.reply.fail(self.error)  # the change was refused whatever else failed since


class Shard(pykka.ThreadingActor):
    # A store its owner forgot to close must not keep the host process from exiting.
    use_daemon_thread = True
    #: The runtime routes a session to shard ``route_hash(session id) % shards`` (engine.core.table.shard_index).
    route_hash = staticmethod(hash)

    def __init__(self, runtime: ShardHost, index: int, state: ShardState) -> None:
        super().__init__()
        self._rt = runtime
        self._config = runtime.config
        self._index = index
        self._mailbox: Mailbox = runtime.mailboxes[index]
        self._state = state
        self._apply: Callable[..., Any] = apply
        #: Events still to apply one per batch: a batch held a record the log could not render, so it is
        #: run again event by event, and only the event that made that record is refused.
        self._isolate = 0

    @staticmethod
    def _create_actor_inbox() -> Any:
        # pykka's hook for the inbox. queue.SimpleQueue (put, get, empty, like queue.Queue) is
        # written in C: waking a shard costs a fraction of queue.Queue's Python-level Condition.
        return queue.SimpleQueue()

    # -- lifecycle ---------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        if message == DRAIN:
            self._drain()
        return None

    def on_failure(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._rt.shard_failed(self._index, exc)

    # -- the mailbox turn ----------------------------------------------------
    def _drain(self) -> None:
        mb = self._mailbox
        mb.scheduled = False
        queue = mb.queue
        pop = queue.popleft
        limit = self._config.drain_batch
        while queue:
            if self._isolate:
                self._isolate -= 1
                self._run_batch([pop()])
                continue
            # Only this thread pops, so the queue holds at least this many items.
            self._run_batch([pop() for _ in range(min(limit, len(queue)))])

    def _run_batch(self, batch: list[tuple[Any, int, Any]]) -> None:
        config = self._config
        sessions = self._state.sessions
        deadlines = self._state.deadlines
        records: list[dict[str, Any]] = []
        answers: list[tuple[Any, Any]] = []
        capacity = self._rt.capacity
        track = capacity is not None
        gate = capacity if capacity is not None and capacity.creations_per_minute is not None else None
        used: list[tuple[str, int]] = []
        ended: list[str] = []
        # (session id, entry before) of every change, to put back if the log cannot take the records.
        undo: list[tuple[str, Entry | None]] = []
        keep = undo.append
        started = time.perf_counter()
        apply = self._apply
        push = heapq.heappush
        add = records.append
        more: tuple[_TickPass, int, Any] | None = None
        for position, item in enumerate(batch):
            event, now, reply = item
            sid = event.session_id
            try:
                if sid is not None:
                    before = sessions.get(sid)
                    out = apply(before, event, now, config)
                    if before is None and gate is not None and out.state is not None and not gate.admit(event, now):
                        out, reply = gate.refuse(reply), None  # the tenant's creation rate (docs/identity.md)
                    after = out.state
                    if after is None:
                        if before is not None:
                            del sessions[sid]
                            keep((sid, before))
                            if track:
                                ended.append(sid)
                    else:
                        if after is not before:
                            sessions[sid] = after
                            keep((sid, before))
                            for deadline, generation in new_deadline_checks(before, after, config):
                                push(deadlines, (deadline, sid, generation))
                        if track:
                            used.append((sid, after.last_used_at))
                    for name, fields in out.records:
                        add({"seq": 0, "ts": now, "event": name, "session_id": sid, **fields})
                    if reply is not None:
                        result = out.result
                        if type(result) is Rejected:  # refused in the turn: the caller gets its InvalidEvent
                            answers.append((_Refused(reply, result.error), None))
                        else:
                            answers.append((reply, result))
                else:
                    if type(event) in _PASSES and len(batch) > 1:
                        # A clock pass takes a turn of its own: the callers batched before it are
                        # answered first, those after it wait in the mailbox where the pass sees
                        # them and yields after _MIN_PASS sessions.
                        cut = position or 1
                        self._mailbox.queue.extendleft(reversed(batch[cut:]))
                        del batch[cut:]
                        if position:
                            break
                    done, result = self._store_event(event, now, records, ended if track else None, undo)
                    if not done:
                        # More is due: the rest is queued, once this part is logged, behind what
                        # other sessions sent meanwhile (a pass always has a batch of its own).
                        more = (_TickPass(result), now, reply)
                    elif reply is not None:
                        answers.append((reply, result))
            except Exception as exc:
                rest = batch[position + 1:]
                self._mailbox.queue.extendleft(reversed(rest))
                self._commit(records, answers, used, ended, undo, started, batch[:position], now)
                if reply is not None:
                    reply.fail(ShardFailed(
                        f"shard {self._index} failed applying {type(event).__name__}: "
                        f"{type(exc).__name__}; it is being restarted"))
                raise
        refused = self._commit(records, answers, used, ended, undo, started, batch, now)
        if more is not None:
            if refused is None:
                self._mailbox.queue.append(more)
            elif more[2] is not None:
                more[2].fail(refused)  # tick(): the pass stopped with the log; a later one goes on

    def _commit(self, records: list[dict[str, Any]], answers: list[tuple[Any, Any]],
                used: list[tuple[str, int]], ended: list[str], undo: list[tuple[str, Entry | None]],
                started: float, batch: list[tuple[Any, int, Any]], now: int) -> AuditLogError | None:
        """Write the batch's records, report it, evict past capacity, answer the callers.

        ``now`` is the time of the batch's last event: evictions it causes happen then. If the
        log refuses the records (disk full, ...), ``_refused`` puts the batch back and answers
        it, and the log's error is returned.
        """
        rt = self._rt
        observer = rt.observer
        written = time.perf_counter()
        applied = written - started  # the core's work only
        try:
            seq = rt.log.append(records) if records else 0
        except AuditLogError as exc:
            self._refused(exc, answers, undo, batch)
            return exc
        except UnrenderableRecord as exc:
            self._unrenderable(exc, answers, undo, batch)
            return exc
        except Exception as exc:  # a bug in the log: put back, answer, and let the supervisor restart
            self._put_back(undo)
            for reply, _ in answers:
                reply.fail(exc)
            raise
        acknowledger = rt.acknowledger
        if acknowledger is None and records:
            rt.log.sync(seq)
        if observer is not None:
            if records:
                observer.on_log_write(time.perf_counter() - written)
            observer.on_batch(self._index, len(batch), records, applied, len(self._mailbox.queue))
        if rt.capacity is not None and (used or ended):
            for sid, last_used, reason in rt.capacity.note(used, ended):
                rt.route(Evict(sid, last_used, reason), now, None)
        if acknowledger is not None and (records or answers):
            # fsync="always": the acknowledger answers once the records are on disk; this shard
            # goes on with its mailbox meanwhile, so one fsync covers what every shard wrote.
            acknowledger.submit(seq, answers)
            return None
        for reply, result in answers:
            reply.set(result)
        return None

    def _refused(self, error: AuditLogError, answers: list[tuple[Any, Any]],
                 undo: list[tuple[str, Entry | None]], batch: list[tuple[Any, int, Any]]) -> None:
        """The log refused the batch's records: serve nothing it did not log, and keep serving.

        The batch's changes are put back, so the table is again what the log holds. Its reads
        are answered again from that table (a read that settled an idle session, which needs a
        record, answers as the settle would but leaves the session to a later pass); every
        other caller gets the log's error. A clock pass ends here (``_run_batch`` does not queue
        its continuation) and the clock may send the next one. The shard goes on with its
        mailbox: the log retries with backoff (engine/log/writer.py); the first write it takes ends
        the fault.
        """
        self._put_back(undo)
        config = self._config
        sessions = self._state.sessions
        if batch and type(batch[0][0]) in _PASSES:
            self._mailbox.tick_pending = False
        waiting = {id(reply.reply if type(reply) is _Refused else reply) for reply, _ in answers}
        redone: list[tuple[Any, Any]] = []
        for event, now, reply in batch:
            if reply is None or id(reply) not in waiting:
                continue
            kind = type(event)
            if kind in _READS:
                redone.append((reply, apply(sessions.get(event.session_id), event, now, config).result))
            elif kind is GetStats:
                redone.append((reply, self._store_event(event, now, [], None, [])[1]))
            else:
                redone.append((_Refused(reply, error), None))
        acknowledger = self._rt.acknowledger
        if acknowledger is not None:
            # Handed over like a batch that wrote nothing (seq 0): answered in order after what
            # was handed over before, and never failed by another batch's fsync.
            acknowledger.submit(0, redone)
            return
        for reply, result in redone:
            reply.set(result)

    def _unrenderable(self, error: UnrenderableRecord, answers: list[tuple[Any, Any]],
                      undo: list[tuple[str, Entry | None]], batch: list[tuple[Any, int, Any]]) -> None:
        """A record of the batch could not be rendered (nothing was written): refuse only its event.

        The batch's changes are put back. A batch of one event is that event: its caller gets the error
        and its session stays as it was. A larger batch goes back to the front of the mailbox and is run
        again one event per batch (the core is pure, so each event gives the same outcome again), so
        every other event of it is applied and logged; its callers are answered then."""
        self._put_back(undo)
        if batch and type(batch[0][0]) in _PASSES:
            self._mailbox.tick_pending = False
        if len(batch) == 1:
            event = batch[0][0]
            logger.error("session-engine: shard %d refused a %s: its record could not be rendered (%s)",
                         self._index, type(event).__name__, error.error)
            refusal = UnrenderableRecord(error.index, error.error if isinstance(error.error, str)
                                         else type(error.error).__name__)
            for reply, _ in answers:
                reply.fail(refusal)
            return
        waiting = {id(reply.reply if type(reply) is _Refused else reply) for reply, _ in answers}
        # A reply already answered in the turn (a creation refused by its tenant's rate) is not answered twice.
        again = [(event, now, reply if reply is not None and id(reply) in waiting else None)
                 for event, now, reply in batch]
        self._mailbox.queue.extendleft(reversed(again))
        self._isolate += len(again)

    def _put_back(self, undo: list[tuple[str, Entry | None]]) -> None:
        """Restore the entries a batch changed, newest change first, with their deadlines."""
        state = self._state
        for sid, before in reversed(undo):
            if before is None:
                state.sessions.pop(sid, None)
            else:
                state.restore(sid, before, self._config)

    # -- store-wide events -----------------------------------------------------
    def _store_event(self, event: Any, now: int, records: list[dict[str, Any]],
                     ended: list[str] | None, undo: list[tuple[str, Entry | None]]) -> tuple[bool, Any]:
        """Apply a store-wide event; ``(False, count)`` means a clock pass continues later."""
        sessions = self._state.sessions
        if type(event) is GetStats:
            return True, stats_sessions(sessions.items(), now, self._config)
        if type(event) is ClearAll:
            for sid, entry in sessions.items():
                for name, fields in clear_for_all(entry).records:
                    records.append({"seq": 0, "ts": now, "event": name, "session_id": sid, **fields})
                if ended is not None:
                    ended.append(sid)
            undo.extend(sessions.items())
            sessions.clear()
            self._state.deadlines.clear()
            return True, None
        if type(event) is Tick:
            return self._tick_pass(now, 0, records, ended, undo)
        if type(event) is _TickPass:
            return self._tick_pass(now, event.count, records, ended, undo)
        raise EngineError(f"shard cannot handle {type(event).__name__}")

    def _tick_pass(self, now: int, count: int, records: list[dict[str, Any]],
                   ended: list[str] | None, undo: list[tuple[str, Entry | None]]) -> tuple[bool, int]:
        """Pop what is due from the deadline heap: at most ``expiry_batch`` entries per turn, and
        only ``_MIN_PASS`` when other messages are waiting, so expiring many sessions never holds
        up the callers of live ones for long."""
        config = self._config
        sessions = self._state.sessions
        deadlines = self._state.deadlines
        budget = config.expiry_batch
        queue = self._mailbox.queue
        pop = heapq.heappop
        popped = 0
        while deadlines and deadlines[0][0] <= now and popped < budget:
            if queue and popped >= _MIN_PASS:
                # Callers are waiting: end the turn here; the pass continues behind them.
                break
            popped += 1
            if not popped % _MIN_PASS:
                # Let other threads have the GIL: a thread waiting for it otherwise waits a whole
                # switch interval (5 ms) per hand-off while four shards expire at once (measured:
                # without this, an ask stalls 40-50 ms during a mass expiry; with it, < 10 ms).
                time.sleep(0)
            _, sid, gen = pop(deadlines)
            state = sessions.get(sid)
            if state is None:
                continue
            if not needs_check(state, gen, config):
                continue  # stale: the session was re-created, re-pinned, or holds no reservation now
            new, settled = settle(state, now, config)
            for name, fields in settled:
                records.append({"seq": 0, "ts": now, "event": name, "session_id": sid, **fields})
                if name == record_names.SESSION_EXPIRED:
                    count += 1
            if new is None:
                del sessions[sid]
                undo.append((sid, state))
                if ended is not None:
                    ended.append(sid)
                continue
            if new is not state:
                sessions[sid] = new
                undo.append((sid, state))
            again = check_due_again(new, gen, config)
            if again is not None:
                heapq.heappush(deadlines, (again, sid, gen))
        if deadlines and deadlines[0][0] <= now:
            return False, count
        self._mailbox.tick_pending = False
        return True, count
