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
- the hash chain (engine/log/chain.py): every seal matches the SHA-256 of the
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

from engine.log import chain
from engine.log.replay import history_files, torn_tail
from events import records as record_names
from events._schema import STRICT_CHECKS, record_problem

__all__ = [
    "BadRecord", "Problem", "Report", "Verifier", "empty_report", "parse_head", "verify", "verify_files",
]

#: Exit status of ``audit --verify``: verified; a bad record; (2 is a usage or I/O error); nothing proven.
EXIT_OK, EXIT_BAD, EXIT_UNPROVEN = 0, 1, 3
_SNAPSHOT = record_names.LOG_SNAPSHOT
_ENDINGS = record_names.ENDING_RECORDS
#: Records the chain itself reads (a snapshot's chain_head, a signed head).
_CHAIN_RECORDS = frozenset({record_names.LOG_SNAPSHOT, record_names.LOG_SIGNED})


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
    #: "verified", "unchained" (no chain to check: a log written without one), "unsigned" (a key was
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
    #: Records before the chain starts (a log begun without a chain, continued with one).
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


class BadRecord(Exception):
    def __init__(self, field: str, rule: str) -> None:
        self.field, self.rule = field, rule


class Verifier:
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
        """Check one record (``raw`` its line, ending with a newline); raises ``BadRecord`` at the first broken rule."""
        seq = record["seq"]
        prev = self.prev_seq
        if type(seq) is not int or (prev is not None and seq != prev + 1):
            raise BadRecord("seq", f"must follow {prev} (no gap, no repeat, in order)" if prev is not None
                            else "an integer")
        name = record["event"]
        check = STRICT_CHECKS.get(name) if type(name) is str else None
        if check is None or check(record) is not None or name == _SNAPSHOT:
            problem = record_problem(record, strict=True)
            if problem is not None:
                raise BadRecord(*problem)
        self.prev_seq = seq
        if "last_used_at" in record or name in _ENDINGS:
            self.check_times(record)
        # The common line: inside a chained batch, no anchor, no signature. Everything else: chain.
        if (self.head is not None and name not in _CHAIN_RECORDS and "genesis" not in record
                and not (raw.endswith(b'"}\n') and chain.unseal(raw)) and "chain" not in record):
            self.hasher.update(raw)
            self.pending += 1
            return
        self._chain(raw, record, seq)

    def check_times(self, record: dict[str, Any]) -> None:
        sid = record.get("session_id")
        if sid is None:
            return
        name = record["event"]
        if name in record_names.ENDING_RECORDS:
            self.last_used.pop(sid, None)
            return
        used = record.get("last_used_at")
        if used is None or name == record_names.DECISION_MADE:
            return
        if name == record_names.SESSION_CREATED:
            if record["created_at"] > used:
                raise BadRecord("created_at", "not after last_used_at")
        elif used < self.last_used.get(sid, 0):
            raise BadRecord("last_used_at", f"never before the session's previous last_used_at ({self.last_used[sid]})")
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
        sealed = chain.unseal(raw)
        if "chain" in record and sealed is None:
            raise BadRecord("chain", "the last field of its line")
        if "genesis" in record:
            if self.head is not None:
                raise BadRecord("genesis", "only on the first chained record of a log")
            self._anchor(record["genesis"], "genesis", seq)
        name = record["event"]
        if name == record_names.LOG_SNAPSHOT and "chain_head" in record:
            if self.head is None:
                self._anchor(record["chain_head"], "snapshot", seq)
            elif self.pending or record["chain_head"] != self.head.hex():
                raise BadRecord("chain_head", "the chain's head after the previous segment")
            if "signature" in record:
                self.check_signature(seq - 1, record["chain_head"], record["signature"])
        elif name == record_names.LOG_SIGNED:
            if self.head is None or self.pending or record["head"] != self.head.hex() or record["head_seq"] != seq - 1:
                raise BadRecord("head", "the chain's head after the previous record")
            self.check_signature(record["head_seq"], record["head"], record["signature"])
        if self.head is None:
            if sealed is not None:
                raise BadRecord("chain",
                                "a seal after a genesis or a snapshot's chain_head (the log's start is missing)")
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
            raise BadRecord("chain", f"the SHA-256 of the previous head and the lines since seq {first}: a record in "
                                f"seq {first}..{seq} was changed, added, removed or moved")
        self.head, self.hasher = head, hashlib.sha256(head)
        self.pending, self.batch_start = 0, seq + 1
        report.seals += 1
        report.head, report.head_seq = value, seq
        if self.expect is not None and seq == self.expect[0]:
            if not value.startswith(self.expect[1]):
                raise BadRecord("chain", f"the head exported at seq {seq} ({self.expect[1]}…): the chain was rebuilt")
            report.expected_head_matched = True

    def check_signature(self, seq: int, head: str, signature: str) -> None:
        report = self.report
        if self.key is None:
            report.signatures_unchecked += 1
            return
        if not hmac.compare_digest(chain.sign(self.key, seq, bytes.fromhex(head)), signature):
            raise BadRecord("signature", f"the HMAC-SHA256 of the head at seq {seq} under the key in {chain.KEY_ENV}")
        report.signatures_checked += 1
        report.signed_through_seq = seq


def parse_head(text: str) -> tuple[int, str]:
    """``SEQ:HEX`` (a head exported by ``on_log_head``, the metric or the host's log) as (seq, lower-case hex)."""
    seq, sep, value = text.partition(":")
    value = value.strip().lower()
    if not sep or not seq.strip().isdigit() or not 8 <= len(value) <= chain.HEX_LEN \
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
    v = Verifier(report, key)
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
                except BadRecord as bad:
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
        return empty_report(report)
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
            report.notes.append(f"a key is set ({chain.KEY_ENV}) but the log holds no signature")
        elif key is None and report.signatures_unchecked:
            report.notes.append(f"{report.signatures_unchecked} signature(s) not checked: set {chain.KEY_ENV}")
    return report


def empty_report(report: Report) -> Report:
    """A log with no record (an empty file, a directory without segments, empty streams): nothing to prove."""
    report.status = "empty"
    report.notes.append("no records: nothing to verify")
    return report


def _bad(report: Report, v: Verifier, file: Path, offset: int, seq: int | None, field: str, rule: str) -> Report:
    report.status = "bad"
    report.last_seq = v.prev_seq
    report.problem = Problem(seq, str(file), offset, field, rule)
    return report
