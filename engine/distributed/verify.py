"""``session-engine audit --verify`` on a Redis backend: every bucket stream's seq, value domains, SHA-1 chain,
head key and signatures, reported as engine/log/verify.py reports a file log (the same ``Report``)."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from engine.log import chain
from engine.log.verify import BadRecord, Problem, Report, Verifier, empty_report
from events import records as record_names
from events._schema import record_problem

__all__ = ["verify_redis"]


def _sha1_link(prev: str, record: bytes) -> str:
    """The head after an entry: what redis_commit.lua computes with redis.sha1hex(prev .. r)."""
    return hashlib.sha1(prev.encode("ascii") + record).hexdigest()


def verify_redis(url: str, namespace: str = "se", key: bytes | None = None) -> Report:
    """Verify every bucket stream of a Redis backend: seq continuity, every record's value domains, the
    per-bucket SHA-1 chain (fields ``h``/``g`` of each entry), that the bucket's head key matches its
    newest entry, and each ``log.signed`` (the head of the entry just before it; with ``key``, its HMAC).
    The first bad entry is named by bucket, stream, stream id and seq; never raises for one."""
    from redis.exceptions import RedisError

    from engine.core.backend_url import parse_backend
    from engine.distributed.redis_host import open_namespace, unavailable_error

    client, keys = open_namespace(url, namespace)
    target = parse_backend(url)
    report = Report(log=target.display if target is not None else url)
    try:
        report.files = keys.buckets
        for bucket in range(keys.buckets):
            if _verify_bucket(client, keys, bucket, report, key):
                return report
    except RedisError as exc:
        raise unavailable_error(target, exc) from None  # type: ignore[arg-type]
    finally:
        client.close()
    if report.records == 0:
        return empty_report(report)
    if report.seals == 0 and report.records:
        report.status = "unchained"
        report.notes.append("no hash chain: the streams were written by a version before the Redis chain")
    elif key is not None and report.signatures_checked == 0 and report.records:
        report.status = "unsigned"
        report.notes.append(f"a key is set ({chain.KEY_ENV}) but the streams hold no signature (replicas sign "
                            f"on close with the key set; `session-engine sign URL` signs every bucket's head)")
    return report


def _verify_bucket(client: Any, keys: Any, bucket: int, report: Report, key: bytes | None = None) -> bool:
    """Check one bucket stream; True when it holds a bad entry (then in ``report``)."""
    from engine.distributed.redis_host import stream_entries

    stream = keys.bucket_keys(bucket)[3]
    v = Verifier(report, key)
    prev_seq: int | None = None
    head: str | None = None
    stream_id = ""
    seq: int | None = None
    checked_before = report.signatures_checked + report.signatures_unchecked
    records_before = report.records

    def bad(field_: str, rule: str) -> bool:
        report.status = "bad"
        report.problem = Problem(seq, stream, 0, field_, rule, bucket=bucket, stream_id=stream_id or None)
        return True

    for raw_id, fields in stream_entries(client, stream):
        stream_id, seq = raw_id.decode(), None
        raw = fields.get(b"r")
        try:
            record = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            record = None
        if type(record) is not dict or type(record.get("seq")) is not int or "event" not in record:
            return bad("r", "a JSON record with an int seq and an event")
        seq = record["seq"]
        if prev_seq is not None and seq != prev_seq + 1:
            return bad("seq", f"must follow {prev_seq} (no gap, no repeat, in order)")
        problem = record_problem(record, strict=True)
        if problem is not None:
            return bad(*problem)
        try:
            v.check_times(record)
            if record["event"] == record_names.LOG_SIGNED:
                if prev_seq is None:  # the entry it signs was trimmed: nothing left to check it against
                    report.signatures_unchecked += 1
                elif record["head_seq"] != prev_seq or record["head"] != head:
                    raise BadRecord("head", "the head of the entry just before it (a signature follows its head)")
                else:
                    v.check_signature(record["head_seq"], record["head"], record["signature"])
        except BadRecord as exc:
            return bad(exc.field, exc.rule)
        h = fields.get(b"h")
        g = fields.get(b"g")
        if g is not None:
            if head is not None:
                return bad("g", "only on the first chained entry of the bucket (its genesis)")
            head = g.decode("ascii", "replace")
            report.anchor, report.anchor_seq = "genesis", seq
        if h is None:
            if head is not None:
                return bad("h", "on every entry after the bucket's genesis (the chain is broken)")
            report.unchained_records += 1
        else:
            value = h.decode("ascii", "replace")
            if head is None:
                # the oldest entry left: a MAXLEN trim (or a deletion) took the ones before it
                report.notes.append(f"bucket {bucket}: the chain is checked from seq {seq} (stream id "
                                    f"{stream_id}): the entries before it were trimmed or deleted")
                report.anchor = report.anchor or "trimmed"
            elif _sha1_link(head, raw) != value:
                return bad("h", "the SHA-1 of the previous head and this entry's r: an entry was changed, "
                                "added, removed or moved")
            head = value
            report.seals += 1
            report.head, report.head_seq = value, seq
        prev_seq = seq
        report.records += 1
        if report.first_seq is None or seq < report.first_seq:
            report.first_seq = seq
        if report.last_seq is None or seq > report.last_seq:
            report.last_seq = seq
    stored = client.get(keys.head(bucket))
    stored_seq = client.get(keys.bucket_keys(bucket)[0])
    stream_id = ""
    if stored is not None and stored.decode("ascii", "replace") != (head or ""):
        seq = prev_seq
        return bad("head", f"the bucket's head key {keys.head(bucket)} ({stored.decode('ascii', 'replace')}) after "
                           "the newest entry: the newest entries were removed, or the chain was rebuilt")
    if stored is None and head is not None and report.seals:
        seq = prev_seq
        return bad("head", f"set: {keys.head(bucket)} is missing while the stream is chained")
    if prev_seq is not None and (stored_seq is None or int(stored_seq) != prev_seq):
        seq = prev_seq
        return bad("seq", f"the bucket's last seq ({stored_seq.decode() if stored_seq else None} in "
                          f"{keys.bucket_keys(bucket)[0]}): the newest entries were removed")
    if key is not None and report.records > records_before and \
            report.signatures_checked + report.signatures_unchecked == checked_before:
        # Written after the last signature, or its signatures removed with a rebuilt chain: the chain alone
        # proves these records (docs/audit-log.md, "Signing the Redis streams").
        report.notes.append(f"bucket {bucket}: {report.records - records_before} record(s), no signature")
    return False
