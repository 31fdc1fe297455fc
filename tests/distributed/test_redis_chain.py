"""The hash chain on the Redis backend's bucket streams (docs/audit-log.md, "The chain on the Redis streams"),
against a real redis-server (tests/support/redis_servers.py): written by the commit script, checked by
``session-engine audit --verify redis://...``, tampering by a raw client caught, export re-sealed."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import InvalidEvent
from engine.distributed.redis_host import Keys
from engine.distributed.verify import verify_redis
from engine.store import SessionStore
from tests.distributed.test_redis_backend import _cli, redis_config
from tests.support.redis_servers import RedisServer


def _load(url: str) -> None:
    """Mixed work from two stores (two replicas) on one namespace: sessions created, used, escalated,
    costed, cleared, and a rejected event (a record written by the records-only path of the script)."""
    with SessionStore(redis_config(url)) as a, SessionStore(redis_config(url)) as b:
        for i in range(40):
            store = a if i % 2 else b
            sid = f"s{i % 13}"
            store.set_session(sid, "gpt-4o")
            store.record_request_hash(sid, f"h{i}")
            store.add_session_cost(sid, 1_000 + i)
            if i % 5 == 0:
                store.escalate_session(sid)
            if i % 7 == 0:
                (b if store is a else a).clear_session(sid)
            store.get_session(sid)
        with pytest.raises(InvalidEvent):
            a.add_session_cost("s1", -5)


def _busiest(client: Any) -> tuple[int, str]:
    """The bucket whose stream holds the most entries, and that stream's key."""
    keys = Keys("se", 8)
    bucket = max(range(keys.buckets), key=lambda b: client.xlen(keys.bucket_keys(b)[3]))
    return bucket, keys.bucket_keys(bucket)[3]


def _verify_cli(url: str) -> tuple[int, dict[str, Any]]:
    result = _cli("audit", url, "--verify", "--json")
    return result.returncode, orjson.loads(result.stdout)


def test_streams_written_by_two_stores_verify_clean_and_export_verifies(redis_server: RedisServer,
                                                                         tmp_path: Path) -> None:
    url = redis_server.url
    _load(url)
    code, report = _verify_cli(url)
    assert code == 0, report
    assert report["status"] == "verified" and report["problem"] is None
    assert report["records"] > 100 and report["seals"] == report["records"]  # every entry linked
    assert report["anchor"] == "genesis" and report["files"] == 8
    text = _cli("audit", url, "--verify")
    assert text.returncode == 0 and "VERIFIED" in text.stdout and "bucket stream(s)" in text.stdout
    with redis_server.client() as client:
        keys = Keys("se", 8)
        for bucket in range(8):
            entries = client.xrange(keys.bucket_keys(bucket)[3])
            if not entries:
                assert client.get(keys.head(bucket)) is None
                continue
            # the Lua side's sha1hex and the verifier's hashlib agree on the first link from the genesis
            first = entries[0][1]
            assert hashlib.sha1(first[b"g"] + first[b"r"]).hexdigest().encode() == first[b"h"]
            assert client.get(keys.head(bucket)) == entries[-1][1][b"h"]
    out = tmp_path / "export"
    exported = _cli("export", url, str(out))
    assert exported.returncode == 0, exported.stdout
    checked = _cli("audit", str(out), "--verify", "--json")
    assert checked.returncode == 0, checked.stdout
    file_report = orjson.loads(checked.stdout)
    assert file_report["status"] == "verified" and file_report["records"] == report["records"]
    assert file_report["anchor"] == "genesis" and file_report["seals"] >= 1


def _rewrite(client: Any, stream: str, change) -> None:
    """Rewrite a stream in place with the same ids, one entry's fields changed by ``change``."""
    entries = client.xrange(stream)
    client.delete(stream)
    for index, (stream_id, fields) in enumerate(entries):
        client.xadd(stream, change(index, dict(fields)), id=stream_id)


def test_an_altered_entry_is_caught_by_bucket_stream_id_and_seq(redis_server: RedisServer) -> None:
    url = redis_server.url
    _load(url)
    with redis_server.client() as client:
        bucket, stream = _busiest(client)
        entries = client.xrange(stream)
        victim = len(entries) // 2
        seq = orjson.loads(entries[victim][1][b"r"])["seq"]

        def change(index: int, fields: dict[bytes, bytes]) -> dict[bytes, bytes]:
            if index == victim:  # still a valid record: only the chain can tell
                record = orjson.loads(fields[b"r"])
                record["ts"] += 1
                fields[b"r"] = orjson.dumps(record)
            return fields

        _rewrite(client, stream, change)
    code, report = _verify_cli(url)
    assert code == 1 and report["status"] == "bad"
    problem = report["problem"]
    assert problem["bucket"] == bucket and problem["file"] == stream and problem["seq"] == seq
    assert problem["stream_id"] == entries[victim][0].decode() and problem["field"] == "h"
    text = _cli("audit", url, "--verify")
    assert text.returncode == 1 and f"bucket {bucket}, stream {stream} id {problem['stream_id']}, seq {seq}" \
        in text.stdout
    refused = _cli("export", url, str(redis_server.directory / "out"))
    assert refused.returncode != 0 and not (redis_server.directory / "out" / "00000000000000000001.jsonl").exists()


def test_a_forged_entry_appended_is_caught_even_with_a_correct_sha1(redis_server: RedisServer) -> None:
    url = redis_server.url
    _load(url)
    with redis_server.client() as client:
        bucket, stream = _busiest(client)
        last = client.xrange(stream)[-1][1]
        record = orjson.loads(last[b"r"])
        record["seq"] += 1
        raw = orjson.dumps(record)
        forged = client.xadd(stream, {"r": raw, "h": "0" * 40})
        code, report = _verify_cli(url)
        assert code == 1 and report["problem"]["field"] == "h" and report["problem"]["seq"] == record["seq"]
        # forged again, linked correctly (SHA-1 needs no key): the bucket's head key still names the real end
        client.xdel(stream, forged)
        client.xadd(stream, {"r": raw, "h": hashlib.sha1(last[b"h"] + raw).hexdigest()})
        code, report = _verify_cli(url)
    assert code == 1 and report["problem"]["field"] == "head" and report["problem"]["bucket"] == bucket


def test_a_deleted_entry_is_caught_in_the_middle_and_at_the_end(redis_server: RedisServer) -> None:
    url = redis_server.url
    _load(url)
    with redis_server.client() as client:
        bucket, stream = _busiest(client)
        entries = client.xrange(stream)
        middle = entries[len(entries) // 2]
        client.xdel(stream, middle[0])
        code, report = _verify_cli(url)
        gone = orjson.loads(middle[1][b"r"])["seq"]
        assert code == 1 and report["problem"]["field"] == "seq" and report["problem"]["seq"] == gone + 1
        assert report["problem"]["bucket"] == bucket and report["problem"]["stream_id"] == entries[
            len(entries) // 2 + 1][0].decode()


def test_the_newest_entry_deleted_is_caught_by_the_head_key(redis_server: RedisServer) -> None:
    url = redis_server.url
    _load(url)
    with redis_server.client() as client:
        bucket, stream = _busiest(client)
        client.xdel(stream, client.xrange(stream)[-1][0])
    report = verify_redis(url)
    assert report.status == "bad" and report.problem is not None
    assert report.problem.bucket == bucket and report.problem.field == "head"
