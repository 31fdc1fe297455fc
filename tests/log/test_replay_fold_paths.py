"""Replay's fast fold gives what the documented fold gives, for records of any shape, and names bad lines.

``engine.log.replay.fold_file`` sets only the two fields a common record carries
when the record has exactly the keys this version writes; anything else (an
older or newer writer's record, a hand-edited one) must fold like
docs/events.md says: every key that names an Entry field takes its value.
The oracle below is that rule written out plainly, with dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import LogCorrupt, replay
from engine.log.replay import ENTRY_DEFAULTS, ENTRY_FIELDS, Tail, fields_mapping, fold_file, fold_log
from events import records as record_names
from events._schema import record_problem

SIDS = ["a", "b"]
#: Keys replay must ignore (explanatory fields some records carry).
EXTRA_KEYS = ["micros", "reason", "idle_ms", "ttl_ms", "from_tier", "previous", "cause", "kind"]
#: The shapes this version writes for the records replay takes a fast path for.
WRITTEN = {
    record_names.SESSION_TOUCHED: ["last_used_at", "request_count"],
    record_names.SESSION_UPDATED: ["last_used_at", "request_count"],
    record_names.HASH_RECORDED: ["recent_hashes", "strikes"],
    record_names.COST_ADDED: ["micros", "session_cost_micros"],
}
VALUES: dict[str, Any] = {
    "model": st.sampled_from(["m1", "m2", ""]), "tier": st.sampled_from([None, "SIMPLE", "COMPLEX", ""]),
    "created_at": st.integers(0, 10**13), "last_used_at": st.integers(0, 10**13),
    "request_count": st.integers(0, 10**6), "recent_hashes": st.lists(st.sampled_from(["h1", "h2"]), max_size=3),
    "strikes": st.integers(0, 5), "escalated": st.booleans(), "user_explicit": st.booleans(),
    "cache_sticky": st.booleans(), "cache_sticky_at": st.integers(0, 10**13),
    "provider": st.sampled_from(["", "openai", "anthropic"]), "session_cost_micros": st.integers(0, 10**9),
    "deployment": st.sampled_from(["", "eu-1"]),
}


@st.composite
def record(draw: Any) -> dict[str, Any]:
    """A per-session record: often exactly a written shape, otherwise keys added, dropped or swapped."""
    name = draw(st.sampled_from([*WRITTEN, *WRITTEN, record_names.SESSION_CREATED, *record_names.RECORD_NAMES]))
    if name == record_names.LOG_SNAPSHOT:
        name = record_names.SESSION_CREATED
    keys = list(WRITTEN.get(name, ENTRY_FIELDS if name == record_names.SESSION_CREATED else []))
    shape = draw(st.sampled_from(["written", "written", "extra field", "no ts", "missing", "swapped", "random"]))
    if shape in ("missing", "swapped") and keys:
        keys.remove(draw(st.sampled_from(keys)))
    if shape in ("extra field", "swapped"):
        keys.append(draw(st.sampled_from(ENTRY_FIELDS)))
    elif shape == "random":
        keys = draw(st.lists(st.sampled_from([*ENTRY_FIELDS, *EXTRA_KEYS]), max_size=5))
    out: dict[str, Any] = {"seq": 0}
    if shape != "no ts":
        out["ts"] = 1
    out["event"] = name
    out["session_id"] = draw(st.sampled_from(SIDS))
    for key in keys:
        out[key] = draw(VALUES[key]) if key in VALUES else draw(st.sampled_from(["x", 7]))
    return out


def documented_fold(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """docs/events.md's rule: created sets every field (defaults for missing ones), endings drop the
    session, stateless records change nothing, any other record sets the Entry fields it carries."""
    state: dict[str, dict[str, Any]] = {}
    for rec in records:
        name, sid = rec["event"], rec.get("session_id")
        if name == record_names.SESSION_CREATED:
            state[sid] = {k: rec.get(k, d) for k, d in zip(ENTRY_FIELDS, ENTRY_DEFAULTS, strict=True)}
        elif name in record_names.ENDING_RECORDS:
            state.pop(sid, None)
        elif name not in (record_names.DECISION_MADE, record_names.INPUT_REJECTED, record_names.SHARD_RESTARTED,
                          record_names.SESSION_REFUSED) and sid in state:
            state[sid].update({k: v for k, v in rec.items() if k in ENTRY_FIELDS})
    return state


def write(path: Path, records: list[dict[str, Any]]) -> None:
    for seq, rec in enumerate(records, 1):
        rec["seq"] = seq
    path.write_bytes(b"".join(orjson.dumps(rec) + b"\n" for rec in records))


def first_out_of_domain(records: list[dict[str, Any]]) -> int | None:
    """The seq of the first record with a value outside docs/events.md's domains (replay refuses it)."""
    return next((r["seq"] for r in records if record_problem(r, strict=False) is not None), None)


@settings(max_examples=400, deadline=None)
@given(st.lists(record(), min_size=2, max_size=40))
def test_records_of_any_shape_fold_as_documented(tmp_path_factory: Any, records: list[dict[str, Any]]) -> None:
    path = tmp_path_factory.mktemp("log") / "audit.jsonl"
    write(path, records)
    bad = first_out_of_domain(records)
    if bad is not None:
        with pytest.raises(LogCorrupt, match=rf"seq {bad}: "):
            fold_log(path)
        return
    folded = {sid: fields_mapping(fields) for sid, fields in fold_log(path).items()}
    assert folded == documented_fold(records)


#: Two values inside each field's domain (replay refuses values outside them: docs/events.md).
IN_DOMAIN: dict[str, tuple[Any, Any]] = {
    "model": ("m5", "m9"), "tier": ("SIMPLE", "COMPLEX"), "recent_hashes": (["h5"], ["h9"]), "escalated": (True, True),
    "user_explicit": (True, True), "cache_sticky": (True, True), "provider": ("p5", "p9"),
    "deployment": ("d5", "d9"), "micros": (5, 9), "reservations": ([["r5", 5, 5]], [["r9", 9, 9]]),
    "deployments": ([["m5", "SIMPLE", "d5"]], [["m9", "", "d9"]]),
    **{f: (5, 9) for f in ("created_at", "last_used_at", "request_count", "strikes", "cache_sticky_at",
                           "session_cost_micros", "ts")},
}


def test_every_near_miss_of_a_written_shape_folds_as_documented(tmp_path: Path) -> None:
    """Each fast-path record with one of its keys (or ts) swapped for an Entry field, or one field added:
    one session per variant, so the final state shows what each record did."""
    records = []
    for name, keys in WRITTEN.items():
        for dropped in [*keys, "ts", None]:
            for field in ENTRY_FIELDS:
                sid = f"{name}-{dropped}-{field}"
                rec: dict[str, Any] = {"ts": 2, "event": name, "session_id": sid}
                rec.update({key: IN_DOMAIN[key][0] for key in keys})
                rec.pop(dropped, None)
                rec.setdefault(field, IN_DOMAIN[field][1])
                records += [{"ts": 1, "event": record_names.SESSION_CREATED, "session_id": sid, "model": "m"}, rec]
    write(tmp_path / "audit.jsonl", records)
    folded = {sid: fields_mapping(fields) for sid, fields in fold_log(tmp_path / "audit.jsonl").items()}
    assert folded == documented_fold(records)


def test_a_touch_carrying_a_field_it_does_not_usually_carry_still_sets_it(tmp_path: Path) -> None:
    created = {"ts": 1, "event": record_names.SESSION_CREATED, "session_id": "a", "model": "m", "tier": "SIMPLE",
               "created_at": 1, "last_used_at": 1, "request_count": 1, "recent_hashes": [], "strikes": 0,
               "escalated": False, "user_explicit": False, "cache_sticky": False, "cache_sticky_at": 0,
               "provider": "", "session_cost_micros": 0, "deployment": ""}
    # Six keys like a touch, but strikes instead of ts; and a touch with ts and a seventh key.
    odd = {"event": record_names.SESSION_TOUCHED, "session_id": "a", "last_used_at": 5, "request_count": 2,
           "strikes": 3}
    wide = {"ts": 9, "event": record_names.SESSION_TOUCHED, "session_id": "a", "last_used_at": 9, "request_count": 3,
            "model": "m2"}
    write(tmp_path / "audit.jsonl", [created, odd, wide])
    entry = replay(tmp_path / "audit.jsonl")["a"]
    assert (entry.strikes, entry.model, entry.last_used_at, entry.request_count) == (3, "m2", 9, 3)


def lines_with_blanks(tmp_path: Path) -> list[bytes]:
    records = [{"ts": 1, "event": record_names.SESSION_TOUCHED, "session_id": "a", "last_used_at": 1,
                "request_count": 1}
               for _ in range(6)]
    write(tmp_path / "audit.jsonl", records)
    lines = (tmp_path / "audit.jsonl").read_bytes().splitlines(keepends=True)
    return [lines[0], b"\n", b"   \n", *lines[1:]]  # lines 2 and 3 are blank: skipped, but counted


def test_a_corrupt_line_after_blank_lines_is_named_by_its_line_number(tmp_path: Path) -> None:
    lines = lines_with_blanks(tmp_path)
    lines[4] = b'{"seq":3,"ts":1,"eve\n'
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(LogCorrupt, match=r"audit\.jsonl line 5: not a JSON log record"):
        replay(tmp_path / "audit.jsonl")


def test_a_seq_gap_after_blank_lines_is_named_by_its_line_number(tmp_path: Path) -> None:
    lines = lines_with_blanks(tmp_path)
    del lines[4]
    (tmp_path / "audit.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(LogCorrupt, match=r"audit\.jsonl line 5: seq 4 does not follow 2"):
        replay(tmp_path / "audit.jsonl")


def test_a_first_seq_that_is_not_an_int_is_named_by_its_line_number(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").write_bytes(b'\n{"seq":"1","ts":1,"event":"session.touched","session_id":"a"}\n')
    with pytest.raises(LogCorrupt, match=r"audit\.jsonl line 2: seq must be an int"):
        replay(tmp_path / "audit.jsonl")


def test_a_torn_tail_past_the_read_buffer_is_measured_exactly(tmp_path: Path) -> None:
    """A log larger than the reader's 1 MiB buffer: the torn line is skipped and the good part measured."""
    records = [{"ts": 1, "event": record_names.SESSION_CREATED, "session_id": f"s{i}", "model": "m" * 200}
               for i in range(8_000)]
    write(tmp_path / "audit.jsonl", records)
    good = (tmp_path / "audit.jsonl").stat().st_size
    with open(tmp_path / "audit.jsonl", "ab") as f:
        f.write(b'{"seq":8001,"ts":1,"event":"sess')
    tail = Tail()
    state: dict[str, Any] = {}
    fold_file(tmp_path / "audit.jsonl", state, tail)
    assert (len(state), tail.last_seq, tail.good_end, tail.torn_bytes) == (8_000, 8_000, good, 32)
    assert not tail.newline_missing
