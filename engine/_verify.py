"""``session-engine audit --verify``: prove a log is what the engine wrote, or name its first bad record.

One streaming pass over every segment still on disk, oldest first, checks:

- every line is a JSON record, and ``seq`` counts 1, 2, 3 ... with no gap
  or repeat, across segments;
- every record against its record type in events/_schema.py (the table
  docs/log-schema.json mirrors), strictly: known event names, no unknown or
  missing field, every value in its domain (no negative cost, tiers from
  the enum, ...);
- a session's ``last_used_at`` never goes backwards, and ``created_at`` is
  not after it (record ``ts`` is the sender's clock and may step back a few
  ms when two threads race on one session, docs/architecture.md);
- the hash chain (engine/_chain.py): every seal matches the SHA-256 of the
  previous head and the lines since; a snapshot's ``chain_head`` matches
  the chain it continues; and with a key, every signature.

Memory holds one line and the live sessions' ``last_used_at``, never the log.
docs/audit-log.md describes the report and the threat model.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine import _chain
from engine._replay import history_files, torn_tail
from events import records as R
from events._schema import STRICT_CHECKS, record_problem

__all__ = ["Problem", "Report", "verify", "verify_files", "verify_redis"]

#: Exit status of ``audit --verify``: verified; a bad record; (2 is a usage or I/O error); nothing proven.
EXIT_OK, EXIT_BAD, EXIT_UNPROVEN = 0, 1, 3
_SNAPSHOT = R.LOG_SNAPSHOT
_ENDINGS = R.ENDING_RECORDS
#: Records the chain itself reads (a snapshot's chain_head, a signed head).
_CHAIN_RECORDS = frozenset({R.LOG_SNAPSHOT, R.LOG_SIGNED})


@dataclass(slots=True)
class Problem:
    """The first bad record: where it is and which rule it breaks."""

    seq: int | None
    file: str
    offset: int
    field: str
    rule: str
    #: A Redis backend's stream: the bucket and the stream id of the bad entry (``file`` is the stream's key).
    bucket: int | None = None
    stream_id: str | None = None


@dataclass(slots=True)
class Report:
    log: str
    #: "verified", "unchained" (no chain to check: an older version wrote it), "unsigned" (a key was
    #: given but the log holds no signature), "unproven" (an expected head's seq is no longer on disk), "empty"
    #: (no record at all: an empty file, a directory without segments), or "bad".
    status: str = "verified"
    files: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    #: How the chain starts in what is on disk: "genesis" (the log's first record), "snapshot" (older
    #: segments were deleted: trusted from the first snapshot's chain_head), or None (unchained).
    anchor: str | None = None
    anchor_seq: int | None = None
    seals: int = 0
    head: str | None = None
    head_seq: int | None = None
    #: Records before the chain starts (a log an older version began, continued by this one).
    unchained_records: int = 0
    #: Complete records after the last seal (a crash cut their batch's sealing line; the next restart seals them).
    unsealed_tail_records: int = 0
    #: Bytes of a torn last line (tolerated, as replay does).
    torn_tail_bytes: int = 0
    signatures_checked: int = 0
    signatures_unchecked: int = 0
    signed_through_seq: int | None = None
    #: The head exported earlier (``--expect-head SEQ:HEX``) and whether the seal at that seq matched it.
    expected_head: str | None = None
    expected_head_matched: bool = False
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"verified": EXIT_OK, "bad": EXIT_BAD}.get(self.status, EXIT_UNPROVEN)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.status == "verified", **asdict(self)}


class _Bad(Exception):
    def __init__(self, field: str, rule: str) -> None:
        self.field, self.rule = field, rule


class _Verifier:
    """The pass's state: seq, the chain's head and running hash, sessions' last use, the key."""

    def __init__(self, report: Report, key: bytes | None) -> None:
        self.report = report
        self.key = key
        self.prev_seq: int | None = None
        self.head: bytes | None = None
        self.hasher: Any = None
        self.pending = 0  # records since the last seal (or, before the chain starts, unchained records)
        self.batch_start: int | None = None
        self.last_used: dict[str, int] = {}
        #: (seq, hex prefix) of a head exported earlier: the seal at that seq must start with it.
        self.expect: tuple[int, str] | None = None

    def line(self, raw: bytes, record: dict[str, Any]) -> None:
        """Check one record (``raw`` its line, ending with a newline); raises ``_Bad`` at the first broken rule."""
        seq = record["seq"]
        prev = self.prev_seq
        if type(seq) is not int or (prev is not None and seq != prev + 1):
            raise _Bad("seq", f"must follow {prev} (no gap, no repeat, in order)" if prev is not None else "an integer")
        name = record["event"]
        check = STRICT_CHECKS.get(name) if type(name) is str else None
        if check is None or check(record) is not None or name == _SNAPSHOT:
            problem = record_problem(record, strict=True)
            if problem is not None:
                raise _Bad(*problem)
        self.prev_seq = seq
        if "last_used_at" in record or name in _ENDINGS:
            self._times(record)
        # The common line: inside a chained batch, no anchor, no signature. Everything else: _chain.
        if (self.head is not None and name not in _CHAIN_RECORDS and "genesis" not in record
                and not (raw.endswith(b'"}\n') and _chain.unseal(raw)) and "chain" not in record):
            self.hasher.update(raw)
            self.pending += 1
            return
        self._chain(raw, record, seq)

    def _times(self, record: dict[str, Any]) -> None:
        sid = record.get("session_id")
        if sid is None:
            return
        name = record["event"]
        if name in R.ENDING_RECORDS:
            self.last_used.pop(sid, None)
            return
        used = record.get("last_used_at")
        if used is None or name == R.DECISION_MADE:
            return
        if name == R.SESSION_CREATED:
            if record["created_at"] > used:
                raise _Bad("created_at", "not after last_used_at")
        elif used < self.last_used.get(sid, 0):
            raise _Bad("last_used_at", f"never before the session's previous last_used_at ({self.last_used[sid]})")
        self.last_used[sid] = used

    def _anchor(self, value: str, how: str, seq: int) -> None:
        report = self.report
        self.head = bytes.fromhex(value)
        self.hasher = hashlib.sha256(self.head)
        report.unchained_records += self.pending
        report.anchor, report.anchor_seq = how, seq
        self.pending, self.batch_start = 0, seq

    def _chain(self, raw: bytes, record: dict[str, Any], seq: int) -> None:
        report = self.report
        sealed = _chain.unseal(raw)
        if "chain" in record and sealed is None:
            raise _Bad("chain", "the last field of its line")
        if "genesis" in record:
            if self.head is not None:
                raise _Bad("genesis", "only on the first chained record of a log")
            self._anchor(record["genesis"], "genesis", seq)
        name = record["event"]
        if name == R.LOG_SNAPSHOT and "chain_head" in record:
            if self.head is None:
                self._anchor(record["chain_head"], "snapshot", seq)
            elif self.pending or record["chain_head"] != self.head.hex():
                raise _Bad("chain_head", "the chain's head after the previous segment")
            if "signature" in record:
                self._signature(seq - 1, record["chain_head"], record["signature"])
        elif name == R.LOG_SIGNED:
            if self.head is None or self.pending or record["head"] != self.head.hex() or record["head_seq"] != seq - 1:
                raise _Bad("head", "the chain's head after the previous record")
            self._signature(record["head_seq"], record["head"], record["signature"])
        if self.head is None:
            if sealed is not None:
                raise _Bad("chain", "a seal after a genesis or a snapshot's chain_head (the log's start is missing)")
            self.pending += 1
            return
        if sealed is None:
            self.hasher.update(raw)
            self.pending += 1
            return
        content, value = sealed
        self.hasher.update(content)
        head = self.hasher.digest()
        if head.hex() != value:
            first = self.batch_start if self.batch_start is not None else seq
            raise _Bad("chain", f"the SHA-256 of the previous head and the lines since seq {first}: a record in "
                                f"seq {first}..{seq} was changed, added, removed or moved")
        self.head, self.hasher = head, hashlib.sha256(head)
        self.pending, self.batch_start = 0, seq + 1
        report.seals += 1
        report.head, report.head_seq = value, seq
        if self.expect is not None and seq == self.expect[0]:
            if not value.startswith(self.expect[1]):
                raise _Bad("chain", f"the head exported at seq {seq} ({self.expect[1]}…): the chain was rebuilt")
            report.expected_head_matched = True

    def _signature(self, seq: int, head: str, signature: str) -> None:
        report = self.report
        if self.key is None:
            report.signatures_unchecked += 1
            return
        if not hmac.compare_digest(_chain.sign(self.key, seq, bytes.fromhex(head)), signature):
            raise _Bad("signature", f"the HMAC-SHA256 of the head at seq {seq} under the key in {_chain.KEY_ENV}")
        report.signatures_checked += 1
        report.signed_through_seq = seq


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:HEX`` (a head exported by ``on_log_head``, the metric or the host's log) as (seq, lower-case hex)."""
    seq, sep, value = text.partition(":")
    value = value.strip().lower()
    if not sep or not seq.strip().isdigit() or not 8 <= len(value) <= _chain.HEX_LEN \
            or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"expected SEQ:HEX (a seq, then 8 to 64 hex digits of the head), got {text!r}")
    return int(seq), value


def verify(path: str | Path, key: bytes | None = None, expect: tuple[int, str] | None = None) -> Report:
    """Verify a log (a file with its archives, or a segment directory); never raises for a bad record.

    ``expect`` is a head exported earlier, (seq, hex or a prefix of it): the
    seal at that seq must match it, and a log that ends before it was truncated.
    """
    path = Path(path)
    return verify_files(history_files(path), str(path), key, expect)


def verify_files(files: list[Path], name: str, key: bytes | None = None,
                 expect: tuple[int, str] | None = None) -> Report:
    report = Report(log=name, files=len(files))
    v = _Verifier(report, key)
    v.expect = expect
    if expect is not None:
        report.expected_head = f"{expect[0]}:{expect[1]}"
    loads, decode_error = orjson.loads, orjson.JSONDecodeError
    for index, file in enumerate(files):
        last_file = index == len(files) - 1
        offset = 0
        before = report.records  # the records of the files before this one
        with open(file, "rb", buffering=1 << 20) as f:
            for raw in f:
                start, offset = offset, offset + len(raw)
                try:
                    record = loads(raw)
                except decode_error:
                    record = None
                if type(record) is not dict or "seq" not in record or "event" not in record:
                    if record is None and not raw.strip():
                        if v.hasher is not None:
                            v.hasher.update(raw)  # a blank line: nothing to check, but the next seal covers it
                        continue
                    if torn_tail(raw, newest=last_file, at_end=not f.read(1), first=report.records == before):
                        report.torn_tail_bytes = len(raw)  # a torn last line, tolerated as replay does
                        break
                    # A complete line that is not a record is corruption wherever it is (the last line included).
                    return _bad(report, v, file, start, None, "", "a JSON log record (the line does not parse)"
                                if record is None else "a JSON object with seq and event")
                try:
                    if not raw.endswith(b"\n"):
                        raw += b"\n"  # a complete last record that lost its newline: restart adds it back
                    v.line(raw, record)
                except _Bad as bad:
                    seq = record.get("seq") if isinstance(record, dict) else None
                    return _bad(report, v, file, start, seq if type(seq) is int else None, bad.field, bad.rule)
                report.records += 1
                if report.first_seq is None:
                    report.first_seq = record["seq"]
    report.last_seq = v.prev_seq
    if expect is not None and not report.expected_head_matched:
        end = files[-1].stat().st_size if files else 0
        if report.last_seq is None or report.last_seq < expect[0]:
            return _bad(report, v, files[-1] if files else Path(name), end, report.last_seq, "seq",
                        f"at least {expect[0]}, the seq of the head exported earlier: the newest records were cut")
        if report.first_seq is not None and report.first_seq > expect[0]:
            report.status = "unproven"
            report.notes.append(f"the head exported at seq {expect[0]} was not checked: the segments holding it "
                                "are no longer on disk")
        else:
            return _bad(report, v, files[-1], end, expect[0], "chain",
                        f"sealed at seq {expect[0]} (the head exported there): no seal there, the chain was rebuilt")
    if report.records == 0:
        return _empty(report)
    if v.head is None:
        report.status = "unchained"
        report.unchained_records = report.records
        report.notes.append("no hash chain: written by a version before the chain, or with audit_chain='off'")
    else:
        report.unsealed_tail_records = v.pending
        if v.pending:
            report.notes.append(f"{v.pending} record(s) after the last seal: a crash cut their batch; "
                                "the next restart seals them")
        if key is not None and report.signatures_checked == 0:
            report.status = "unsigned"
            report.notes.append(f"a key is set ({_chain.KEY_ENV}) but the log holds no signature")
        elif key is None and report.signatures_unchecked:
            report.notes.append(f"{report.signatures_unchecked} signature(s) not checked: set {_chain.KEY_ENV}")
    return report


def _empty(report: Report) -> Report:
    """A log with no record (an empty file, a directory without segments, empty streams): nothing to prove."""
    report.status = "empty"
    report.notes.append("no records: nothing to verify")
    return report


def _bad(report: Report, v: _Verifier, file: Path, offset: int, seq: int | None, field: str, rule: str) -> Report:
    report.status = "bad"
    report.last_seq = v.prev_seq
    report.problem = Problem(seq, str(file), offset, field, rule)
    return report


# -- the Redis backend's bucket streams (docs/audit-log.md, "The chain on the Redis streams") ---------------
def _sha1_link(prev: str, record: bytes) -> str:
    """The head after an entry: what redis_commit.lua computes with redis.sha1hex(prev .. r)."""
    return hashlib.sha1(prev.encode("ascii") + record).hexdigest()


def verify_redis(url: str, namespace: str = "se", key: bytes | None = None) -> Report:
    """Verify every bucket stream of a Redis backend: seq continuity, every record's value domains, the
    per-bucket SHA-1 chain (fields ``h``/``g`` of each entry), that the bucket's head key matches its
    newest entry, and each ``log.signed`` (the head of the entry just before it; with ``key``, its HMAC).
    The first bad entry is named by bucket, stream, stream id and seq; never raises for one."""
    from redis.exceptions import RedisError

    from engine._backend_url import parse_backend
    from engine._redis import open_namespace, unavailable

    client, keys = open_namespace(url, namespace)
    target = parse_backend(url)
    report = Report(log=target.display if target is not None else url)
    try:
        report.files = keys.buckets
        for bucket in range(keys.buckets):
            if _verify_bucket(client, keys, bucket, report, key):
                return report
    except RedisError as exc:
        raise unavailable(target, exc) from None  # type: ignore[arg-type]
    finally:
        client.close()
    if report.records == 0:
        return _empty(report)
    if report.seals == 0 and report.records:
        report.status = "unchained"
        report.notes.append("no hash chain: the streams were written by a version before the Redis chain")
    elif key is not None and report.signatures_checked == 0 and report.records:
        report.status = "unsigned"
        report.notes.append(f"a key is set ({_chain.KEY_ENV}) but the streams hold no signature (replicas sign "
                            f"on close with the key set; `session-engine sign URL` signs every bucket's head)")
    return report


def _verify_bucket(client: Any, keys: Any, bucket: int, report: Report, key: bytes | None = None) -> bool:
    """Check one bucket stream; True when it holds a bad entry (then in ``report``)."""
    from engine._redis import stream_entries

    stream = keys.bucket_keys(bucket)[3]
    v = _Verifier(report, key)
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
            v._times(record)
            if record["event"] == R.LOG_SIGNED:
                if prev_seq is None:  # the entry it signs was trimmed: nothing left to check it against
                    report.signatures_unchecked += 1
                elif record["head_seq"] != prev_seq or record["head"] != head:
                    raise _Bad("head", "the head of the entry just before it (a signature follows its head)")
                else:
                    v._signature(record["head_seq"], record["head"], record["signature"])
        except _Bad as exc:
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
