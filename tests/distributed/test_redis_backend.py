"""The Redis backend against real redis-server processes (tests/support/redis_servers.py): no mocks."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from freezegun import freeze_time

from engine import BackendUnavailable, Config, InvalidEvent, LogCorrupt, SessionStore, Tier
from engine.core.backend_url import BackendError, parse_backend
from engine.distributed.redis_host import Keys, bucket_of, fold_streams, read_streams, sessions_in_redis
from engine.log.replay import to_entry
from events import records as record_names
from tests.support.redis_servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def redis_config(url: str, **overrides: Any) -> Config:
    settings: dict[str, Any] = {"enabled": True, "tick_ms": 0, "backend": url, "redis_buckets": 8,
                                "ask_timeout_s": 5.0}
    settings.update(overrides)
    return Config(**settings)


SCHEMA = jsonschema.Draft202012Validator(orjson.loads((ROOT / "docs" / "log-schema.json").read_bytes()))


def records_of(client: Any, keys: Keys) -> list[dict[str, Any]]:
    """Every stream record (read_streams checks each bucket's seq runs without a gap), each valid per
    docs/log-schema.json: the streams carry the file log's records."""
    records = [record for _, record in read_streams(client, keys)]
    for record in records:
        SCHEMA.validate(record)
    return records


def check_agreement(client: Any, keys: Keys, *stores: SessionStore) -> dict[str, Any]:
    """replay(streams) == the entries in Redis == what every store reads."""
    replayed = {sid: to_entry(fields) for sid, fields in fold_streams(client, keys).items()}
    held = sessions_in_redis(client, keys)
    assert replayed == held
    for store in stores:
        for sid, entry in held.items():
            assert store.get_session(sid) == entry
    return held


# -- the fixture itself -------------------------------------------------------------------------
def test_server_keeps_acknowledged_writes_across_kill9(redis_server: RedisServer) -> None:
    with redis_server.client() as c:
        c.set("k", "v")
    redis_server.kill9()
    redis_server.start()
    with redis_server.client() as c:
        assert c.get("k") == b"v"


def test_a_commit_sent_twice_lands_once(redis_server: RedisServer) -> None:
    """A client may resend a script (lost reply, cluster redirect): its token makes it land once."""
    from engine.core.backend_url import parse_backend as parse
    from engine.core.entry import Entry
    from engine.distributed.redis_host import RedisBackend, encode_entry, render_record

    config = redis_config(redis_server.url)
    backend = RedisBackend(config, parse(redis_server.url))
    try:
        bucket = bucket_of("d", 8)
        entry = encode_entry(Entry("m", None, 1, 1, 1))
        record = render_record({"ts": 1, "event": record_names.SESSION_TOUCHED, "session_id": "d", "last_used_at": 1,
                                "request_count": 1})
        answers = []
        for token in ("same", "same", "other"):
            pipe = backend.client.pipeline(transaction=False)
            backend.evalsha(pipe, "d", bucket, "0", entry, 10, 1000, [record], token=token)
            answers.append(pipe.execute()[0])
        assert [a[0] for a in answers] == [1, 1, 0]  # landed; landed already; a real conflict
        assert answers[1][2] == -1 and answers[2][1] == answers[0][1]
        with redis_server.client() as client:
            assert len(records_of(client, Keys("se", 8))) == 1
    finally:
        backend.close()


# -- one replica ----------------------------------------------------------------------------------
def test_store_on_redis_serves_the_spec_and_logs_to_streams(redis_server: RedisServer) -> None:
    config = redis_config(redis_server.url, auto_escalate=True, strike_limit=1)
    with SessionStore(config) as store:
        store.set_session("a", "gpt-4o", "MEDIUM")
        store.add_session_cost("a", 1_500)
        store.add_session_cost("b", 7)  # an absent session gets a cost-only entry
        assert store.record_request_hash("a", "h") == 0
        assert store.record_request_hash("a", "h") == 1
        assert store.get_session("a").tier is Tier.COMPLEX  # escalated by the strike
        assert store.escalate_session("a") is Tier.REASONING
        store.set_cache_sticky("a", "anthropic")
        assert store.is_cache_sticky("a")
        assert store.get_session_cost_usd("a") == pytest.approx(0.0015)
        store.clear_session("b")
        assert store.get_session("b") is None
        assert store.get_stats().count == 1
        with redis_server.client() as client:
            keys = Keys("se", 8)
            held = check_agreement(client, keys, store)
            assert set(held) == {"a"}
            records = records_of(client, keys)
            names = Counter(r["event"] for r in records)
            assert names[record_names.SESSION_ESCALATED] == 2 and names[record_names.SESSION_CLEARED] == 1
            # The key carries its idle deadline plus a margin, so Redis frees it with no replica running.
            ttl = client.pttl(keys.session(bucket_of("a", 8), "a"))
            assert config.timeout_ms < ttl <= config.timeout_ms + 60_000
        store.clear_all()
        assert store.get_session("a") is None and store.get_stats().count == 0


def test_a_capped_session_is_never_served_past_its_cap_across_replicas(redis_server: RedisServer) -> None:
    """The routing turn (decide, reserve) and the settlement commit by the same compare-and-set."""
    from engine import BudgetExceeded
    from engine.policy import Options, Policy, Request

    cap, estimate, n = 0.02, 0.005, 8  # room for exactly 4 calls
    stores = [SessionStore(redis_config(redis_server.url)) for _ in range(2)]
    try:
        policies = [Policy(store, {Tier.MEDIUM: "openai/gpt-4o"},
                           Options(max_cost_usd=cap, budget_mode="strict", deadline_s=10.0)) for store in stores]
        start = threading.Barrier(n)
        served: list[Any] = []
        refused: list[int] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            request = Request(model="openai/gpt-4o", tier=Tier.MEDIUM, session_id="capped",
                              messages=[{"role": "user", "content": f"r{i}"}], estimate_usd=estimate)
            start.wait()
            try:
                decision = policies[i % 2].route(request)
            except BudgetExceeded:
                with lock:
                    refused.append(i)
                return
            with lock:
                served.append((i, decision))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(served) == int(cap / estimate) and len(refused) == n - len(served)
        for i, decision in served:  # each settles on the other replica than the one that routed it
            policies[(i + 1) % 2].record_response("capped", cost_usd=0.004, decision=decision)
        for store in stores:
            store.tick()  # record_response tells: a store-wide ask returns once each store applied them
        for store in stores:
            entry = store.get_session("capped")
            assert entry.session_cost_micros == 16_000 <= 20_000 and entry.reservations == ()
        with redis_server.client() as client:
            check_agreement(client, Keys("se", 8), *stores)
    finally:
        for store in stores:
            store.close()


def test_replicas_in_one_process_keep_one_truth(redis_server: RedisServer) -> None:
    """Two stores (two replicas) hammer the same sessions from 4 threads: exact sums, one pin each."""
    stores = [SessionStore(redis_config(redis_server.url)) for _ in range(2)]
    try:
        sessions = [f"t{i}" for i in range(10)]

        def work(n: int) -> None:
            store = stores[n % 2]
            for i in range(200):
                sid = sessions[(i + n) % len(sessions)]
                store.add_session_cost(sid, 3)
                if i % 10 == 0:
                    store.set_session(sid, f"model-{n}")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with redis_server.client() as client:
            held = check_agreement(client, Keys("se", 8), *stores)
        assert sum(e.session_cost_micros for e in held.values()) == 4 * 200 * 3
    finally:
        for store in stores:
            store.close()


def test_expiry_is_logged_once_however_many_replicas_reap(redis_server: RedisServer) -> None:
    # Frozen at the real time: Redis's own clock runs the keys' PEXPIRE.
    with freeze_time(datetime.now(UTC)) as frozen:
        stores = [SessionStore(redis_config(redis_server.url, timeout_ms=1_000, shards=2)) for _ in range(3)]
        try:
            for i in range(30):
                stores[i % 3].set_session(f"x{i}", "m")
            stores[0].set_cache_sticky("x0", "openai")
            frozen.tick(2.0)
            stores[1].set_session("late", "m")
            counts = [store.tick() for store in stores]
            assert sum(counts) == 30
            with redis_server.client() as client:
                keys = Keys("se", 8)
                expired = Counter(r["session_id"] for r in records_of(client, keys)
                                  if r["event"] == record_names.SESSION_EXPIRED)
                assert expired == {f"x{i}": 1 for i in range(30)}
                assert set(check_agreement(client, keys, *stores)) == {"late"}
                assert all(client.zcard(keys.bucket_keys(b)[2]) == (1 if b == bucket_of("late", 8) else 0)
                           for b in range(8))
        finally:
            for store in stores:
                store.close()


def test_stream_retention_keeps_about_maxlen_records_and_stays_readable(redis_server: RedisServer) -> None:
    keys = Keys("se", 1)
    with SessionStore(redis_config(redis_server.url, redis_buckets=1, redis_stream_maxlen=50)) as store:
        for i in range(600):
            store.add_session_cost(f"r{i % 3}", 1)
        assert store.get_session("r0").session_cost_micros == 200
    with redis_server.client() as client:
        length = client.xlen(keys.bucket_keys(0)[3])
        assert 50 <= length < 300  # MAXLEN ~ trims whole nodes: about, not exactly, 50
        records = records_of(client, keys)  # starts past seq 1 and runs on without a gap
        assert records[0]["seq"] > 1 and records[-1]["seq"] == int(client.get(keys.bucket_keys(0)[0]))


# -- replica processes ------------------------------------------------------------------------------
def _replica(url: str, replica: int, ops: int, sessions: int, namespace: str = "se") -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "tests.support.redis_replica", url, str(replica), str(ops),
                             str(sessions), namespace], cwd=ROOT, stdout=subprocess.PIPE)


#: What a replica prints for an acknowledged operation (tests/support/redis_replica.py).
SERVED = ("set", "cost", "hash", "get")


def _finish(proc: subprocess.Popen[bytes]) -> bytes:
    """The rest of a replica's output (through its buffered pipe: communicate() would skip what a
    readline() already buffered), once it has exited."""
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.wait(timeout=60)
    return out


def _acknowledged(output: bytes) -> list[dict[str, Any]]:
    """The complete lines a replica printed (a replica killed mid-write may leave a last partial one)."""
    complete = output[:output.rfind(b"\n") + 1]
    return [orjson.loads(line) for line in complete.splitlines() if line.strip()]


def _all_acknowledged(procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    """What replicas that ran to the end acknowledged, in process order (each exited 0 and said done)."""
    lines: list[dict[str, Any]] = []
    for proc in procs:
        out = _finish(proc)
        assert proc.returncode == 0
        got = _acknowledged(out)
        assert got[-1] == {"done": True}
        lines += got[:-1]
    return lines


def _check_load(url_client: Any, keys: Keys, lines: list[dict[str, Any]], sessions: int) -> None:
    """What every replica acknowledged is in Redis, exactly; seq runs without a gap in every bucket."""
    held = sessions_in_redis(url_client, keys)
    costs: Counter[str] = Counter()
    begun: Counter[str] = Counter()  # every cost a replica started: acknowledged, refused, or cut by a kill
    for line in lines:
        if line.get("op") == "cost":
            costs[line["sid"]] += line["micros"]
        elif line.get("op") == "begin-cost":
            begun[line["sid"]] += line["micros"]
    for sid, micros in costs.items():
        assert micros <= held[sid].session_cost_micros <= begun[sid], sid
    records = records_of(url_client, keys)  # read_streams checks each bucket's seq continuity
    escalations = Counter(r["session_id"] for r in records if r["event"] == record_names.SESSION_ESCALATED)
    assert all(n == 1 for n in escalations.values())
    for sid, entry in held.items():
        assert (escalations[sid] == 1) == entry.escalated, sid
    pins = Counter(r["session_id"] for r in records if r["event"] == record_names.SESSION_CREATED)
    assert all(n == 1 for n in pins.values())  # one creation (one pin) per session: none lost or split
    assert len(held) <= sessions


def test_four_replica_processes_agree_exactly(redis_server: RedisServer) -> None:
    url = redis_server.url  # the replicas use the default 64 buckets
    procs = [_replica(url, n, 250, 50) for n in range(4)]
    lines = _all_acknowledged(procs)
    assert not [line for line in lines if line["op"] == "unavailable"]
    keys = Keys("se", 64)
    with redis_server.client() as client:
        _check_load(client, keys, lines, 50)
        with SessionStore(Config(enabled=True, tick_ms=0, backend=url)) as reader:
            check_agreement(client, keys, reader)


def test_kill9_of_a_replica_loses_nothing_it_acknowledged(redis_server: RedisServer) -> None:
    url = redis_server.url
    victim = _replica(url, 0, 100_000, 50)
    assert victim.stdout is not None
    seen = [victim.stdout.readline() for _ in range(300)]  # 300 acknowledged operations, then kill -9
    victim.kill()
    out = _finish(victim)
    lines = _acknowledged(b"".join(seen) + out)
    assert lines and "done" not in lines[-1]
    with redis_server.client() as client:
        _check_load(client, Keys("se", 64), lines, 50)


def test_kill9_of_redis_then_restart_loses_nothing_and_never_hangs(redis_server: RedisServer) -> None:
    url = redis_server.url
    store = SessionStore(redis_config(url, ask_timeout_s=2.0))
    try:
        total = 0
        for i in range(50):
            store.add_session_cost(f"k{i % 5}", 10)
            total += 10
        redis_server.kill9()
        with pytest.raises(BackendUnavailable) as caught:
            store.add_session_cost("k0", 10)
        assert "127.0.0.1" in str(caught.value)
        with pytest.raises(BackendUnavailable):
            store.get_session("k1")
        with pytest.raises(InvalidEvent) as caught:  # bad input still names its field while Redis is away
            store.add_session_cost("k1", -5)
        assert caught.value.field == "micros"
        redis_server.start()  # same dir and port: the append-only file brings back every acknowledged write
        store.add_session_cost("k0", 10)  # reconnects by itself, and reloads its script
        total += 10
        costs = sum(store.get_session(f"k{i}").session_cost_micros for i in range(5))
        assert costs == total
        with redis_server.client() as client:
            check_agreement(client, Keys("se", 8), store)
    finally:
        store.close()


def test_kill9_of_redis_under_multi_process_load(redis_server: RedisServer) -> None:
    """Replica processes keep running through a redis-server kill -9 and restart: they get
    BackendUnavailable (never a hang) during the outage, succeed after it, and lose nothing acknowledged."""
    url = redis_server.url
    procs = [_replica(url, n, 1_000_000, 50) for n in range(2)]  # they run until this test kills them
    lines: list[dict[str, Any]] = []

    def read_until(proc: subprocess.Popen[bytes], done: Any) -> None:
        assert proc.stdout is not None
        for _ in range(100_000):
            line = orjson.loads(proc.stdout.readline())
            lines.append(line)
            if done(line):
                return
        raise AssertionError("the replica never reached the expected state")

    try:
        for proc in procs:
            read_until(proc, lambda line: line.get("op") == "hash")  # serving
        redis_server.kill9()
        for proc in procs:
            read_until(proc, lambda line: line.get("op") == "unavailable")  # the outage reaches every caller
        redis_server.start()
        for proc in procs:
            read_until(proc, lambda line: line.get("op") in SERVED)  # served again
    finally:
        for proc in procs:
            proc.kill()
            lines += _acknowledged(_finish(proc))
    with redis_server.client() as client:
        _check_load(client, Keys("se", 64), lines, 50)


def test_policy_answers_unavailable_while_redis_is_down_and_routes_after(redis_server: RedisServer) -> None:
    from engine.policy import Kind, Options, Policy, Request

    with SessionStore(redis_config(redis_server.url, ask_timeout_s=2.0)) as store:
        # A deadline loose enough for a loaded test machine (the default 5 ms is the production one).
        policy = Policy(store, {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o"},
                        Options(deadline_s=1.0))
        request = Request(model="openai/gpt-4o", tier=Tier.MEDIUM, session_id="p1")
        assert policy.route(request).kind is not Kind.UNAVAILABLE
        redis_server.kill9()
        down = policy.route(request)
        assert down.kind is Kind.UNAVAILABLE and down.model == "openai/gpt-4o"  # the router's own choice
        redis_server.start()
        assert policy.route(request).kind is not Kind.UNAVAILABLE
        assert store.get_session("p1").model == "openai/gpt-4o"


def test_a_core_failure_fails_only_its_session_and_writes_nothing(redis_server: RedisServer,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.distributed.redis_host
    from engine import ShardFailed
    from events import Touch

    real_apply = engine.distributed.redis_host.apply

    def faulty(state: Any, event: Any, now: int, config: Any) -> Any:
        if event.session_id == "boom" and type(event) is Touch:
            raise RuntimeError("injected fault")
        return real_apply(state, event, now, config)

    monkeypatch.setattr(engine.distributed.redis_host, "apply", faulty)
    with SessionStore(redis_config(redis_server.url)) as store:
        store.set_session("boom", "m")
        store.set_session("fine", "m")
        store.tell_many([Touch("fine"), Touch("boom"), Touch("fine")])  # one batch with the fault in the middle
        with pytest.raises(ShardFailed):
            store.touch_session("boom")
        assert store.get_session("fine").request_count == 3
        assert store.get_session("boom").request_count == 1  # nothing of the failed turns was written
        with redis_server.client() as client:
            check_agreement(client, Keys("se", 8), store)


def test_a_failure_outside_the_core_answers_every_caller_and_the_shard_restarts(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.distributed.redis_host
    from engine import ShardFailed

    real_evalsha = engine.distributed.redis_host.RedisBackend.evalsha

    failed: list[str] = []

    def faulty(self: Any, pipe: Any, sid: str | None, *args: Any, **kwargs: Any) -> None:
        if sid == "boom" and not failed:  # once: a bug outside the core (the restarted shard then reads it)
            failed.append(sid)
            raise RuntimeError("injected fault")
        return real_evalsha(self, pipe, sid, *args, **kwargs)

    monkeypatch.setattr(engine.distributed.redis_host.RedisBackend, "evalsha", faulty)
    with SessionStore(redis_config(redis_server.url, shards=1)) as store:
        with pytest.raises(ShardFailed):  # answered, not left to time out
            store.set_session("boom", "m")
        store.set_session("fine", "m")  # the restarted shard serves
        assert store.get_session("fine").model == "m" and store.get_session("boom") is None
        with redis_server.client() as client:
            records = records_of(client, Keys("se", 8))
        restarted = record_names.SHARD_RESTARTED
        assert [r["event"] for r in records if r["event"] == restarted] == [restarted]


def test_a_record_that_cannot_be_rendered_fails_only_its_session_and_the_shard_goes_on(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson cannot write it (forced here past validation): that session's callers get UnrenderableRecord,
    nothing of it is committed, and the shard serves everyone else without a restart."""
    import engine.distributed.redis_host
    from engine.log.render import UnrenderableRecord

    real_render = engine.distributed.redis_host.render_record

    def faulty(record: dict[str, Any]) -> bytes:
        if record.get("session_id") == "boom":
            return real_render({**record, "request_count": 2**64})  # orjson: Integer exceeds 64-bit range
        return real_render(record)

    monkeypatch.setattr(engine.distributed.redis_host, "render_record", faulty)
    with SessionStore(redis_config(redis_server.url, shards=1)) as store:
        with pytest.raises(UnrenderableRecord):
            store.set_session("boom", "m")
        store.set_session("fine", "m")
        assert store.get_session("fine").model == "m" and store.get_session("boom") is None
        assert store._rt.restarts == 0  # type: ignore[union-attr]
        with redis_server.client() as client:
            records = records_of(client, Keys("se", 8))
        assert {r["session_id"] for r in records} == {"fine"}


# -- bad input at the boundary ----------------------------------------------------------------------
@pytest.mark.parametrize("url", ["redis://", "redis://host:notaport/0", "http://x:1", "redis://a:1,b:2/0",
                                 "redis://:hunter2@127.0.0.1:99999/0", "redis://127.0.0.1:6379/db"])
def test_malformed_url_names_the_field_and_never_the_password(url: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        Config(enabled=True, backend=url)
    assert caught.value.field == "backend"
    assert "hunter2" not in str(caught.value)


def test_url_forms_parse() -> None:
    assert parse_backend("memory") is None
    t = parse_backend("rediss://user:p%40ss@cache.example:6380/2")
    assert (t.tls, t.hosts, t.db, t.username, t.password) == (True, (("cache.example", 6380),), 2, "user", "p@ss")
    assert "p@ss" not in repr(t) and "p@ss" not in t.display
    assert parse_backend("unix:///run/redis.sock").path == "/run/redis.sock"
    assert parse_backend("redis+cluster://a:1,b:2").hosts == (("a", 1), ("b", 2))


def test_wrong_password_is_a_clear_error_without_the_secret(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "auth", password="right-secret").start()
    try:
        url = f"redis://:wrong-secret@127.0.0.1:{server.port}/0"
        with pytest.raises(BackendError) as caught:
            SessionStore(redis_config(url))
        assert "credentials" in str(caught.value)
        assert "secret" not in str(caught.value)
        with SessionStore(redis_config(server.url)) as store:  # the right one works
            store.set_session("a", "m")
            assert store.get_session("a").model == "m"
    finally:
        server.stop()


def test_unix_socket_and_a_password_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    server = RedisServer(tmp_path / "sock", password="env-secret", unix_socket=True).start()
    try:
        with pytest.raises(BackendError):  # no password anywhere: refused, and said so
            SessionStore(redis_config(server.socket_url))
        monkeypatch.setenv("SESSION_ENGINE_REDIS_PASSWORD", "env-secret")
        with SessionStore(redis_config(server.socket_url)) as store:
            store.set_session("u", "m")
            assert store.get_session("u").model == "m"
            server.kill9()
            with pytest.raises(BackendUnavailable) as caught:
                store.touch_session("u")
            assert server.socket in str(caught.value)
        assert "env-secret" not in caplog.text
    finally:
        server.stop()


def test_unreachable_server_is_backend_unavailable() -> None:
    from tests.support.redis_servers import free_port

    with pytest.raises(BackendUnavailable):
        SessionStore(redis_config(f"redis://127.0.0.1:{free_port()}/0"))


def test_a_replica_with_another_bucket_count_refuses_to_start(redis_server: RedisServer) -> None:
    with SessionStore(redis_config(redis_server.url, redis_buckets=8)):
        pass
    with pytest.raises(InvalidEvent) as caught:
        SessionStore(redis_config(redis_server.url, redis_buckets=16))
    assert caught.value.field == "redis_buckets" and "buckets=8" in str(caught.value)


def test_a_foreign_key_in_the_namespace_is_named_and_left_alone(redis_server: RedisServer) -> None:
    keys = Keys("se", 8)
    foreign = keys.session(bucket_of("f", 8), "f")
    with redis_server.client() as client:
        client.hset(foreign, "owner", "someone else")
        client.set(keys.session(bucket_of("g", 8), "g"), "a string")
        with SessionStore(redis_config(redis_server.url)) as store:
            with pytest.raises(BackendError) as caught:
                store.set_session("f", "m")
            assert foreign in str(caught.value)
            with pytest.raises(BackendError, match="WRONGTYPE"):
                store.add_session_cost("g", 5)
            store.set_session("ok", "m")  # every other session keeps being served
        assert client.hgetall(foreign) == {b"owner": b"someone else"}
        assert client.get(keys.session(bucket_of("g", 8), "g")) == b"a string"
        assert [r["session_id"] for r in records_of(client, keys)] == ["ok"]


def test_a_stream_record_failing_the_schema_is_named(redis_server: RedisServer) -> None:
    keys = Keys("se", 8)
    with SessionStore(redis_config(redis_server.url)) as store:
        store.set_session("a", "m")
    log = keys.bucket_keys(bucket_of("a", 8))[3]
    with redis_server.client() as client:
        bad_id = client.xadd(log, {"r": b'{"seq":"two","event":"session.touched"}'}).decode()
        with pytest.raises(LogCorrupt) as caught:
            records_of(client, keys)
        assert log in str(caught.value) and bad_id in str(caught.value)


# -- Redis Cluster (3 nodes) ------------------------------------------------------------------------
def test_cluster_serves_one_truth_across_replicas(redis_cluster: Any) -> None:
    url = redis_cluster.url
    config = redis_config(url, redis_namespace="c1", redis_buckets=16)
    stores = [SessionStore(config) for _ in range(2)]
    try:
        for i in range(60):
            stores[i % 2].add_session_cost(f"c{i % 12}", 5)
            if i % 6 == 0:
                stores[(i + 1) % 2].set_session(f"c{i % 12}", "m", "SIMPLE")
        client = redis_cluster.client()
        try:
            keys = Keys("c1", 16)
            held = check_agreement(client, keys, *stores)
            assert sum(e.session_cost_micros for e in held.values()) == 300
            # the buckets really are spread over the nodes
            nodes = {client.get_node_from_key(keys.tag(b)).port for b in range(16)}
            assert len(nodes) == 3
        finally:
            client.close()
    finally:
        for store in stores:
            store.close()


# -- the command line reads the streams -------------------------------------------------------------
def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from engine.cli import app

    result = CliRunner().invoke(app, list(args))
    result.returncode = result.exit_code
    return result


def test_cli_replay_audit_and_export_read_a_redis_url(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "auth", password="cli-secret").start()
    try:
        with SessionStore(redis_config(server.url, auto_escalate=True, strike_limit=1)) as store:
            for i in range(12):
                store.set_session(f"u{i}", "gpt-4o", "SIMPLE")
                store.add_session_cost(f"u{i}", 100 + i)
                store.record_request_hash(f"u{i}", "h")
                store.record_request_hash(f"u{i}", "h")
            store.clear_session("u0")
        with server.client() as client:
            held = sessions_in_redis(client, Keys("se", 8))
        replayed = _cli("replay", server.url)
        assert replayed.returncode == 0, replayed.stderr
        assert set(orjson.loads(replayed.stdout)) == set(held)
        audited = _cli("audit", server.url, "--session", "u3")
        assert audited.returncode == 0 and "session.escalated" in audited.stdout
        exported = _cli("export", server.url, str(tmp_path / "exported"))
        assert exported.returncode == 0, exported.stderr
        from engine import replay

        assert replay(tmp_path / "exported") == held  # the file-log tools read the export
        assert _cli("replay", str(tmp_path / "exported")).stdout == replayed.stdout
        assert "cli-secret" not in replayed.stdout + audited.stdout + exported.stdout
        missing = _cli("audit", server.url, "--session", "nobody")
        assert missing.returncode != 0 and "cli-secret" not in missing.stderr + missing.stdout
        wrong = _cli("replay", f"redis://:not-it@127.0.0.1:{server.port}/0")
        assert wrong.returncode != 0 and "credentials" in wrong.stderr and "not-it" not in wrong.stderr
    finally:
        server.stop()


def test_metrics_count_what_the_redis_shards_commit(redis_server: RedisServer) -> None:
    from prometheus_client import CollectorRegistry

    from engine.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    with SessionStore(redis_config(redis_server.url), observer=metrics) as store:
        store.set_session("m", "gpt-4o")
        store.add_session_cost("m", 250_000)
        store.get_session("m")
    assert metrics.cost._value.get() == pytest.approx(0.25)
    assert sum(child._value.get() for child in metrics.applied._metrics.values()) == 3


def test_cluster_four_replica_processes_and_a_slot_migrated_under_load(redis_cluster: Any) -> None:
    """The multi-process suite on the 3-node cluster, while one bucket's slot moves to another node."""
    from tests.support.redis_servers import _owns, migrate_slot

    url = redis_cluster.url
    procs = [_replica(url, n, 250, 50, "c2") for n in range(4)]
    lines = []
    for proc in procs:  # every replica is serving before the slot moves
        assert proc.stdout is not None
        lines.append(orjson.loads(proc.stdout.readline()))
    client = redis_cluster.client()
    try:
        keys = Keys("c2", 64)
        slot = client.keyslot(keys.tag(bucket_of("s1", 64)))
        owner = client.get_node_from_key(keys.tag(bucket_of("s1", 64))).port
        target = next(s for s in redis_cluster.servers if s.port != owner)
        assert migrate_slot(redis_cluster, slot, target) > 0
        lines += _all_acknowledged(procs)
        assert sum(line["op"] != "begin-cost" for line in lines) == 4 * 250
        assert not [line for line in lines if line["op"] == "unavailable"]
        assert _owns(target, slot)
        _check_load(client, keys, lines, 50)
        with SessionStore(Config(enabled=True, tick_ms=0, backend=url, redis_namespace="c2")) as reader:
            check_agreement(client, keys, reader)
    finally:
        client.close()
