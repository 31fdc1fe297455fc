"""events/_schema.py (the table replay and --verify check) and docs/log-schema.json say the same thing.

A new record type or field goes into both; this test fails until they agree
field by field: same names, same required fields, and every probe value
accepted by one is accepted by the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from events import records as record_names
from events._schema import ENTRY, ENTRY_OPTIONAL, ENVELOPE, RECORDS, TIERS, record_problem
from events._schema_doc import json_schema

SCHEMA = orjson.loads((Path(__file__).resolve().parents[2] / "docs" / "log-schema.json").read_bytes())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
PROBES: list[Any] = [-1, 0, 1, 2, 10**15, 1.5, "", "x", "SIMPLE", "REASONING", "HUGE", "idle", "capacity", "cleared",
                     "clear_all", "cost", None, True, False, [], ["h"], ["h", "h", "h"], ["h"] * 4, [1], {}, "a" * 257,
                     "0" * 64, "A" * 64, "0" * 63, "0" * 40, "0" * 41, "a\tb", "\x7f", "\x9f", "\u2028 sep", "会话"]


def _validator(subschema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], **subschema})


@pytest.mark.parametrize("name", record_names.RECORD_NAMES)
def test_each_record_type_has_the_same_fields_and_domains_in_the_table_and_the_schema(name: str) -> None:
    definition = SCHEMA["$defs"][name]
    required, fields = RECORDS[name]
    assert set(definition["required"]) == set(required)
    schema_fields = {k for k, v in definition["properties"].items() if v is not True}
    assert schema_fields == set(fields) | {"chain", "genesis"}
    for field, check in {**fields, "chain": ENVELOPE["chain"], "genesis": ENVELOPE["genesis"]}.items():
        if field == "sessions":
            continue  # below: the Entry table
        validator = _validator(definition["properties"][field])
        for probe in PROBES:
            assert validator.is_valid(probe) == check(probe), (name, field, probe)


def test_the_entry_table_matches_the_schema_entry() -> None:
    entry = SCHEMA["$defs"]["entry"]
    assert set(entry["required"]) == set(ENTRY)
    assert set(entry["properties"]) == set(ENTRY) | set(ENTRY_OPTIONAL)  # optional: added later (reservations)
    for field, check in {**ENTRY, **ENTRY_OPTIONAL}.items():
        validator = _validator(entry["properties"][field])
        for probe in PROBES:
            assert validator.is_valid(probe) == check(probe), (field, probe)


def test_the_envelope_and_the_event_names_match() -> None:
    assert SCHEMA["properties"]["event"]["enum"] == list(record_names.RECORD_NAMES) == list(RECORDS)
    for field in ("seq", "ts"):
        validator = _validator(SCHEMA["properties"][field])
        for probe in PROBES:
            assert validator.is_valid(probe) == ENVELOPE[field](probe), (field, probe)


def test_a_strict_check_names_unknown_and_missing_fields_a_lenient_one_does_not() -> None:
    record = {"seq": 1, "ts": 0, "event": "session.touched", "session_id": "a", "last_used_at": 1, "colour": "red"}
    assert record_problem(record) == ("colour", "not a field of session.touched")
    assert record_problem(record, strict=False) is None
    del record["colour"]
    assert record_problem(record) == ("request_count", "required")
    assert record_problem({**record, "request_count": True}, strict=False) == ("request_count", "an integer >= 0")


@pytest.mark.parametrize("sid", ["a\tb", "new\nline", "\x00", "del\x7f", "c1\x85", "\ud800", "lone \udcff"])
def test_a_session_id_no_event_accepts_is_out_of_its_domain(sid: str) -> None:
    """The events refuse control characters and lone surrogates in a session id (events/_validate.py), so no
    engine writes one: a log holding one is corrupt, named by the reader, not a crash deep in a re-run."""
    record = {"seq": 1, "ts": 0, "event": "session.touched", "session_id": sid, "last_used_at": 1, "request_count": 1}
    assert record_problem(record) == ("session_id",
                                      "a string of 1 to 256 characters, no control characters or lone surrogates")
    assert record_problem(record, strict=False) is not None
    assert record_problem({**record, "session_id": "ünïcødé \u2028 会话"}) is None


# -- one source: the committed schema is the one the table generates --------------------------------------

def test_the_committed_schema_is_the_one_the_table_generates() -> None:
    from events._schema_doc import REGENERATE, SCHEMA_PATH, render

    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(), (
        f"docs/log-schema.json is stale: events/_schema.py changed; run `{REGENERATE}` and commit the file")
    assert json_schema() == SCHEMA


def _valid_record(name: str) -> dict[str, Any]:
    """A record of type ``name`` holding every required field, each with its domain's example."""
    required, fields = RECORDS[name]
    record: dict[str, Any] = {"seq": 1, "ts": 0, "event": name}
    for key in required:
        record[key] = fields[key].example  # type: ignore[attr-defined]
    return record


def _enumerated() -> list[tuple[str, str]]:
    return [(name, key) for name, (_, fields) in RECORDS.items() for key, check in fields.items()
            if getattr(check, "values", None) is not None]


def _outside(values: tuple[Any, ...]) -> list[Any]:
    """Values next to an enumerated domain: a string in none, and the opposite of a bool constant."""
    out: list[Any] = ["not-" + "-".join(str(v) for v in values), 7]
    out += [not v for v in values if isinstance(v, bool)]
    out += [v.lower() + " " for v in values if isinstance(v, str)]
    return out


@pytest.mark.parametrize("name", record_names.RECORD_NAMES)
def test_every_record_type_has_a_valid_example(name: str) -> None:
    record = _valid_record(name)
    assert record_problem(record) is None and record_problem(record, strict=False) is None
    assert VALIDATOR.is_valid(record), [e.message for e in VALIDATOR.iter_errors(record)]


@pytest.mark.parametrize(("name", "field"), _enumerated())
def test_every_value_of_every_enumerated_field_is_accepted_by_the_table_and_the_schema(name: str, field: str) -> None:
    """Not probes: each value the domain lists is written into a valid record and read back by the strict
    (--verify) and lenient (replay) checks and the JSON Schema; a value next to the domain by all three refused."""
    check = RECORDS[name][1][field]
    values = check.values  # type: ignore[attr-defined]
    assert values
    for value in values:
        record = {**_valid_record(name), field: value}
        assert record_problem(record) is None, (name, field, value)
        assert record_problem(record, strict=False) is None, (name, field, value)
        assert VALIDATOR.is_valid(record), (name, field, value)
    for value in _outside(values):
        record = {**_valid_record(name), field: value}
        assert record_problem(record) == (field, check.rule), (name, field, value)  # type: ignore[attr-defined]
        assert record_problem(record, strict=False) == (field, check.rule), (name, field, value)  # type: ignore[attr-defined]
        assert not VALIDATOR.is_valid(record), (name, field, value)


def test_the_enumerated_domains_hold_every_value_the_engine_writes() -> None:
    """The values the writer's code emits (engine/core/transitions.py, engine/shell/capacity.py,
    engine/distributed/redis_host.py), each in its domain: a value added on one side only fails here."""
    from engine.shell.capacity import CAPACITY, TENANT_LIMIT, TENANT_RATE

    def values(name: str, field: str) -> tuple[Any, ...]:
        return RECORDS[name][1][field].values  # type: ignore[attr-defined]

    assert set(values(record_names.SESSION_EVICTED, "reason")) == {CAPACITY, TENANT_LIMIT}
    assert set(values(record_names.SESSION_REFUSED, "reason")) == {TENANT_RATE}
    assert set(values(record_names.SESSION_CLEARED, "reason")) == {"cleared", "clear_all"}
    assert set(values(record_names.SESSION_EXPIRED, "reason")) == {"idle"}
    assert set(values(record_names.SESSION_CREATED, "cause")) == {"cost", "budget_ledger", "deployment"}
    assert set(values(record_names.DEPLOYMENT_GROUP_SET, "group_tier")) == {"", *TIERS}
