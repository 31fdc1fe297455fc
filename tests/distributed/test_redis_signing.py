"""Signed heads on the Redis backend's bucket streams (docs/audit-log.md, "Signing the Redis streams"), against a
real redis-server: replicas sign the buckets they wrote on close, ``session-engine sign URL`` signs the rest, a
signature always follows the entry whose head it signs, and a chain rebuilt by someone without the key fails."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine.distributed.redis_host import COMMIT_LUA, Keys, bucket_of, commit_command, sign_heads
from engine.distributed.verify import verify_redis
from engine.log import chain
from engine.store import SessionStore
from tests.distributed.test_redis_backend import _cli, redis_config
from tests.distributed.test_redis_chain import _load
from tests.support.redis_servers import RedisServer

KEY = "k3y-for-the-tests-0123456789abcdef"


def _signed_buckets(client: Any, keys: Keys) -> list[int]:
    """The buckets whose newest entry is a log.signed record."""
    out = []
    for bucket in range(keys.buckets):
        newest = client.xrevrange(keys.bucket_keys(bucket)[3], "+", "-", count=1)
        if newest and orjson.loads(newest[0][1][b"r"])["event"] == "log.signed":
            out.append(bucket)
    return out


def _written(client: Any, keys: Keys) -> list[int]:
    return [b for b in range(keys.buckets) if client.xlen(keys.bucket_keys(b)[3])]


def test_replicas_sign_the_buckets_they_wrote_on_close_and_verify_checks_them(
        redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = redis_server.url
    monkeypatch.setenv(chain.KEY_ENV, KEY)
    _load(url)  # two replicas, both with the key: the second to close finds the buckets signed already
    keys = Keys("se", 8)
    with redis_server.client() as client:
        written = _written(client, keys)
        assert len(written) > 3 and _signed_buckets(client, keys) == written
        for bucket in written:  # the signature names the head of the entry just before it
            last_two = client.xrevrange(keys.bucket_keys(bucket)[3], "+", "-", count=2)
            signed, before = orjson.loads(last_two[0][1][b"r"]), orjson.loads(last_two[1][1][b"r"])
            assert signed["head_seq"] == before["seq"] and signed["head"] == last_two[1][1][b"h"].decode()
    report = verify_redis(url, key=KEY.encode())
    assert report.status == "verified" and report.signatures_checked == len(written)
    assert report.signatures_unchecked == 0
    unkeyed = verify_redis(url)
    assert unkeyed.status == "verified" and unkeyed.signatures_unchecked == len(written)
    wrong = verify_redis(url, key=b"another key")
    assert wrong.status == "bad" and wrong.problem.field == "signature"
    code = _cli("audit", url, "--verify", "--json")
    assert code.returncode == 0 and orjson.loads(code.stdout)["signatures_checked"] == len(written)
    # export leaves the streams' own signatures out: the file it writes is chained afresh, ends with a signature
    # of its own head under the same key, and verifies
    out = tmp_path / "export"
    assert _cli("export", url, str(out)).returncode == 0
    checked = _cli("audit", str(out), "--verify", "--json")
    assert checked.returncode == 0, checked.stdout
    exported = orjson.loads(checked.stdout)
    assert exported["records"] == report.records - len(written) + 1 and exported["signatures_checked"] == 1


def test_a_chain_rebuilt_without_the_key_fails_at_the_signature(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The case docs/audit-log.md listed as not caught: a writer to Redis changes an entry, recomputes every SHA-1
    link after it and the head key. The signature that follows names the old head; edited to name the new one,
    it no longer matches its HMAC, which only a key holder can compute."""
    url = redis_server.url
    monkeypatch.setenv(chain.KEY_ENV, KEY)
    _load(url)
    keys = Keys("se", 8)
    with redis_server.client() as client:
        bucket = max(_written(client, keys), key=lambda b: client.xlen(keys.bucket_keys(b)[3]))
        stream = keys.bucket_keys(bucket)[3]
        entries = client.xrange(stream)
        victim = next(i for i, (_, f) in enumerate(entries) if b'"cost.added"' in f[b"r"])

        def rebuild(fix_signature: bool, drop_signature: bool = False) -> None:
            head = entries[0][1][b"g"].decode()
            client.delete(stream)
            seq = 0
            for index, (stream_id, fields) in enumerate(entries):
                record = orjson.loads(fields[b"r"])
                if index == victim:
                    record["micros"] += 1_000_000  # the disputed spend
                if record["event"] == "log.signed" and drop_signature:
                    continue
                seq += 1
                record["seq"] = seq
                if record["event"] == "log.signed" and fix_signature:
                    record["head"] = head
                raw = orjson.dumps({"seq": record.pop("seq"), **record})
                head = hashlib.sha1(head.encode() + raw).hexdigest()
                new = {b"r": raw, b"h": head.encode()}
                if b"g" in fields:
                    new[b"g"] = fields[b"g"]
                client.xadd(stream, new, id=stream_id)
            client.set(keys.head(bucket), head)
            client.set(keys.bucket_keys(bucket)[0], seq)

        rebuild(fix_signature=False)
        caught = verify_redis(url)  # without the key: the signature's head is not the entry's before it
        assert caught.status == "bad" and caught.problem.field == "head" and caught.problem.bucket == bucket
        rebuild(fix_signature=True)
    unkeyed = verify_redis(url)
    assert unkeyed.status == "verified" and unkeyed.signatures_unchecked > 0  # only the key tells
    keyed = verify_redis(url, key=KEY.encode())
    assert keyed.status == "bad" and keyed.problem.field == "signature" and keyed.problem.bucket == bucket
    # The signatures removed too: the chain holds, and the bucket is named as one that holds no signature.
    with redis_server.client() as client:
        rebuild(fix_signature=False, drop_signature=True)
    dropped = verify_redis(url, key=KEY.encode())
    assert dropped.status == "verified" and f"bucket {bucket}: {len(entries) - 1} record(s), no signature" in \
        dropped.notes
    assert not [n for n in dropped.notes if "no signature" in n and not n.startswith(f"bucket {bucket}:")]


def test_the_sign_command_signs_what_moved_since_its_last_signature(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = redis_server.url
    monkeypatch.delenv(chain.KEY_ENV, raising=False)
    _load(url)  # replicas without the key: nothing signed
    keys = Keys("se", 8)
    with redis_server.client() as client:
        written = _written(client, keys)
        assert _signed_buckets(client, keys) == []
    refused = _cli("sign", url)
    assert refused.returncode != 0 and chain.KEY_ENV in refused.stderr
    assert verify_redis(url, key=KEY.encode()).status == "unsigned"
    monkeypatch.setenv(chain.KEY_ENV, KEY)
    first = _cli("sign", url)
    assert first.returncode == 0 and f"signed the head of {len(written)} bucket stream(s)" in first.stdout
    assert "signed the head of 0 bucket stream(s)" in _cli("sign", url).stdout  # nothing moved since
    monkeypatch.delenv(chain.KEY_ENV)
    with SessionStore(redis_config(url)) as store:  # a replica without the key signs nothing on close
        store.set_session("late", "gpt-4o")
    late = bucket_of("late", 8)
    with redis_server.client() as client:
        assert late not in _signed_buckets(client, keys)
        assert set(_signed_buckets(client, keys)) == set(written) - {late}
    monkeypatch.setenv(chain.KEY_ENV, KEY)
    again = _cli("sign", url)
    assert again.returncode == 0 and "signed the head of 1 bucket stream(s)" in again.stdout
    report = verify_redis(url, key=KEY.encode())
    assert report.status == "verified" and report.signatures_checked == len(written) + 1
    with redis_server.client() as client:
        assert late in _signed_buckets(client, keys)


def test_a_signature_is_written_only_while_its_head_is_the_buckets(redis_server: RedisServer) -> None:
    url = redis_server.url
    _load(url)
    keys = Keys("se", 8)
    with redis_server.client() as client:
        bucket = _written(client, keys)[0]
        stream = keys.bucket_keys(bucket)[3]
        sha = client.script_load(COMMIT_LUA)
        before = client.xlen(stream)
        stale = "0" * 40  # a head read before another replica's write
        record = orjson.dumps({"ts": 1, "event": "log.signed", "head_seq": 1, "head": stale,
                               "signature": "0" * 64})[1:]
        reply = client.execute_command(*commit_command(keys, sha, bucket, None, "*", stale, "", 0, "", "t", "", "",
                                                       "", 0, 0, [record]))
        assert reply[0] == 3 and client.xlen(stream) == before  # refused, nothing written
        assert sign_heads(client, keys, KEY.encode(), [bucket]) == [bucket]
        assert client.xlen(stream) == before + 1
    assert verify_redis(url, key=KEY.encode()).status == "verified"


def test_a_replica_closing_while_redis_is_down_does_not_hang_or_raise(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(chain.KEY_ENV, KEY)
    store = SessionStore(redis_config(redis_server.url, ask_timeout_s=1.0))
    store.set_session("s", "gpt-4o")
    redis_server.kill9()
    store.close()  # the heads cannot be signed now: said in the log, the next `sign` signs them
    assert "could not be signed on close" in caplog.text
    redis_server.start()
    assert verify_redis(redis_server.url, key=KEY.encode()).status == "unsigned"


def test_replicas_on_a_cluster_sign_every_bucket_they_wrote(redis_cluster: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The signature's read (MGET of the bucket's seq and head) and its conditional append name keys of one hash
    tag: one slot, whichever node holds it."""
    monkeypatch.setenv(chain.KEY_ENV, KEY)
    url = redis_cluster.url
    with SessionStore(redis_config(url, redis_namespace="signed", redis_buckets=16)) as store:
        for i in range(40):
            store.add_session_cost(f"c{i}", 5)
    client = redis_cluster.client()
    try:
        keys = Keys("signed", 16)
        written = _written(client, keys)
        assert len(written) > 8 and _signed_buckets(client, keys) == written
        assert len({client.get_node_from_key(keys.tag(b)).port for b in written}) == 3
    finally:
        client.close()
    report = verify_redis(url, "signed", key=KEY.encode())
    assert report.status == "verified" and report.signatures_checked == len(written)
