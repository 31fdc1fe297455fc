"""Read the audit log back: stream its records, fold their changed fields, rebuild live sessions.

Replay never re-runs the rules: each record carries the new values of the
fields it changed, so folding them in ``seq`` order rebuilds the state, also
for logs whose records lack fields. Reading streams line by line; memory holds
the live sessions, not the log.

A log is one file, or a directory of segments named ``<first seq, 20
digits>.jsonl`` (docs/audit-log.md). Every segment after the first starts
with a ``log.snapshot`` of all live sessions, so a directory is replayed
from its newest snapshot onwards.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from engine.core.entry import Entry, build_entry
from engine.core.kinds import Kind
from engine.core.rules import DOWNGRADE, LIFTING
from events import EngineError, Tier
from events import records as record_names
from events._schema import LENIENT_CHECKS, record_problem

__all__ = [
    "ENTRY_DEFAULTS", "ENTRY_FIELDS", "LogCorrupt", "PREFIX", "Share", "State", "Tail", "archives", "fields_mapping",
    "fold", "fold_file", "fold_files", "fold_log", "history_files", "list_segments", "log_files", "new_fields",
    "paused_gc", "read_file", "read_head", "read_log", "readable_segments", "replay", "segment_name", "segment_seq",
    "to_entry", "torn_tail", "upcast_decision",
]


class LogCorrupt(EngineError):
    """The log cannot be read or trusted: a line in the middle is not a record, ``seq`` jumps, an event
    name is unknown, or a value is out of its domain (docs/events.md, "Value domains")."""


def domain_error(path: Path, record: dict[str, Any]) -> LogCorrupt:
    """The LogCorrupt for a record that breaks docs/events.md's value domains, naming its seq and field."""
    problem = record_problem(record, strict=False) or ("?", "a valid record")
    field, rule = problem
    if field == "event":
        return LogCorrupt(f"{path} seq {record.get('seq')}: event {str(record.get('event'))[:60]!r} "
                          f"is not a record name from docs/events.md")
    return LogCorrupt(f"{path} seq {record.get('seq')}: field {field} must be {rule}")


#: Entry field names in declaration order (a snapshot and ``session.created`` carry all of them).
ENTRY_FIELDS: tuple[str, ...] = tuple(Entry.__slots__)  # type: ignore[arg-type]
_UNPACKED = ("model", "tier", "created_at", "last_used_at", "request_count", "recent_hashes", "strikes", "escalated",
             "user_explicit", "cache_sticky", "cache_sticky_at", "provider", "session_cost_micros", "deployment",
             "reservations", "deployments")
if ENTRY_FIELDS != _UNPACKED:  # new_fields and to_entry name every field in this order
    raise ImportError(f"engine.log.replay handles the Entry fields {_UNPACKED}, Entry has {ENTRY_FIELDS}")
#: Records that never change a session's state (their ``model``/``tier`` describe a decision, not the pin).
STATELESS_RECORDS = frozenset({record_names.DECISION_MADE, record_names.INPUT_REJECTED, record_names.SHARD_RESTARTED,
                               record_names.SESSION_REFUSED})
SEGMENT_NAME = re.compile(r"^(\d{20})\.jsonl$")
#: A single-file log's retired segment: ``<name>.<first seq, 20 digits>``.
ARCHIVE_SUFFIX = re.compile(r"^\d{20}$")

#: What a field holds when a record lacks it.
ENTRY_DEFAULTS: tuple[Any, ...] = ("", None, 0, 0, 0, [], 0, False, False, False, 0, "", 0, "", [], [])
_DEFAULT_PAIRS = tuple(zip(ENTRY_FIELDS, ENTRY_DEFAULTS, strict=True))
_FIELD_NAMES = frozenset(ENTRY_FIELDS)


class Fields:
    """A live session's Entry field values while folding, as the log holds them (``tier`` a str,
    ``recent_hashes`` a list).

    Mutable slots, not a list or a dict: one allocation per session with the values inline. With
    tens of thousands of live sessions, replay's time goes mostly to cache misses on the session
    being updated (a 50,000-session log folds ~1.8x slower per record than a 2,000-session one),
    and a list keeps its values in a second block.
    """

    __slots__ = ENTRY_FIELDS


State = dict[str, Fields]
_new = object.__new__
_all_fields = operator.itemgetter(*ENTRY_FIELDS)
_field_values = operator.attrgetter(*ENTRY_FIELDS)


def new_fields(source: dict[str, Any]) -> Fields:
    """A session's fields from a record or snapshot entry that carries every field (else defaults)."""
    f = _new(Fields)
    try:
        (f.model, f.tier, f.created_at, f.last_used_at, f.request_count, f.recent_hashes, f.strikes, f.escalated,
         f.user_explicit, f.cache_sticky, f.cache_sticky_at, f.provider, f.session_cost_micros,
         f.deployment, f.reservations, f.deployments) = _all_fields(source)
    except KeyError:  # a record lacking a field
        get = source.get
        for name, default in _DEFAULT_PAIRS:
            setattr(f, name, get(name, default))
    return f


def _update(fields: Fields, record: dict[str, Any], names: frozenset[str] = _FIELD_NAMES) -> None:
    """The generic fold of one record into a session: every key that names an Entry field."""
    for key, value in record.items():
        if key in names:
            setattr(fields, key, value)


@dataclass(slots=True)
class Tail:
    """What reading one file learned about it (filled in when its records are exhausted)."""

    first: dict[str, Any] | None = None
    last_seq: int | None = None
    #: Byte offset just past the last good record line: where appending resumes.
    good_end: int = 0
    #: Bytes after ``good_end`` (a torn or garbage last line) that were skipped.
    torn_bytes: int = 0
    #: The last good record line has no trailing newline (cut just after its closing brace).
    newline_missing: bool = False
    #: The hash chain's last anchor in this file (hex): the last seal, or a genesis / snapshot head not
    #: sealed yet; None when the file has none (a log written without a chain).
    chain: str | None = None
    #: Byte offset where the bytes the anchor does not cover begin (just past a seal; at an unsealed anchor's line).
    chain_end: int = 0


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.jsonl"


class Share:
    """One reader's share of a log's sessions (a parallel backtest, engine/tools/backtest.py): ``read_file``
    yields only the records of the sessions it owns, the snapshots (they hold every share's sessions) and, to
    share 0, the other records of no session, and passes over the other lines unparsed, counting them.

    A line is placed from the prefix this version writes (``PREFIX``: seq, ts, event and session_id
    first, no escape in the event or the id); a line it does not place is parsed and placed by its
    ``session_id``. A session belongs to share ``owner(id as UTF-8 bytes)``, the same in every reader."""

    __slots__ = ("index", "owner", "owns")

    def __init__(self, index: int, owner: Callable[[bytes], int]) -> None:
        self.index = index
        self.owner = owner
        #: Session id bytes -> the id (str) when this share owns it, else False.
        self.owns: dict[bytes, str | bool] = {}

    def own(self, sid: bytes) -> str | bool:
        own = self.owns.get(sid)
        if own is None:
            own = self.owns[sid] = sid.decode() if self.owner(sid) == self.index else False
        return own

    def keeps(self, record: dict[str, Any]) -> bool:
        """Whether a parsed record (one the prefix did not place) is this share's."""
        sid = record.get("session_id")
        if type(sid) is not str:  # a snapshot: every share's sessions; any other record of no session: share 0's
            return self.index == 0 or record.get("event") == record_names.LOG_SNAPSHOT
        return self.own(sid.encode()) is not False


#: The prefix of a record line as this version writes it: its ``session_id`` read without parsing the line.
PREFIX = re.compile(rb'\{"seq":\d{1,19},"ts":\d{1,19},"event":"[^"\\]{1,64}","session_id":"([^"\\]{0,512})"')


def read_file(path: Path, tail: Tail, *, expect: int | None = None, last: bool = True,
              light: frozenset[str] = frozenset(), share: Share | None = None) -> Iterator[dict[str, Any]]:
    """Yield each record of one file, checking that ``seq`` counts up by one.

    ``expect`` is the ``seq`` the previous file ended on (None: any start).
    Only when ``last`` is set may the final line be torn or garbage: it is
    skipped and measured in ``tail``. A bad line anywhere else raises
    ``LogCorrupt`` naming the file and the line number.

    ``light``: record names whose caller reads nothing of them but ``seq``, ``event`` and
    ``session_id`` (and whether a key is present). Such a record that carries a string
    ``session_id`` skips the value-domain check of its other fields; every other record is
    checked in full (the backtest reads its turn records this way).

    ``share``: yield only the records of this reader's sessions (``Share``). Another share's line is
    counted as the record with the next ``seq`` and not parsed: its owner parses and checks it, and
    checks its ``seq`` against the same count, so across the readers every line is checked and seqs
    still count up by one. A line the prefix does not place is parsed and checked by every reader.
    """
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    checks = LENIENT_CHECKS
    prev = expect
    pos = 0
    number = 0
    line = b""
    with open(path, "rb", buffering=1 << 20) as f:
        match = PREFIX.match if share is not None else None
        owns = share.owns if share is not None else {}
        own: str | bool | None = None  # a shared reader's verdict on the line's prefix: the id if it owns it
        for line in f:
            number += 1
            if match is not None:
                placed = match(line)
                if placed is None:
                    own = None
                else:
                    sid = placed[1]
                    own = owns.get(sid)
                    if own is None:
                        own = share.own(sid)  # type: ignore[union-attr]
                    if own is False and prev is not None:
                        # Another share's record: counted, not read. Its owner checks that its seq is the one
                        # this count expects (every reader counts every line), so seqs still count up by one.
                        prev += 1
                        pos += len(line)
                        continue
            try:
                record = loads(line)
                seq = record["seq"]
                name = record["event"]
            except (decode_error, KeyError, TypeError):
                if _bad_line(f, path, number, line, tail, last):
                    pos += len(line)
                    continue
                break
            if tail.first is None:
                _check_first(path, number, seq, record, tail)
            if prev is not None and seq != prev + 1:
                raise LogCorrupt(f"{path} line {number}: seq {seq!r} does not follow {prev}")
            if type(name) is not str or name not in light or type(record.get("session_id")) is not str:
                # record_problem's lenient check, called directly (record_problem explains a failure)
                check = checks.get(name) if type(name) is str else None
                if (check is None or check(record) is not None) and record_problem(record, strict=False) is not None:
                    raise domain_error(path, record)
            prev = seq
            pos += len(line)
            tail.last_seq = seq
            tail.good_end = pos
            if match is not None:
                if type(own) is not str:  # not placed (or another share's first line)
                    if not share.keeps(record):  # type: ignore[union-attr]
                        continue
                elif record.get("session_id") != own:
                    # Never in a log this version writes (a repeated key): the prefix placed the line in
                    # another share than its record's. The caller reads such a log without shares.
                    raise LogCorrupt(f"{path} line {number}: session_id is not the one its prefix names")
            if name == _DECISION and "downgrade" not in record and "lift" not in record:
                upcast_decision(record)
            yield record
    if share is not None and prev is not None:
        tail.last_seq = prev  # the other shares' records count too (tail.good_end: this share's last record)
    _finish(tail, line)


_DECISION = record_names.DECISION_MADE


def upcast_decision(record: dict[str, Any]) -> None:
    """Serves logs whose ``decision.made`` records lack ``downgrade`` and ``lift``: a bypass record
    without either gets them from the marker its reason text ends with (``engine.core.rules.DOWNGRADE``,
    ``LIFTING``). The only reader of the reason's text; every counter reads the fields. A record of this
    version without them is a bypass that was neither (its reason holds no marker): it stays as it is."""
    if record.get("kind") != Kind.BYPASS:
        return
    reason = record.get("reason")
    if type(reason) is not str:
        return
    if DOWNGRADE in reason:
        record["downgrade"] = True
    elif LIFTING in reason:
        record["lift"] = True


def fold_file(path: Path, state: State, tail: Tail, *, expect: int | None = None, last: bool = True) -> None:
    """``fold`` every record of one file into ``state``: ``read_file`` with the fold inlined.

    Recovery and replay spend their time here (a restart reads the newest
    snapshot and everything after it), so the loop does per record only what
    the record needs: no generator, no call, no line counter (an error counts
    the lines again to name the one at fault); the expected next ``seq`` is one
    comparison, and the first record (or a jump) takes the slow branch. The
    records this version writes most (``session.touched``, ``session.updated``
    without a model change, ``hash.recorded``, ``cost.added``) set their two
    fields directly when they carry exactly the keys docs/events.md lists for
    them; any other shape (an older or newer writer's) takes the generic fold,
    which applies every key that names an Entry field.
    """
    loads = orjson.loads
    decode_error = orjson.JSONDecodeError
    created, snapshot = record_names.SESSION_CREATED, record_names.LOG_SNAPSHOT
    stateless, ending = STATELESS_RECORDS, record_names.ENDING_RECORDS
    used = (record_names.SESSION_TOUCHED, record_names.SESSION_UPDATED)  # both carry last_used_at and request_count
    hashed, costed = record_names.HASH_RECORDED, record_names.COST_ADDED
    get = state.get
    update = _update
    following: Any = None  # the seq the next record must have; None until the first record is seen
    line = b""
    with paused_gc(), open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            try:
                record = loads(line)
                seq = record["seq"]
                name = record["event"]
            except (decode_error, KeyError, TypeError):
                if _bad_line(f, path, None, line, tail, last):
                    continue
                break
            if seq != following:
                _first_or_gap(f, path, line, seq, record, tail, expect if following is None else following - 1)
            following = seq + 1
            # seq, ts, event, session_id and two more keys, and name says which two. Their value domains
            # (docs/events.md) are checked inline: a few type tests, not a call.
            if len(record) == 6 and type(ts := record.get("ts")) is int and ts >= 0:
                try:
                    if name in used:
                        a, b = record["last_used_at"], record["request_count"]
                        if type(a) is not int or type(b) is not int or a < 0 or b < 0:
                            raise domain_error(path, record)
                        fields = get(record["session_id"])
                        if fields is not None:
                            fields.last_used_at, fields.request_count = a, b
                        continue
                    if name == hashed:
                        a, b = record["recent_hashes"], record["strikes"]
                        if type(a) is not list or len(a) > 3 or type(b) is not int or b < 0:
                            raise domain_error(path, record)
                        fields = get(record["session_id"])
                        if fields is not None:
                            fields.recent_hashes, fields.strikes = a, b
                        continue
                    if name == costed:
                        a, b = record["micros"], record["session_cost_micros"]
                        if type(a) is not int or type(b) is not int or a < 1 or b < 0:
                            raise domain_error(path, record)
                        fields = get(record["session_id"])
                        if fields is not None:
                            fields.session_cost_micros = b
                        continue
                except (KeyError, TypeError):
                    pass  # not the keys (or a key of a type) this version writes: the generic fold below
            # Every other record: its name and every field it carries are checked against events/_schema.py.
            if record_problem(record, strict=False) is not None:
                raise domain_error(path, record)
            if "chain" in record:
                tail.chain, tail.chain_end = record["chain"], f.tell()
            elif "genesis" in record or "chain_head" in record:
                tail.chain, tail.chain_end = record.get("genesis") or record["chain_head"], f.tell() - len(line)
            sid = record.get("session_id")
            if sid is None:
                if name == snapshot:
                    fold(state, record)
            elif name in stateless:
                pass
            elif name == created:
                state[sid] = new_fields(record)
            elif name in ending:
                state.pop(sid, None)
            else:
                fields = get(sid)
                if fields is not None:
                    update(fields, record)
        if tail.first is not None:
            tail.last_seq = following - 1
        tail.good_end = f.tell() - tail.torn_bytes
    _finish(tail, line)


def _first_or_gap(f: Any, path: Path, line: bytes, seq: Any, record: dict[str, Any], tail: Tail,
                  previous: int | None) -> None:
    """``fold_file``'s slow branch: take the file's first record, or raise for a seq that breaks the count."""
    if tail.first is None:
        if type(seq) is not int:
            raise LogCorrupt(f"{path} line {_line_number(path, f.tell() - len(line))}: seq must be an int")
        tail.first = record
        if previous is None or seq == previous + 1:
            return
    raise LogCorrupt(f"{path} line {_line_number(path, f.tell() - len(line))}: seq {seq!r} does not follow {previous}")


def _line_number(path: Path, start: int) -> int:
    """The 1-based number of the line that starts at byte ``start``: counted only when an error names it."""
    count = 0
    with open(path, "rb") as f:
        while start > 0:
            block = f.read(min(start, 1 << 20))
            if not block:
                break
            count += block.count(b"\n")
            start -= len(block)
    return count + 1


def _check_first(path: Path, number: int, seq: Any, record: dict[str, Any], tail: Tail) -> None:
    if type(seq) is not int:
        raise LogCorrupt(f"{path} line {number}: seq must be an int")
    tail.first = record


def torn_tail(line: bytes, *, newest: bool, at_end: bool, first: bool) -> bool:
    """Whether a line that is not a record is a crash's torn tail, which every reader skips (and recovery cuts).

    A batch is written with one ``write(2)``, so a crash (a kill, a power
    cut, a full disk) can leave only an **unterminated** last line: the end
    of the newest segment, without its newline. A complete line (ending with
    a newline) that is not a record (``{}``, ``[1]``, ``{"seq": 5}``, text) is
    no crash's doing: it is corruption wherever it is, the last line
    included. So is an unterminated line that is the file's first and does
    not even start like a JSON object: the file is not an audit log.
    ``newest``: the file is the log's newest segment; ``at_end``: nothing
    follows the line; ``first``: no record came before it in the file.
    """
    return newest and at_end and not line.endswith(b"\n") and not (first and not line.lstrip().startswith(b"{"))


def _bad_line(f: Any, path: Path, number: int | None, line: bytes, tail: Tail, last: bool) -> bool:
    """A line that is not a record: True to skip it (blank), False when it is the torn tail; else raise.

    ``number`` None: count the lines to name it, and only if it is an error.
    """
    if not line.strip():
        return True  # a blank line carries nothing
    start = f.tell() - len(line)
    at_end = not f.read(1)
    first = tail.last_seq is None and tail.first is None
    if torn_tail(line, newest=last, at_end=at_end, first=first):
        tail.torn_bytes = len(line)
        return False
    if at_end and not last and not line.endswith(b"\n"):
        error = "{path} line {number}: torn record at the end of a segment that is not the newest"
    elif at_end and first and not line.lstrip().startswith(b"{"):
        error = "{path}: not an audit log (line {number} is not a JSON record)"
    else:
        error = "{path} line {number}: not a JSON log record (needs seq and event)"
    raise LogCorrupt(error.format(path=path, number=number if number is not None else _line_number(path, start)))


def _finish(tail: Tail, line: bytes) -> None:
    if tail.last_seq is not None and tail.torn_bytes == 0 and line and not line.endswith(b"\n") and line.strip():
        tail.newline_missing = True


def read_head(path: Path) -> dict[str, Any] | None:
    """The first record of a file, or None when it has none yet."""
    with open(path, "rb") as f:
        line = f.readline()
    try:
        record = orjson.loads(line)
        record["seq"], record["event"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return record


def starts_snapshot(record: dict[str, Any] | None) -> bool:
    return record is not None and record["event"] == record_names.LOG_SNAPSHOT and record.get("part", 1) == 1


def segment_seq(name: str) -> int | None:
    """The first seq a segment directory's file name ``<first seq, 20 digits>.jsonl`` names (None: not a segment)."""
    match = SEGMENT_NAME.match(name)
    return int(match.group(1)) if match is not None else None


def archive_seq(log_name: str, name: str) -> int | None:
    """The first seq a single-file log's archive name ``<log_name>.<first seq, 20 digits>`` names (None: not one)."""
    if len(name) != len(log_name) + 21 or not name.startswith(log_name) or name[len(log_name)] != ".":
        return None
    suffix = name[len(log_name) + 1:]
    return int(suffix) if ARCHIVE_SUFFIX.match(suffix) else None


def list_segments(directory: Path) -> list[Path]:
    """The segment files of a directory, oldest first (by the first seq in their names)."""
    found = [(seq, p) for p in directory.iterdir() if (seq := segment_seq(p.name)) is not None]
    return [p for _, p in sorted(found)]


def replay_start(segments: list[Path]) -> int:
    """Index of the newest segment that stands alone: it opens with a snapshot, or with seq 1 (0 when none does)."""
    for index in range(len(segments) - 1, 0, -1):
        head = read_head(segments[index])
        if starts_snapshot(head) or (head is not None and head["seq"] == 1):
            return index
    return 0


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(line)
        record["seq"], record["event"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


def cut_opening(path: Path) -> bool:
    """True when a crash cut this (newest) segment inside its opening: it holds no whole record, or its
    ``log.snapshot`` lacks parts and nothing follows them.

    Such a segment holds nothing its predecessor lacks: a segment is
    written whole (its snapshot) before it is renamed into place, and
    records are appended only after that. A bad line *followed* by more
    data is not a cut: reading it raises ``LogCorrupt`` as usual.
    """
    marker = b'"event":"%s"' % record_names.LOG_SNAPSHOT.encode()
    with open(path, "rb") as f:
        line = f.readline()
        first = _record(line)
        if first is None:
            # No line at all, or one torn (unterminated) line and nothing after it; a complete line that is not
            # a record is no cut (``torn_tail``): reading it raises LogCorrupt.
            return not line.endswith(b"\n") and not f.read(1)
        if not starts_snapshot(first):
            return False
        for _ in range(int(first.get("parts", 1)) - 1):
            line = f.readline()  # the parts are not parsed here: recovery folds them next
            if not line.endswith(b"\n") and _record(line) is None:
                return True  # readline stops short of a newline only at the end of the file
            if marker not in line[:128]:
                return False
        return False


def names_later_segment(path: Path) -> bool:
    """Whether the (torn) bytes of a segment show it followed another: a snapshot, or a first seq above 1."""
    with open(path, "rb") as f:
        head = f.read(4096)
    match = re.match(rb'\s*\{"seq":(\d+)', head)
    return record_names.LOG_SNAPSHOT.encode() in head or (match is not None and int(match.group(1)) > 1)


def archives(path: Path) -> list[Path]:
    """A single-file log's retired segments ``<name>.<first seq, 20 digits>``, oldest first (every one on disk)."""
    name = path.name
    found = [(seq, p) for p in path.parent.glob(f"{glob.escape(name)}.*")
             if (seq := archive_seq(name, p.name)) is not None]
    return [p for _, p in sorted(found)]


def history_files(path: str | Path, *, strays: list[Path] | None = None) -> list[Path]:
    """Every file of a log still on disk, oldest first: THE listing every reader of a log uses (replay,
    recovery, ``audit``, ``report``, ``--verify``, the backtest).

    A directory: its segments ``<first seq>.jsonl``. A file: its archives
    ``<name>.<first seq>`` (rotation retired them), then the file itself. An
    archive that is the active file (an interrupted rotation linked or copied
    the active segment to its archive name, then died before renaming the new
    one over it: the same inode, or named after the active file's own first
    seq) is not history; it is left out, and appended to ``strays`` when
    given (recovery, which may write, removes it). A missing path raises
    ``FileNotFoundError``.
    """
    path = Path(path)
    if path.is_dir():
        return list_segments(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such file or directory", str(path))
    found = archives(path)
    if not found:
        return [path]
    head = read_head(path)
    active = head["seq"] if head is not None and type(head["seq"]) is int else None  # its first seq
    kept = []
    for archive in found:
        if archive.samefile(path) or archive_seq(path.name, archive.name) == active:
            if strays is not None:
                strays.append(archive)
        else:
            kept.append(archive)
    return [*kept, path]


def readable_segments(segments: list[Path]) -> tuple[list[Path], Path | None]:
    """The segments to fold (oldest first, from the newest that stands alone), and the newest one when a
    crash cut it inside its opening snapshot (``cut_opening``): it is left out, its predecessors are read.

    A cut segment with no predecessor on disk is ``LogCorrupt`` when its
    bytes show it followed one (its sessions are gone: refused, never
    silently empty); otherwise it is a new log whose first record was torn.
    """
    if not segments:
        return [], None
    cut = None
    if cut_opening(segments[-1]):
        if len(segments) == 1:
            if names_later_segment(segments[-1]):
                raise LogCorrupt(f"{segments[-1]}: a crash cut the snapshot this segment opens with, and no "
                                 f"earlier segment is on disk to restore its sessions from")
            return segments, None
        cut, segments = segments[-1], segments[:-1]
    return segments[replay_start(segments):], cut


def log_files(path: str | Path, *, history: bool = False) -> list[Path]:
    """The files to read for a log, oldest first, from ``history_files`` (the one listing).

    By default a log is read from its newest snapshot (``readable_segments``:
    a newest segment whose snapshot a crash cut is left out, its predecessors
    are read); ``history`` reads every segment still on disk (the audit
    report, the chart report, ``--verify`` and the backtest want the past).
    """
    path = Path(path)
    if history:
        return history_files(path)
    if path.is_file() and not cut_opening(path):
        return [path]  # the active segment of a file log always stands alone: no listing on replay's path
    return readable_segments(history_files(path))[0]


def read_log(path: str | Path, tail: Tail | None = None, *, history: bool = False,
             light: frozenset[str] = frozenset()) -> Iterator[dict[str, Any]]:
    """Every record of a log (file or segment directory), in seq order, across segments (``light``: read_file's)."""
    files = log_files(path, history=history)
    tail = tail if tail is not None else Tail()
    for index, file in enumerate(files):
        part = Tail()
        yield from read_file(file, part, expect=tail.last_seq, last=index == len(files) - 1, light=light)
        _merge(tail, part)


def fold_files(files: list[Path], state: State, tail: Tail) -> None:
    """Fold several files (segments, oldest first) as one stream; ``tail`` describes the newest."""
    with paused_gc():
        for index, file in enumerate(files):
            part = Tail()
            fold_file(file, state, part, expect=tail.last_seq, last=index == len(files) - 1)
            _merge(tail, part)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC while folding: records are acyclic, and the passes over a growing
    heap of session fields cost ~20% of replay time for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _merge(tail: Tail, part: Tail) -> None:
    if tail.first is None:
        tail.first = part.first
    if part.last_seq is not None:
        tail.last_seq = part.last_seq
    tail.good_end, tail.torn_bytes, tail.newline_missing = part.good_end, part.torn_bytes, part.newline_missing
    tail.chain, tail.chain_end = part.chain, part.chain_end  # the newest file's: where appending resumes


def fold(state: State, record: dict[str, Any]) -> None:
    """Apply one record's changed fields to the live sessions' fields."""
    name = record["event"]
    sid = record.get("session_id")
    if sid is None:
        if name == record_names.LOG_SNAPSHOT:
            if record.get("part", 1) == 1:
                state.clear()
            for snap_sid, fields in record["sessions"].items():
                state[snap_sid] = new_fields(fields)
        return
    if name in STATELESS_RECORDS:
        return
    if name == record_names.SESSION_CREATED:
        state[sid] = new_fields(record)
    elif name in record_names.ENDING_RECORDS:
        state.pop(sid, None)
    else:
        fields = state.get(sid)
        if fields is not None:
            _update(fields, record)


def fields_mapping(fields: Fields) -> dict[str, Any]:
    """A session's fields as a mapping of every Entry field, as snapshots and ``replay`` output store it."""
    return dict(zip(ENTRY_FIELDS, _field_values(fields), strict=True))


_TIERS: dict[Any, Tier | None] = {None: None, "": None, **{t.value: t for t in Tier}}


def to_entry(fields: Fields) -> Entry:
    tier = fields.tier
    if tier not in _TIERS:
        raise LogCorrupt(f"a session's tier is {str(tier)[:20]!r}, not one of SIMPLE, MEDIUM, COMPLEX, REASONING")
    return build_entry(fields.model, _TIERS[tier], fields.created_at, fields.last_used_at, fields.request_count,
                       tuple(fields.recent_hashes), fields.strikes, fields.escalated, fields.user_explicit,
                       fields.cache_sticky, fields.cache_sticky_at, fields.provider, fields.session_cost_micros,
                       fields.deployment, tuple(tuple(r) for r in fields.reservations),
                       tuple(tuple(p) for p in fields.deployments))


def fold_log(path: str | Path, tail: Tail | None = None) -> State:
    """The fields of the live sessions when the log ends."""
    state: State = {}
    fold_files(log_files(path), state, tail if tail is not None else Tail())
    return state


def replay(path: str | Path) -> dict[str, Entry]:
    """The live sessions as they stood when the log ends (a file or a segment directory).

    Expired, cleared and evicted sessions are gone. A torn or garbage last
    line is skipped; a bad line in the middle raises ``LogCorrupt`` naming it.
    A missing path raises ``FileNotFoundError``.
    """
    state = fold_log(path)
    with paused_gc():
        return {sid: to_entry(fields) for sid, fields in state.items()}
