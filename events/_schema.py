"""The value domains of every audit-log record, as one table: the one source of docs/log-schema.json.

Replay, restart recovery and ``session-engine audit --verify`` check records
against this table, so a new record type or field is added here (and in
docs/events.md). Each domain carries its JSON Schema, and docs/log-schema.json
is generated from the table (``python -m events._schema_doc``; the
descriptions are in events/_schema_doc.py): tests/core/test_log_domains.py fails
while the committed file differs, and writes every value of every enumerated
field through both.

A domain is a predicate with a ``rule`` naming what it allows; checks are
plain ``type(v) is int and v >= 0`` tests, fast enough to run on every record
replay reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from events._records import (
    BUDGET_LAPSED,
    BUDGET_RELEASED,
    BUDGET_RESERVED,
    COST_ADDED,
    DECISION_MADE,
    DEPLOYMENT_GROUP_SET,
    DEPLOYMENT_SET,
    HASH_RECORDED,
    INPUT_REJECTED,
    LOG_SIGNED,
    LOG_SNAPSHOT,
    SESSION_CLEARED,
    SESSION_CREATED,
    SESSION_ESCALATED,
    SESSION_EVICTED,
    SESSION_EXPIRED,
    SESSION_REFUSED,
    SESSION_TOUCHED,
    SESSION_UPDATED,
    SHARD_RESTARTED,
    STICKY_EXPIRED,
    STICKY_PINNED,
)
from events._validate import text_problem

__all__ = [
    "ENTRY", "ENTRY_OPTIONAL", "ENVELOPE", "LENIENT_CHECKS", "RECORDS", "REQUIRED_ENVELOPE", "STRICT_CHECKS", "TIERS",
    "record_problem",
]

Check = Callable[[Any], bool]

TIERS = ("SIMPLE", "MEDIUM", "COMPLEX", "REASONING")
_TIER_SET = frozenset(TIERS)
_HEX = frozenset("0123456789abcdef")


def _domain(rule: str, expr: str | None = None, *, json: dict[str, Any], example: Any,
            values: tuple[Any, ...] | None = None) -> Callable[[Check], Check]:
    """Name a predicate's rule; ``expr`` is the same test as an expression over ``v``, inlined by ``_compile``.

    ``json``: the same domain as a JSON Schema (docs/log-schema.json is generated from it, by
    ``python -m events._schema_doc``); ``example``: one value inside it; ``values``: for an
    enumerated domain, every value it allows (tests write each one).
    """
    def name(check: Check) -> Check:
        check.rule = rule  # type: ignore[attr-defined]
        check.expr = expr  # type: ignore[attr-defined]
        check.json = json  # type: ignore[attr-defined]
        check.example = example  # type: ignore[attr-defined]
        check.values = values  # type: ignore[attr-defined]
        return check
    return name


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


_INT0 = {"type": "integer", "minimum": 0}
_STRING = {"type": "string"}


@_domain("an integer >= 0", "type(v) is int and v >= 0", json=_INT0, example=0)
def int0(v: Any) -> bool:
    return type(v) is int and v >= 0


@_domain("an integer >= 1", "type(v) is int and v >= 1", json={"type": "integer", "minimum": 1}, example=1)
def int1(v: Any) -> bool:
    return type(v) is int and v >= 1


# A text domain does not test for lone surrogates (no event accepts one): the log's reader (orjson)
# refuses their escape as bad JSON before a record reaches the table, and the test would cost replay a
# call per text field (measured: up to ~15% of a decision.made check). A session id's domain does test.
@_domain("a string", "type(v) is str", json=_STRING, example="x")
def text(v: Any) -> bool:
    return type(v) is str


@_domain("a string or null", "v is None or type(v) is str", json={"type": ["string", "null"]}, example=None)
def text_or_null(v: Any) -> bool:
    return v is None or type(v) is str


@_domain("true or false", "v is True or v is False", json={"type": "boolean"}, example=False)
def boolean(v: Any) -> bool:
    return v is True or v is False


@_domain("one of SIMPLE, MEDIUM, COMPLEX, REASONING or null", "v is None or (type(v) is str and v in TIERS)",
         json=_ref("tier"), example=None, values=(*TIERS, None))
def tier(v: Any) -> bool:
    return v is None or (type(v) is str and v in _TIER_SET)


@_domain("one of SIMPLE, MEDIUM, COMPLEX, REASONING", "type(v) is str and v in TIERS", json={"enum": list(TIERS)},
         example="SIMPLE", values=TIERS)
def tier_set(v: Any) -> bool:
    return type(v) is str and v in _TIER_SET


@_domain("a list of at most 3 strings", "type(v) is list and len(v) <= 3 and (not v or all(type(h) is str for h in v))",
         json={"type": "array", "items": _STRING, "maxItems": 3}, example=[])
def hashes(v: Any) -> bool:
    return type(v) is list and len(v) <= 3 and all(type(h) is str for h in v)


@_domain("a string of 1 to 256 characters, no control characters or lone surrogates", json=_ref("session_id"),
         example="s")
def session_id(v: Any) -> bool:
    # As the events check a session id (events/_validate.py): no engine writes another.
    return type(v) is str and 0 < len(v) <= 256 and (v.isprintable() or text_problem(v) is None)


@_domain("64 lower-case hex digits", json=_ref("hex64"), example="0" * 64)
def hex64(v: Any) -> bool:
    return type(v) is str and len(v) == 64 and _HEX.issuperset(v)


@_domain("40 or 64 lower-case hex digits (a Redis stream's SHA-1 head, a file's SHA-256 head)", json=_ref("head_hex"),
         example="0" * 64)
def head_hex(v: Any) -> bool:
    return type(v) is str and len(v) in (40, 64) and _HEX.issuperset(v)


@_domain("a list of strings", "type(v) is list and all(type(x) is str for x in v)",
         json={"type": "array", "items": _STRING}, example=[])
def strings(v: Any) -> bool:
    return type(v) is list and all(type(x) is str for x in v)


@_domain("a list of [reservation id, micros >= 0, expires_at >= 0]", json=_ref("reservations"), example=[])
def reservations(v: Any) -> bool:
    return type(v) is list and all(
        type(r) is list and len(r) == 3 and type(r[0]) is str and type(r[1]) is int and r[1] >= 0
        and type(r[2]) is int and r[2] >= 0 for r in v)


@_domain("a list of [model, tier or \"\", deployment]", json=_ref("deployments"), example=[])
def group_deployments(v: Any) -> bool:
    return type(v) is list and all(
        type(r) is list and len(r) == 3 and all(type(x) is str for x in r)
        and r[1] in ("", "SIMPLE", "MEDIUM", "COMPLEX", "REASONING") for r in v)


@_domain("an object of model -> micros >= 0",
         "type(v) is dict and all(type(x) is int and x >= 0 for x in v.values())",
         json={"type": "object", "additionalProperties": _INT0}, example={})
def micros_by_model(v: Any) -> bool:
    return type(v) is dict and all(type(x) is int and x >= 0 for x in v.values())


@_domain("an object", "type(v) is dict", json={"type": "object"}, example={})
def an_object(v: Any) -> bool:
    return type(v) is dict


def const(value: Any) -> Check:
    """Exactly ``value`` (a bool or a string)."""
    return _domain(f"exactly {value!r}", json={"const": value}, example=value, values=(value,))(
        lambda v: v is value if isinstance(value, bool) else (type(v) is str and v == value))


def one_of(*values: str) -> Check:
    """One of the strings ``values``."""
    allowed = frozenset(values)
    return _domain("one of " + ", ".join(map(str, values)), json={"enum": list(values)}, example=values[0],
                   values=values)(lambda v: type(v) is str and v in allowed)


#: Every Entry field (a snapshot holds all of them for each session; session.created too).
ENTRY: dict[str, Check] = {
    "model": text, "tier": tier, "created_at": int0, "last_used_at": int0, "request_count": int0,
    "recent_hashes": hashes, "strikes": int0, "escalated": boolean, "user_explicit": boolean,
    "cache_sticky": boolean, "cache_sticky_at": int0, "provider": text, "session_cost_micros": int0,
    "deployment": text,
}
#: Entry fields a record may lack (written since they were added; replay reads their defaults).
ENTRY_OPTIONAL: dict[str, Check] = {"reservations": reservations, "deployments": group_deployments}


def entry_problem(fields: Any, strict: bool = True) -> tuple[str, str] | None:
    """(field, rule) for the first Entry field out of its domain (``strict``: also unknown or missing); or None."""
    if type(fields) is not dict:
        return "", "an object of Entry fields"
    for key, value in fields.items():
        check = ENTRY.get(key) or ENTRY_OPTIONAL.get(key)
        if check is None:
            if strict:
                return key, "not a field of an Entry"
            continue
        if not check(value):
            return key, check.rule  # type: ignore[attr-defined]
    if strict:
        missing = next((k for k in ENTRY if k not in fields), None)
        if missing is not None:
            return missing, "required"
    return None


@_domain("an object of session id -> every Entry field",
         json={"type": "object", "additionalProperties": _ref("entry"), "propertyNames": _ref("session_id")},
         example={})
def sessions(v: Any) -> bool:
    return type(v) is dict and all(session_id(k) and entry_problem(f, False) is None for k, f in v.items())


#: Fields every record may carry: the envelope, and the hash chain's (docs/audit-log.md).
ENVELOPE: dict[str, Check] = {"seq": int1, "ts": int0, "event": text, "chain": hex64, "genesis": hex64}
REQUIRED_ENVELOPE = ("seq", "ts", "event")

#: Record name -> (required fields, {field: domain} of every field it may carry besides the envelope).
RECORDS: dict[str, tuple[tuple[str, ...], dict[str, Check]]] = {
    SESSION_CREATED: (("session_id", *ENTRY), {"session_id": session_id, **ENTRY, **ENTRY_OPTIONAL,
                                                 "cause": one_of("cost", "budget_ledger", "deployment")}),
    SESSION_UPDATED: (("session_id", "last_used_at", "request_count"), {
        "session_id": session_id, "last_used_at": int0, "request_count": int0, "model": text, "tier": tier,
        "user_explicit": const(True)}),
    SESSION_TOUCHED: (("session_id", "last_used_at", "request_count"), {
        "session_id": session_id, "last_used_at": int0, "request_count": int0}),
    HASH_RECORDED: (("session_id", "recent_hashes", "strikes"), {
        "session_id": session_id, "recent_hashes": hashes, "strikes": int0}),
    SESSION_ESCALATED: (("session_id", "tier", "escalated", "reason", "from_tier"), {
        "session_id": session_id, "tier": tier_set, "escalated": const(True), "reason": text, "from_tier": tier,
        "strikes": int0}),
    COST_ADDED: (("session_id", "micros", "session_cost_micros"), {
        "session_id": session_id, "micros": int0, "session_cost_micros": int0, "reservation_id": text,
        "estimate_micros": int0, "reservations": reservations, "prompt_tokens": int0, "completion_tokens": int0}),
    STICKY_PINNED: (("session_id", "cache_sticky", "cache_sticky_at", "provider", "ttl_ms"), {
        "session_id": session_id, "cache_sticky": const(True), "cache_sticky_at": int0, "provider": text,
        "ttl_ms": int0}),
    STICKY_EXPIRED: (("session_id", "cache_sticky", "idle_ms"), {
        "session_id": session_id, "cache_sticky": const(False), "idle_ms": int0}),
    DEPLOYMENT_SET: (("session_id", "deployment", "previous"), {
        "session_id": session_id, "deployment": text, "previous": text}),
    DEPLOYMENT_GROUP_SET: (("session_id", "group_model", "group_tier", "group_deployment", "previous",
                              "deployments"), {
        "session_id": session_id, "group_model": text, "group_tier": one_of("", "SIMPLE", "MEDIUM", "COMPLEX",
                                                                            "REASONING"),
        "group_deployment": text, "previous": text, "deployments": group_deployments}),
    DECISION_MADE: (("session_id", "kind"), {
        "session_id": session_id, "kind": text, "model": text, "tier": tier, "provider": text, "reason": text,
        "strategy": text, "source": text, "deployment": text, "requested_model": text, "requested_tier": tier,
        "request_hash": text, "tools": const(True), "stall": const(True), "tool_repeats": int1, "tool_errors": int1,
        "keyword": text, "downgrade": const(True), "lift": const(True), "candidates": strings,
        "estimate_micros": int0, "limit_micros": int0, "spent_micros": int0, "reserved_micros": int0,
        "reservation_id": text, "explicit": const(True), "long_context": const(True),
        "estimates": micros_by_model, "rules": an_object}),
    BUDGET_RESERVED: (("session_id", "reservation_id", "micros", "expires_at", "reservations"), {
        "session_id": session_id, "reservation_id": text, "micros": int1, "expires_at": int0,
        "reservations": reservations}),
    BUDGET_RELEASED: (("session_id", "reservation_id", "micros", "reservations"), {
        "session_id": session_id, "reservation_id": text, "micros": int0, "reservations": reservations}),
    BUDGET_LAPSED: (("session_id", "reservation_ids", "micros", "reservations"), {
        "session_id": session_id, "reservation_ids": strings, "micros": int0, "reservations": reservations}),
    SESSION_EXPIRED: (("session_id", "reason", "idle_ms"), {
        "session_id": session_id, "reason": const("idle"), "idle_ms": int0}),
    SESSION_EVICTED: (("session_id", "reason"), {
        "session_id": session_id, "reason": one_of("capacity", "tenant_limit")}),
    SESSION_CLEARED: (("session_id", "reason"), {"session_id": session_id, "reason": one_of("cleared", "clear_all")}),
    SESSION_REFUSED: (("session_id", "reason", "limit"), {
        "session_id": session_id, "reason": const("tenant_rate"), "limit": int1}),
    INPUT_REJECTED: (("operation", "field", "rule"), {
        "session_id": session_id, "operation": text, "field": text, "rule": text}),
    SHARD_RESTARTED: (("shard", "error", "sessions"), {"shard": int0, "error": text_or_null, "sessions": int0}),
    LOG_SNAPSHOT: (("part", "parts", "live", "sessions"), {
        "part": int1, "parts": int1, "live": int0, "sessions": sessions, "chain_head": hex64, "signature": hex64}),
    LOG_SIGNED: (("head_seq", "head", "signature"), {"head_seq": int0, "head": head_hex, "signature": hex64}),
}

#: Record name -> {field: domain} including the envelope: what a check looks up per key.
FIELDS: dict[str, dict[str, Check]] = {name: {**ENVELOPE, **fields} for name, (_, fields) in RECORDS.items()}
REQUIRED: dict[str, tuple[str, ...]] = {name: (*REQUIRED_ENVELOPE, *req) for name, (req, _) in RECORDS.items()}


def _compile(name: str, fields: dict[str, Check], required: tuple[str, ...], strict: bool) -> Callable[..., Any]:
    """One function per record type that tests every field inline (no call per field) and returns the first
    bad field's name ("" for an unknown field), or None. Generated from the table, so the table stays the
    one place; ``record_problem`` explains what it finds."""
    env: dict[str, Any] = {"M": _MISSING, "TIERS": _TIER_SET}
    lines = ["def check(r):", "    n = 0"]
    for i, (key, check) in enumerate(fields.items()):
        expr = check.expr or f"_c{i}(v)"  # type: ignore[attr-defined]
        env[f"_c{i}"] = check
        lines.append(f"    v = r.get({key!r}, M)")
        if strict and key in required:
            lines.append(f"    if v is M: return {key!r}")
        lines.append("    if v is not M:")
        if strict:
            lines.append("        n += 1")
        lines.append(f"        if not ({expr}): return {key!r}")
    if strict:
        lines.append("    if n != len(r): return ''")
    lines.append("    return None")
    exec(compile("\n".join(lines), f"<record check {name}>", "exec"), env)  # code generated from the table above
    return env["check"]


_MISSING = object()
#: Record name -> its generated check (lenient: replay; strict: --verify); record_problem explains a failure.
LENIENT_CHECKS = {name: _compile(name, fields, REQUIRED[name], False) for name, fields in FIELDS.items()}
STRICT_CHECKS = {name: _compile(name, fields, REQUIRED[name], True) for name, fields in FIELDS.items()}


def record_problem(record: dict[str, Any], *, strict: bool = True) -> tuple[str, str] | None:
    """(field, rule) for the first way ``record`` breaks its record type's domains; None when it keeps them.

    Always a problem: an unknown event name, a known field whose value is out
    of its domain. Only when ``strict`` (``audit --verify``): a field the
    record type does not have, a required field missing. Replay is not
    strict, so that logs written by older (fewer fields) or newer (more
    fields) versions still replay.
    """
    name = record.get("event")
    check = (STRICT_CHECKS if strict else LENIENT_CHECKS).get(name) if type(name) is str else None
    if check is None:
        return "event", "a record name from docs/events.md"
    if check(record) is None:
        if strict and name == LOG_SNAPSHOT:
            problem = _snapshot_problem(record["sessions"], True)
            if problem[0] != "sessions":
                return problem
        return None
    return _explain(record, name, strict)


def _explain(record: dict[str, Any], name: str, strict: bool) -> tuple[str, str] | None:
    """The slow, plain reading of the table: names the field and the rule (only for a record that failed)."""
    fields = FIELDS[name]
    for key, value in record.items():
        check = fields.get(key)
        if check is None:
            if strict:
                return key, f"not a field of {name}"
            continue
        if not check(value):
            if key == "sessions" and type(value) is dict:
                return _snapshot_problem(value, False)
            return key, check.rule  # type: ignore[attr-defined]
    if strict:
        for key in REQUIRED[name]:
            if key not in record:
                return key, "required"
    return None


def _snapshot_problem(value: dict[str, Any], strict: bool) -> tuple[str, str]:
    """The first bad session of a snapshot's ``sessions`` (("sessions", rule) when none is)."""
    for sid, fields in value.items():
        if not session_id(sid):
            return "sessions", "session ids of 1 to 256 characters"
        problem = entry_problem(fields, strict)
        if problem is not None:
            return f"sessions.{sid[:40]}.{problem[0]}", problem[1]
    return "sessions", sessions.rule  # type: ignore[attr-defined]
