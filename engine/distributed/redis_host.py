"""The Redis backend: Redis holds every session, shards apply the pure core and compare-and-set.

Keys (``ns`` = ``Config.redis_namespace``, ``b`` = crc32(session id) % ``redis_buckets``), every key of
a bucket under one hash tag so one script touches one Cluster slot:

- ``{ns:b}:s:<session id>``  hash ``v`` (version) and ``e`` (the Entry's fields, orjson), PEXPIRE next deadline + margin
- ``{ns:b}:exp``             sorted set: session id -> its next deadline (engine.core.transitions.next_deadline)
- ``{ns:b}:log``             stream of the bucket's records, each ``r`` = one JSON line with a per-bucket ``seq``
- ``{ns:b}:seq``, ``{ns:b}:ver``  the bucket's record and version counters
- ``{ns:b}:head``            the bucket stream's chain head (SHA-1 hex, docs/audit-log.md)
- ``ns:meta``                hash: ``buckets`` (a replica configured differently refuses to start)

A shard turn applies ``engine.core.transitions.apply`` to the entries it holds (a cache checked by the version),
then commits every session the batch touched with ONE ``EVALSHA`` of redis_commit.lua each, all in one
pipeline. A session whose version moved meanwhile comes back with its current entry in the same reply;
its events are applied again to that entry and committed again (bounded, then ``BackendUnavailable``).
docs/distributed.md has the protocol, failure modes and guarantees.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry

from engine._time import now_ms
from engine.core.backend_url import BackendError, BackendUnavailable, RedisTarget, parse_backend
from engine.core.entry import Entry
from engine.core.scope import tenant_of
from engine.core.transitions import (
    Outcome,
    Rejected,
    apply,
    clear_for_all,
    entry_fields,
    next_deadline,
    stats_sessions,
)
from engine.log import chain
from engine.log.render import UnrenderableRecord
from engine.log.replay import LogCorrupt, State, fold, new_fields, segment_name, to_entry
from engine.log.writer import drop_forbidden
from engine.shell.capacity import TENANT_LIMIT, refusal, refused_error
from engine.shell.shard import Shard, ShardFailed
from events import ClearAll, EngineError, Evict, Expire, GetStats, InvalidEvent, SetSession, Tick
from events import records as record_names

__all__ = [
    "COMMIT_LUA", "EXPIRY_MARGIN_MS", "Keys", "RedisBackend", "bucket_of", "bucket_share", "commit_command",
    "encode_entry", "export_streams", "fold_streams", "merged_records", "open_namespace", "read_streams",
    "render_record", "sessions_in_redis", "sign_heads", "sign_namespace", "stream_entries", "stream_records",
    "unavailable_error",
]

logger = logging.getLogger("engine")

COMMIT_LUA = (Path(__file__).with_name("redis_commit.lua")).read_text()
#: A session key outlives its next deadline by this much, so Redis frees it even when no replica runs.
EXPIRY_MARGIN_MS = 60_000
#: Commit rounds for one batch before its contended sessions' callers get BackendUnavailable.
MAX_ROUNDS = 16
#: Entries a shard keeps between turns (each is checked by its version at commit, so a stale one costs a retry).
CACHE_LIMIT = 100_000
_SCAN = 1_000
#: Answers that mean "send it again shortly": a slot moving between Cluster nodes, a server loading its data.
_TRANSIENT = (TryAgainError, AskError, MovedError, ClusterDownError, BusyLoadingError)

Step = tuple[Callable[[Entry | None, int], Outcome], Any, int, Any]  # (transition, reply or None, now, event)


def bucket_share(limit: int, buckets: int) -> int:
    """A bucket's share of a per-tenant limit: ceil(limit / buckets), at least 1."""
    return max(1, math.ceil(limit / buckets))


def bucket_of(session_id: str, buckets: int) -> int:
    """The bucket of a session: the same in every process (crc32, not Python's per-process hash)."""
    return zlib.crc32(session_id.encode("utf-8", "surrogatepass")) % buckets


class Keys:
    __slots__ = ("buckets", "meta", "ns")

    def __init__(self, namespace: str, buckets: int) -> None:
        self.ns = namespace
        self.buckets = buckets
        self.meta = f"{namespace}:meta"

    def tag(self, bucket: int) -> str:
        return f"{{{self.ns}:{bucket}}}"

    def session(self, bucket: int, session_id: str) -> str:
        return f"{{{self.ns}:{bucket}}}:s:{session_id}"

    def bucket_keys(self, bucket: int) -> tuple[str, str, str, str]:
        """seq, ver, exp, log of one bucket."""
        t = self.tag(bucket)
        return f"{t}:seq", f"{t}:ver", f"{t}:exp", f"{t}:log"

    def head(self, bucket: int) -> str:
        """The bucket stream's chain head (the hash after its newest entry)."""
        return f"{self.tag(bucket)}:head"

    def tenant_keys(self, bucket: int, tenant: str) -> tuple[str, str]:
        """The tenant's sessions in the bucket (ZSET by last use), the bucket's creation token buckets."""
        t = self.tag(bucket)
        return f"{t}:t:{tenant}", f"{t}:rate"


def connect(target: RedisTarget, timeout_s: float) -> Any:
    """A redis-py client for the target (reconnects by itself; every wait bounded by ``timeout_s``)."""
    common: dict[str, Any] = {"username": target.username, "password": target.password,
                              "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if target.cluster:
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in target.hosts], **common)
    common.update(db=target.db, retry=Retry(NoBackoff(), 1), health_check_interval=0)
    if target.scheme == "unix":
        return redis.Redis(unix_socket_path=target.path, **common)
    host, port = target.hosts[0]
    return redis.Redis(host=host, port=port, ssl=target.tls, **dict(target.tls_options), **common)


def unavailable_error(target: RedisTarget, exc: BaseException) -> EngineError:
    """The engine's error for a Redis failure; names the server by its URL without credentials."""
    if isinstance(exc, AuthenticationError) or "WRONGPASS" in str(exc) or "NOAUTH" in str(exc):
        return BackendError(f"Redis at {target.display} refused the credentials (check the URL's user and "
                            f"password, or SESSION_ENGINE_REDIS_PASSWORD)")
    if isinstance(exc, ResponseError) and "SEFOREIGN" in str(exc):
        return BackendError(str(exc).split("SEFOREIGN ", 1)[-1])
    if isinstance(exc, ResponseError) and "WRONGTYPE" in str(exc):
        return BackendError(f"a key in the engine's namespace at {target.display} is not a session-engine key "
                            f"(WRONGTYPE)")
    text = str(exc)
    if target.tls and "[SSL" in text:  # the handshake failed: say why (the text names no credential)
        why = text[text.index("[SSL"):].split(" (_ssl.c")[0].rstrip(".")
        return BackendUnavailable(f"Redis at {target.display} is unavailable: the TLS handshake failed ({why[:200]})")
    return BackendUnavailable(f"Redis at {target.display} is unavailable: {type(exc).__name__}")


def encode_entry(entry: Entry) -> bytes:
    return orjson.dumps(entry_fields(entry))


def decode_entry(raw: bytes | str, where: str) -> Entry:
    try:
        fields = orjson.loads(raw)
        if type(fields) is not dict:
            raise ValueError("not an object")
        return to_entry(new_fields(fields))
    except (ValueError, TypeError, LogCorrupt) as exc:
        raise BackendError(f"{where} does not hold a session-engine entry ({type(exc).__name__})") from None


def render_record(record: dict[str, Any]) -> bytes:
    """A record's JSON without its opening brace: the commit script puts ``{"seq":N,`` before it."""
    return orjson.dumps(drop_forbidden(None, "info", record))[1:]


class RedisBackend:
    """Config(backend="redis://..."): shards of the RedisShard class commit to Redis."""

    def __init__(self, config: Any, target: RedisTarget) -> None:
        self.config = config
        self.target = target
        self.keys = Keys(config.redis_namespace, config.redis_buckets)
        self.maxlen = "" if config.redis_stream_maxlen is None else str(config.redis_stream_maxlen)
        # The per-tenant limits, as each bucket's share (docs/distributed.md, "Per-tenant limits").
        buckets = config.redis_buckets
        self.tenant_cap = "" if config.max_sessions_per_tenant is None else \
            str(bucket_share(config.max_sessions_per_tenant, buckets))
        self.tenant_rate = "" if config.max_creations_per_tenant_per_minute is None else \
            str(bucket_share(config.max_creations_per_tenant_per_minute, buckets))
        self.client = connect(target, max(0.05, min(config.ask_timeout_s / 4, 2.0)))
        try:
            self._check_meta()
            self.sha = self.client.script_load(COMMIT_LUA)
        except RedisError as exc:
            self.client.close()
            raise unavailable_error(target, exc) from None
        except BaseException:
            self.client.close()
            raise
        self._token_prefix = f"{os.getpid()}.{uuid.uuid4().hex[:12]}."
        self._tokens = itertools.count()  # next() on a count is atomic under the GIL
        #: The buckets this process wrote records to: their heads are signed on close, when a key is set.
        self.written: set[int] = set()
        self.signing_key = chain.key_from_env()
        self.log = RedisLog(self)
        buckets = self.keys.buckets
        # A session goes to the shard that reaps its bucket (bucket % shards: see owned()), so its events
        # and its expiry take turns in one mailbox, as in the memory backend.
        self.shard_class = type("RedisShard", (RedisShard,), {
            "backend": self, "route_hash": staticmethod(lambda session_id: bucket_of(session_id, buckets))})

    def _check_meta(self) -> None:
        client, keys = self.client, self.keys
        client.hsetnx(keys.meta, "buckets", keys.buckets)
        stored = client.hget(keys.meta, "buckets")
        if stored is None or not stored.isdigit() or int(stored) != keys.buckets:
            raise InvalidEvent("redis_buckets", f"is {keys.buckets}, but namespace {keys.ns!r} at "
                               f"{self.target.display} was created with buckets={stored.decode() if stored else None}"
                               f"; every replica must use the same count")

    def states(self) -> None:
        return None  # Redis holds the sessions: the shards start empty and read what they need

    def owned(self, shard: int, shards: int) -> range:
        """The buckets whose store-wide work (expiry, stats, clear_all) this shard does."""
        return range(shard, self.keys.buckets, shards)

    def evalsha(self, pipe: Any, sid: str | None, bucket: int, expected: str, state: bytes | str,
                deadline: int | str, pexpire_ms: int, records: list[bytes], token: str | None = None,
                creates: bool = False, now: int = 0, last_used: int = 0) -> None:
        """Queue one commit script (redis_commit.lua); ``creates``: it creates its session by a SetSession."""
        tenant = tenant_of(sid) if sid is not None else ""
        if records:
            self.written.add(bucket)
        pipe.execute_command(*commit_command(
            self.keys, self.sha, bucket, sid, expected, state, deadline, pexpire_ms, self.maxlen,
            token or self.token(), tenant, self.tenant_cap if tenant else "",
            self.tenant_rate if tenant and creates else "", now, last_used, records))

    def token(self) -> str:
        """Unique per commit attempt (this process, this backend, a counter): see redis_commit.lua."""
        return f"{self._token_prefix}{next(self._tokens)}"

    def reload_script(self) -> None:
        """A restarted server forgot its scripts (no FUNCTION LOAD on 6.2): load it again."""
        self.sha = self.client.script_load(COMMIT_LUA)

    def close(self) -> None:
        """Sign the heads of the buckets this process wrote to (with a key: docs/audit-log.md, "Signing the Redis
        streams"), then let the connections go. A failed signature is logged, never raised: the store's
        records are already in Redis, and the next ``session-engine sign`` signs the same heads."""
        try:
            if self.signing_key is not None and self.written:
                sign_heads(self.client, self.keys, self.signing_key, sorted(self.written), maxlen=self.maxlen,
                           sha=self.sha)
        except RedisError as exc:
            logger.warning("session-engine: the Redis stream heads could not be signed on close: %s",
                           unavailable_error(self.target, exc))
        finally:
            self.client.close()


def commit_command(keys: Keys, sha: str, bucket: int, sid: str | None, expected: str, state: bytes | str,
                   deadline: int | str, pexpire_ms: int, maxlen: str, token: str, tenant: str, cap: str, rate: str,
                   now: int, last_used: int, records: list[bytes]) -> tuple[Any, ...]:
    """The EVALSHA of one commit script (redis_commit.lua documents every key and argument)."""
    seq, ver, exp, log = keys.bucket_keys(bucket)
    key = keys.session(bucket, sid) if sid is not None else f"{keys.tag(bucket)}:none"
    own, tenant_rate = keys.tenant_keys(bucket, tenant)
    return ("EVALSHA", sha, 8, key, seq, ver, exp, log, own, tenant_rate, keys.head(bucket), expected, state,
            deadline, pexpire_ms, sid or "", maxlen, token, tenant, cap, rate, now, last_used, *records)


#: How often a signature is tried again when its bucket's head moves on between reading and writing it.
_SIGN_TRIES = 5


def sign_heads(client: Any, keys: Keys, key: bytes, buckets: Iterator[int] | list[int] | range | None = None, *,
               maxlen: str = "", sha: str | None = None) -> list[int]:
    """Append a signed ``log.signed`` record to each bucket stream whose newest entry is not one already: the
    HMAC-SHA256 (engine.log.chain.sign, as the file log's) of the head of the entry just before it. The commit
    script writes it only while that head is still the bucket's (a compare-and-set on the head key), so a
    signature always follows the entry it signs; a bucket written meanwhile is read again. Returns the
    buckets signed. Raises RedisError."""
    sha = sha or client.script_load(COMMIT_LUA)
    token = f"sign.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    signed = []
    for bucket in range(keys.buckets) if buckets is None else buckets:
        seq_key, _, _, stream = keys.bucket_keys(bucket)
        for _ in range(_SIGN_TRIES):
            raw_seq, raw_head = client.mget(seq_key, keys.head(bucket))
            if raw_seq is None or raw_head is None:
                break  # nothing written, or written without the chain: nothing to sign
            newest = client.xrevrange(stream, "+", "-", count=1)
            if newest and b'"event":"log.signed"' in newest[0][1].get(b"r", b""):
                break  # signed since its last record (by this or another replica)
            seq, head = int(raw_seq), raw_head.decode("ascii")
            record = {"ts": now_ms(), "event": record_names.LOG_SIGNED, "head_seq": seq, "head": head,
                      "signature": chain.sign(key, seq, bytes.fromhex(head))}
            reply = client.execute_command(*commit_command(
                keys, sha, bucket, None, "*", head, "", 0, maxlen, token, "", "", "", 0, 0, [render_record(record)]))
            if reply[0] == 1:
                signed.append(bucket)
                break
    return signed


def sign_namespace(url: str, key: bytes, namespace: str = "se") -> list[int]:
    """``session-engine sign URL``: sign every bucket's head (see ``sign_heads``)."""
    client, keys = open_namespace(url, namespace)
    try:
        return sign_heads(client, keys, key)
    except RedisError as exc:
        raise unavailable_error(parse_backend(url), exc) from None  # type: ignore[arg-type]
    finally:
        client.close()


class RedisLog:
    """The sink for records no shard batch carries (rejected input, shard restarts): bucket streams."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    def append(self, records: list[dict[str, Any]]) -> int:
        backend = self.backend
        pipe = backend.client.pipeline(transaction=False)
        for record in records:
            sid = record.get("session_id")
            bucket = bucket_of(sid, backend.keys.buckets) if type(sid) is str else 0
            clean = {k: v for k, v in record.items() if k != "seq"}
            backend.evalsha(pipe, None, bucket, "*", "", 0, 0, [render_record(clean)])
        try:
            pipe.execute()
        except RedisError as exc:
            # These records accompany another answer (an InvalidEvent for bad input, a shard restart):
            # losing one while Redis is away must not replace that answer with a Redis error.
            logger.warning("session-engine: %d record(s) not written to Redis: %s", len(records),
                           unavailable_error(backend.target, exc))
        return 0

    def sync(self, seq: int) -> None:
        return None  # durability is the server's (appendfsync; docs/distributed.md)

    def close(self) -> None:
        self.backend.close()


#: The result of a SetSession whose creation the script refused (its caller gets SessionRefused).
_REFUSED = object()


def work_now(work: dict[str, list[Step]]) -> int:
    """The latest event time of a batch's work (the time its evictions are sent at)."""
    return max(steps[-1][2] for steps in work.values())


class RedisShard(Shard):
    """A shard whose sessions live in Redis (the class is made per backend: ``backend`` is set)."""

    backend: RedisBackend

    def __init__(self, runtime: Any, index: int, state: Any) -> None:
        super().__init__(runtime, index, state)
        self._cache: dict[str, tuple[Entry | None, str]] = {}
        #: The records this turn committed (for the observer: engine.metrics counts from them).
        self._committed: list[dict[str, Any]] = []
        #: ids of the replies this turn answered (so a failing turn answers exactly the others).
        self._answered: set[int] = set()

    # -- the mailbox turn ----------------------------------------------------------
    def _run_batch(self, batch: list[tuple[Any, int, Any]]) -> None:
        started = time.perf_counter()
        self._committed = []
        self._answered = set()
        try:
            self._apply_batch(batch)
        except Exception as exc:
            # A bug outside the core (the core's own failures stay with their session): no caller of
            # the batch may wait for an answer that will not come. The shard is then restarted.
            for event, _, reply in batch:
                if reply is not None and id(reply) not in self._answered:
                    reply.fail(ShardFailed(f"shard {self._index} failed applying {type(event).__name__}: "
                                           f"{type(exc).__name__}; it is being restarted"))
            raise
        observer = self._rt.observer
        if observer is not None:
            observer.on_batch(self._index, len(batch), self._committed, time.perf_counter() - started,
                              len(self._mailbox.queue))

    def _apply_batch(self, batch: list[tuple[Any, int, Any]]) -> None:
        config = self._config
        work: dict[str, list[Step]] = {}
        for event, now, reply in batch:
            sid = event.session_id
            if sid is not None:
                work.setdefault(sid, []).append(
                    (lambda state, at, ev=event: apply(state, ev, at, config), reply, now, event))
                continue
            if work:
                self._commit_all(work)
                work = {}
            self._store_wide(event, now, reply)
        if work:
            self._commit_all(work)

    def _commit_all(self, work: dict[str, list[Step]]) -> list[Any]:
        """Commit every session's steps, one script each in one pipeline per round; answer the callers.

        Returns the results of the committed steps (for clock passes)."""
        backend = self.backend
        config = self._config
        cache = self._cache
        buckets = backend.keys.buckets
        done: list[Any] = []
        pending = work
        #: Sessions whose creation the script refused (their tenant's creation rate in the bucket).
        refused: set[str] = set()
        for round_number in range(MAX_ROUNDS):
            plans = []
            pipe = backend.client.pipeline(transaction=False)
            for sid, steps in pending.items():
                before, version = cache.get(sid, (None, "0"))
                state = before
                records: list[dict[str, Any]] = []
                results = []
                creates = False
                try:
                    for step, _reply, now, event in steps:
                        if state is None and sid in refused and type(event) is SetSession:
                            refused.discard(sid)  # this creation is refused: it writes its record only
                            out = refusal(config.max_creations_per_tenant_per_minute, _REFUSED)
                        else:
                            out = step(state, now)
                            if state is None and out.state is not None and type(event) is SetSession:
                                creates = True
                        state = out.state
                        for name, fields in out.records:
                            records.append({"ts": now, "event": name, "session_id": sid, **fields})
                        results.append(out.result)
                except Exception as exc:  # a bug in the core: this session's callers learn it, nothing is written
                    logger.exception("session-engine: shard %d failed applying an event", self._index)
                    self._fail({sid: steps}, ShardFailed(
                        f"shard {self._index} failed applying an event: {type(exc).__name__}; nothing was written "
                        f"and the shard goes on (Redis holds the state)"))
                    continue
                deadline: int | str = ""
                pexpire_ms = 0
                try:
                    if state is before:
                        encoded: bytes | str = ""
                    elif state is None:
                        encoded = "-"
                    else:
                        encoded = encode_entry(state)
                        # The session's score in the bucket's deadline ZSET: its earliest deadline check (the
                        # reaper's Expire settles whichever is due). Only a move of it needs ZADD and a fresh PEXPIRE.
                        if before is None or next_deadline(before, config) != next_deadline(state, config):
                            deadline = next_deadline(state, config)
                            # The key outlives that deadline (a ledger's ends with its window, past timeout_ms).
                            pexpire_ms = max(config.timeout_ms, deadline - steps[-1][2]) + EXPIRY_MARGIN_MS
                    rendered = [render_record(record) for record in records]
                except Exception as exc:  # orjson cannot write it: this session's callers learn it, nothing is written
                    logger.error("session-engine: shard %d refused a session's events: a record could not be "
                                 "rendered (%s)", self._index, exc)
                    self._fail({sid: steps}, UnrenderableRecord(0, type(exc).__name__))
                    continue
                backend.evalsha(pipe, sid, bucket_of(sid, buckets), version, encoded, deadline, pexpire_ms,
                                rendered, creates=creates and before is None,
                                now=steps[-1][2], last_used=state.last_used_at if state is not None else 0)
                plans.append((sid, steps, state, results, records))
            try:
                answers = pipe.execute(raise_on_error=False)
            except RedisError as exc:
                self._fail(pending, unavailable_error(backend.target, exc))
                return done
            retry: dict[str, list[Step]] = {}
            reload = transient = False
            victims: list[tuple[str, int]] = []
            for (sid, steps, state, results, records), answer in zip(plans, answers, strict=True):
                if isinstance(answer, NoScriptError):
                    reload = True
                    retry[sid] = steps
                elif isinstance(answer, _TRANSIENT):
                    transient = True
                    retry[sid] = steps
                elif isinstance(answer, Exception):
                    cache.pop(sid, None)
                    self._fail({sid: steps}, unavailable_error(backend.target, answer))
                elif int(answer[0]) == 2:
                    refused.add(sid)  # nothing was written: apply the events again with that creation refused
                    retry[sid] = steps
                elif int(answer[0]) == 1:
                    for i in range(3, len(answer) - 1, 2):
                        victims.append((answer[i].decode("utf-8", "surrogatepass"), int(float(answer[i + 1]))))
                    version = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
                    if state is None and version == "0":
                        cache.pop(sid, None)
                    else:
                        if len(cache) >= CACHE_LIMIT:
                            cache.clear()
                        cache[sid] = (state, version)
                    for (_, reply, _, _), result in zip(steps, results, strict=True):
                        if reply is None:
                            continue
                        if type(result) is Rejected:  # refused in the turn (its input.rejected is committed)
                            self._reply(reply, error=result.error)
                        elif result is _REFUSED:
                            self._reply(reply, error=refused_error(
                                config.max_creations_per_tenant_per_minute,
                                f"; each of the {buckets} Redis buckets allows {backend.tenant_rate} a minute"))
                        else:
                            self._reply(reply, result)
                    done.extend(results)
                    self._committed.extend(records)
                else:
                    current = answer[1].decode() if isinstance(answer[1], bytes) else str(answer[1])
                    try:
                        entry = decode_entry(answer[2], backend.keys.session(bucket_of(sid, buckets), sid)) \
                            if current != "0" else None
                    except BackendError as exc:
                        cache.pop(sid, None)
                        self._fail({sid: steps}, exc)
                        continue
                    cache[sid] = (entry, current)
                    retry[sid] = steps
            if victims:
                # Past the tenant's share of a bucket: each victim is evicted in its shard's own turn by the
                # same compare-and-set (the core keeps a session used since the script saw it).
                rt, now = self._rt, work_now(pending)
                for victim, last_used in victims:
                    rt.route(Evict(victim, last_used, TENANT_LIMIT), now, None)
            if reload:
                try:
                    backend.reload_script()
                except RedisError as exc:
                    self._fail(retry, unavailable_error(backend.target, exc))
                    return done
            if not retry:
                return done
            if transient:  # back off a little (at most ~0.1 s a round) while the cluster settles
                time.sleep(min(0.1, 0.002 * 2 ** round_number))
            pending = retry
        self._fail(pending, BackendUnavailable(
            f"{len(pending)} session(s) changed under every one of {MAX_ROUNDS} commit attempts (contention)"))
        return done

    def _reply(self, reply: Any, result: Any = None, error: BaseException | None = None) -> None:
        self._answered.add(id(reply))
        if error is None:
            reply.set(result)
        else:
            reply.fail(error)

    def _fail(self, work: dict[str, list[Step]], error: BaseException) -> None:
        for sid, steps in work.items():
            self._cache.pop(sid, None)
            for _, reply, _, _ in steps:
                if reply is not None:
                    self._reply(reply, error=error)

    # -- store-wide events ------------------------------------------------------------
    def _store_wide(self, event: Any, now: int, reply: Any) -> None:
        backend = self.backend
        try:
            if type(event) is Tick:
                result: Any = self._reap(now)
                self._mailbox.tick_pending = False
            elif type(event) is GetStats:
                result = stats_sessions(self._scan(), now, self._config)
            elif type(event) is ClearAll:
                work = {sid: [(lambda state, _at: clear_for_all(state), None, now, event)] for sid, _ in self._scan()}
                self._commit_all(work)
                result = None
            else:
                raise EngineError(f"shard cannot handle {type(event).__name__}")
        except RedisError as exc:
            self._mailbox.tick_pending = False
            error = unavailable_error(backend.target, exc)
            if reply is None:
                logger.warning("session-engine: %s", error)
                return
            self._reply(reply, error=error)
            return
        except EngineError as exc:
            self._mailbox.tick_pending = False
            if reply is None:
                logger.warning("session-engine: %s", exc)
                return
            self._reply(reply, error=exc)
            return
        if reply is not None:
            self._reply(reply, result)

    def _reap(self, now: int) -> int:
        """Expire what this shard's buckets hold past its deadline: one round trip finds the due sessions
        of every bucket it owns (at most ``expiry_batch`` in all), then the same compare-and-set as any
        event commits their expiry, so one replica logs each expiry however many reap at once."""
        backend, config = self.backend, self._config
        buckets = backend.owned(self._index, config.shards)
        pipe = backend.client.pipeline(transaction=False)
        for bucket in buckets:
            pipe.zrangebyscore(backend.keys.bucket_keys(bucket)[2], "-inf", now, start=0, num=config.expiry_batch)
        work: dict[str, list[Step]] = {}
        for due in pipe.execute():
            for raw in due:
                if len(work) >= config.expiry_batch:
                    break  # the next tick takes the rest
                sid = raw.decode("utf-8", "surrogatepass")
                # A cached entry that went stale comes back as a conflict with the current one.
                work[sid] = [(lambda state, at, s=sid: apply(state, Expire(s), at, config), None, now, None)]
        if not work:
            return 0
        return sum(1 for result in self._commit_all(work) if result is True)

    def _scan(self) -> Iterator[tuple[str, Entry]]:
        """Every session of this shard's buckets, read from Redis (for stats and clear_all)."""
        backend = self.backend
        for bucket in backend.owned(self._index, self._config.shards):
            exp = backend.keys.bucket_keys(bucket)[2]
            start = 0
            while True:
                sids = [raw.decode("utf-8", "surrogatepass") for raw in
                        backend.client.zrange(exp, start, start + _SCAN - 1)]
                if not sids:
                    break
                start += len(sids)
                pipe = backend.client.pipeline(transaction=False)
                for sid in sids:
                    pipe.hmget(backend.keys.session(bucket, sid), "v", "e")
                for sid, (version, raw) in zip(sids, pipe.execute(), strict=True):
                    if raw is not None:
                        entry = decode_entry(raw, backend.keys.session(bucket, sid))
                        self._cache[sid] = (entry, version.decode())
                        yield sid, entry


# -- reading the streams back (replay, audit, export) ------------------------------------------
def read_bucket(client: Any, keys: Keys, bucket: int) -> Iterator[dict[str, Any]]:
    """One bucket stream's records in seq order; checks each record and that seq runs without a gap
    (a trimmed stream may start past 1). Raises LogCorrupt naming the stream and id of a bad record."""
    log = keys.bucket_keys(bucket)[3]
    last: int | None = None
    for stream_id, fields in stream_entries(client, log):
        where = f"stream {log} id {stream_id.decode()}"
        try:
            record = orjson.loads(fields[b"r"])
        except (KeyError, orjson.JSONDecodeError):
            raise LogCorrupt(f"{where}: not a session-engine record (no JSON field r)") from None
        seq = record.get("seq") if type(record) is dict else None
        if type(seq) is not int or type(record.get("event")) is not str or type(record.get("ts")) is not int:
            raise LogCorrupt(f"{where}: a record needs an int seq, an int ts and a str event")
        if last is not None and seq != last + 1:
            raise LogCorrupt(f"{where}: seq {seq} follows {last} (a gap)")
        last = seq
        yield record


def stream_entries(client: Any, stream: str) -> Iterator[tuple[bytes, dict[bytes, bytes]]]:
    """Every entry of a stream, oldest first, as (stream id, fields), read ``_SCAN`` at a time."""
    start = "-"
    while True:
        chunk = client.xrange(stream, start, "+", count=_SCAN)
        yield from chunk
        if len(chunk) < _SCAN:
            return
        start = "(" + chunk[-1][0].decode()


def read_streams(client: Any, keys: Keys) -> Iterator[tuple[int, dict[str, Any]]]:
    """Every record of every bucket stream, bucket by bucket (see read_bucket)."""
    for bucket in range(keys.buckets):
        for record in read_bucket(client, keys, bucket):
            yield bucket, record


def merged_records(client: Any, keys: Keys) -> Iterator[dict[str, Any]]:
    """Every bucket's records merged by time; each bucket keeps its own order (a session lives in one
    bucket, so each session's records keep theirs)."""
    return heapq.merge(*(read_bucket(client, keys, b) for b in range(keys.buckets)), key=_ts)


def _ts(record: dict[str, Any]) -> int:
    return record["ts"]


def open_namespace(url: str, namespace: str = "se") -> tuple[Any, Keys]:
    """A client and the keys of an existing namespace (its bucket count read from Redis)."""
    target = parse_backend(url)
    if target is None:
        raise InvalidEvent("backend", "needs a Redis URL, not memory")
    client = connect(target, 5.0)
    try:
        stored = client.hget(f"{namespace}:meta", "buckets")
    except RedisError as exc:
        client.close()
        raise unavailable_error(target, exc) from None
    except BaseException:
        client.close()
        raise
    if stored is None or not stored.isdigit():
        client.close()
        raise BackendError(f"{target.display} holds no session-engine namespace {namespace!r}")
    return client, Keys(namespace, int(stored))


def stream_records(url: str, *, history: bool = True, namespace: str = "se") -> Iterator[dict[str, Any]]:
    """The records of a Redis backend's streams (every one: streams hold no snapshots), for audit and replay."""
    client, keys = open_namespace(url, namespace)
    try:
        yield from merged_records(client, keys)
    except RedisError as exc:
        raise unavailable_error(parse_backend(url), exc) from None  # type: ignore[arg-type]
    finally:
        client.close()


def export_streams(url: str, directory: Path, *, namespace: str = "se", key: bytes | str | None = "env"
                   ) -> tuple[int, Path]:
    """Write the streams as a file-log segment (``<first seq>.jsonl``, seq renumbered 1, 2, 3 ...), chained
    again with the file log's SHA-256 chain (a fresh genesis, one seal per 1,000 records): ``audit --verify
    DIR`` accepts it. The Redis SHA-1 chain is not carried, nor the ``log.signed`` records that sign its heads:
    check them first (the CLI's export does). With a signing key (by default ``SESSION_ENGINE_AUDIT_KEY``), the
    segment ends with a ``log.signed`` record of its own head, as a file log's close writes one."""
    from engine.log import chain

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / segment_name(1)
    staging = directory / f".{path.name}.tmp"
    count = last_ts = 0
    head = chain.genesis()
    batch = bytearray()
    try:
        with open(staging, "wb") as f:
            for record in stream_records(url, namespace=namespace):
                if record["event"] == record_names.LOG_SIGNED:
                    continue  # a signature of a Redis SHA-1 head: checked by verify_redis, meaningless here
                count += 1
                record["seq"] = count
                last_ts = record["ts"]
                if count == 1:
                    record["genesis"] = head.hex()
                batch += orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
                if count % 1000 == 0:
                    head = chain.seal(batch, head)
                    f.write(batch)
                    batch.clear()
            if batch:
                head = chain.seal(batch, head)
                f.write(batch)
            signing = chain.key_from_env() if key == "env" else key
            if signing and count:
                count += 1
                signed = {"seq": count, "ts": last_ts, "event": record_names.LOG_SIGNED, "head_seq": count - 1,
                          "head": head.hex(), "signature": chain.sign(signing, count - 1, head)}  # type: ignore[arg-type]
                batch = bytearray(orjson.dumps(signed, option=orjson.OPT_APPEND_NEWLINE))
                chain.seal(batch, head)
                f.write(batch)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)  # a failed export leaves no half-written file behind
        raise
    return count, path


def fold_streams(client: Any, keys: Keys) -> State:
    """The live sessions' fields as the streams hold them (what replay of a file log gives)."""
    state: State = {}
    for _, record in read_streams(client, keys):
        fold(state, record)
    return state


def sessions_in_redis(client: Any, keys: Keys) -> dict[str, Entry]:
    """Every session entry the namespace holds (for checks and the CLI)."""
    out: dict[str, Entry] = {}
    for bucket in range(keys.buckets):
        for raw in client.zrange(keys.bucket_keys(bucket)[2], 0, -1):
            sid = raw.decode("utf-8", "surrogatepass")
            value = client.hget(keys.session(bucket, sid), "e")
            if value is not None:
                out[sid] = decode_entry(value, keys.session(bucket, sid))
    return out
