"""docs/log-schema.json, generated from the value domains of events/_schema.py and the descriptions below.

The table in events/_schema.py is the one source of the log's value domains:
each domain carries its JSON Schema (``check.json``), and this module puts
them together with the descriptions. ``python -m events._schema_doc``
rewrites docs/log-schema.json; ``python -m events._schema_doc --check`` exits
1 when the committed file differs (tests/core/test_log_domains.py fails then too).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from events import _schema as schema
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
    RECORD_NAMES,
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

__all__ = [
    "REGENERATE", "SCHEMA_PATH", "json_schema", "render",
]

#: Where the generated schema lives in a checkout.
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "log-schema.json"
#: The command that regenerates it (named by the tests when the file is stale).
REGENERATE = "python -m events._schema_doc"

TITLE = "session-engine audit-log record"
DESCRIPTION = ("One line of the audit log (JSON lines). docs/events.md describes each record; docs/audit-log.md the "
               "file format.")

ENVELOPE_DESCRIPTIONS = {
    "seq": "1, 2, 3 ... with no gap, across segments and restarts.",
    "ts": "Unix time in ms of the transition.",
    "event": "The record name.",
}

RECORD_DESCRIPTIONS: dict[str, str] = {
    SESSION_CREATED: (
        'A session began: every Entry field. cause="cost" marks a cost-only entry made by a cost report for an '
        'unknown session; cause="budget_ledger" the budget ledger an idle-expired session leaves for the rest of '
        'its budget window; cause="deployment" an entry made for a deployment pin of strategy none (no model '
        "pinned). reservations (open budget reservations) and deployments (deployment pins per model group and "
        "tier) were added later; older records lack them."),
    SESSION_UPDATED: ("set_session on an existing session: a request; model and tier when the model changed; "
                        "user_explicit when it became true."),
    SESSION_TOUCHED: "touch_session: a request that keeps the pin.",
    HASH_RECORDED: "record_request_hash: the last three hashes and the strike count.",
    SESSION_ESCALATED: ('The tier went one step up (reason "strikes" for auto-escalation, else the caller\'s '
                          "reason)."),
    COST_ADDED: (
        "add_session_cost: the amount added and the new total, in micro-USD (the total never passes 2^63-1: a "
        "cost that would push it past is refused, input.rejected). A settlement (Cost with the reservation_id of "
        "an open reservation) also carries the reservation it closed, the estimate it held (replaced by micros, "
        "which may then be 0) and the reservations left open; token counts when the caller reported them."),
    STICKY_PINNED: "set_cache_sticky: the session is pinned to a provider while its prefix cache is warm.",
    STICKY_EXPIRED: "The cache pin ended: the session was idle past the provider's cache TTL.",
    DEPLOYMENT_SET: "The deployment that served the session changed.",
    DEPLOYMENT_GROUP_SET: (
        "The deployment pin of one (model group, tier) changed: a SIMPLE bypass, a budget downgrade or strategy "
        'none was served by group_deployment (previous: the one pinned before, "" when none); deployments is the '
        "session's full list after the change. The pinned model's deployment (deployment.set) is left alone."),
    DECISION_MADE: (
        "A routing decision taken for the session; changes no session state (its model and tier describe the "
        "decision). A routed request (Route) also carries its inputs: requested model and tier, request hash, "
        "tool use, candidates, estimate, and the budget figures when a cap applies."),
    BUDGET_RESERVED: (
        "A routed request's estimate is held against the session's budget until settled (cost.added with its "
        "reservation_id), released (budget.released) or lapsed (budget.lapsed)."),
    BUDGET_RELEASED: "A reservation given back without cost (the call failed, or the engine answered too late).",
    BUDGET_LAPSED: ("Reservations not settled within their TTL (reservation_ttl_ms) end, so a crashed caller "
                      "cannot hold budget for ever."),
    SESSION_EXPIRED: "The session ended: idle longer than timeout_ms.",
    SESSION_EVICTED: (
        "The session ended: the least recently used one when max_sessions was exceeded (reason capacity), or its "
        "tenant's least recently used one when that tenant exceeded max_sessions_per_tenant (reason tenant_limit)."),
    SESSION_CLEARED: 'The session ended: clear_session (reason "cleared") or clear_all (reason "clear_all").',
    SESSION_REFUSED: ("A new session was not created: its tenant (the session id's scope) was past "
                        "max_creations_per_tenant_per_minute. Changes no state."),
    INPUT_REJECTED: (
        "A store call was refused (InvalidEvent); the offending value is never logged. session_id only when it "
        "was valid. Most are refused when the event is built; a cost that would push the session's total past "
        "2^63-1 micro-USD is refused in the session's turn (field micros)."),
    SHARD_RESTARTED: "A shard actor failed and was restarted with its committed sessions.",
    LOG_SNAPSHOT: ("One part of a snapshot of every live session, at the head of a new segment. Part 1 replaces "
                     "the folded state; parts 2..parts add to it."),
    LOG_SIGNED: (
        "The chain head signed with HMAC-SHA256 under the key in SESSION_ENGINE_AUDIT_KEY, written on close when "
        "a key is set; in a Redis bucket stream, the SHA-1 head of the entry just before it (docs/audit-log.md)."),
}

FIELD_DESCRIPTIONS: dict[tuple[str, str], str] = {
    (COST_ADDED, "prompt_tokens"): "The response's prompt tokens, when the caller reported them.",
    (COST_ADDED, "completion_tokens"): "The response's completion tokens, when the caller reported them.",
    (DECISION_MADE, "requested_model"): "The router's own model for the request.",
    (DECISION_MADE, "request_hash"): "The request's three-strike hash (never prompt text).",
    (DECISION_MADE, "tools"): "The request defined tools.",
    (DECISION_MADE, "stall"): ("The caller read a stall signal itself (a strike); logs of the \"strikes\" "
                                 "detector that carry no tool_errors record its STALL_ERRORS verdict so."),
    (DECISION_MADE, "tool_repeats"): (
        'Under the "window" stall detector: how many of the request\'s last stall_window tool calls repeat the '
        "newest (same name, arguments and result); absent below 2."),
    (DECISION_MADE, "tool_errors"): ('Under the "window" stall detector: how many tool calls in a row, ending '
                                       "with the newest, returned an error; absent when the newest did not. Under "
                                       'the "strikes" detector: how many times in a row the same tool call returned '
                                       "an error (STALL_ERRORS of them are a strike, applied in the turn)."),
    (DECISION_MADE, "keyword"): ("The escalation keyword the last user message contained "
                                   "(Options.escalation_keywords)."),
    (DECISION_MADE, "downgrade"): ("The budget rule served the cheapest configured tier instead of the chosen "
                                     "model (a graceful downgrade; kind bypass, the pin kept)."),
    (DECISION_MADE, "lift"): ("A stall was served one configured tier up for this request only (stall_lift; kind "
                                "bypass, the pin kept, no session.escalated): counted as an escalation."),
    (DECISION_MADE, "candidates"): "Deployment keys the router offered.",
    (DECISION_MADE, "estimate_micros"): "This request's estimate for the chosen model.",
    (DECISION_MADE, "limit_micros"): "The budget cap (only when a cap applies).",
    (DECISION_MADE, "spent_micros"): "Settled spend before this request.",
    (DECISION_MADE, "reserved_micros"): "Budget held by open reservations before this request.",
    (DECISION_MADE, "reservation_id"): "The reservation this request holds (budget.reserved).",
    (DECISION_MADE, "explicit"): "The user named the model (Request.user_explicit).",
    (DECISION_MADE, "long_context"): ("The context was long enough for a provider prefix cache to matter (read "
                                        "only while the rules' cache_sticky is on)."),
    (DECISION_MADE, "estimates"): (
        "model -> this request's estimate in micro-USD, when an estimator priced every model of the table (\"\" "
        "is the default for a model not listed)."),
    (DECISION_MADE, "rules"): (
        "On the session's first routed turn: the rules it was decided under (tier table, options including the "
        "stall detector, its window and stall_lift, and the store's strike limit and auto-escalation), so "
        "backtest can re-run them."),
}


def _defs() -> dict[str, Any]:
    """The shared definitions the domains refer to (``{"$ref": "#/$defs/<name>"}``)."""
    tiers = [*schema.TIERS]
    entry_fields = {**schema.ENTRY, **schema.ENTRY_OPTIONAL}
    return {
        "tier": {"description": "A tier name, or null for no tier.", "enum": [*tiers, None]},
        "session_id": {
            "description": ("1 to 256 characters, no control characters (and no lone surrogate, which JSON text "
                            "in UTF-8 cannot hold)."),
            "type": "string", "minLength": 1, "maxLength": 256, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"},
        "hex64": {"description": "A SHA-256 value in hex (the audit log's hash chain, docs/audit-log.md).",
                  "type": "string", "pattern": "^[0-9a-f]{64}$"},
        "head_hex": {
            "description": ("A chain head in hex: SHA-256 (64 digits) in a file log, SHA-1 (40 digits) in a Redis "
                            "bucket stream (docs/audit-log.md)."),
            "type": "string", "pattern": "^[0-9a-f]{40}([0-9a-f]{24})?$"},
        "entry": {
            "description": "Every field of a session (engine.Entry), as session.created and log.snapshot carry it.",
            "type": "object", "required": list(schema.ENTRY),
            "properties": {name: check.json for name, check in entry_fields.items()},  # type: ignore[attr-defined]
            "additionalProperties": False},
        "reservations": {
            "description": ("Open budget reservations, oldest first: [reservation id, micro-USD held, first ms at "
                            "which it counts as lapsed]."),
            "type": "array",
            "items": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer", "minimum": 0},
                                                       {"type": "integer", "minimum": 0}],
                      "minItems": 3, "maxItems": 3}},
        "deployments": {
            "description": ("Deployment pins per (model group, tier) that served the session without moving its "
                            "pin (a SIMPLE bypass, a budget downgrade, strategy none), oldest first: [model, tier "
                            'or "", deployment].'),
            "type": "array",
            "items": {"type": "array", "prefixItems": [{"type": "string"}, {"enum": ["", *tiers]},
                                                       {"type": "string"}],
                      "minItems": 3, "maxItems": 3, "items": False}},
    }


def _record(name: str) -> dict[str, Any]:
    required, fields = schema.RECORDS[name]
    properties: dict[str, Any] = {key: True for key in schema.REQUIRED_ENVELOPE}
    for key, check in {**fields, "chain": schema.ENVELOPE["chain"], "genesis": schema.ENVELOPE["genesis"]}.items():
        described = FIELD_DESCRIPTIONS.get((name, key))
        json_schema = check.json  # type: ignore[attr-defined]
        properties[key] = {"description": described, **json_schema} if described else json_schema
    return {"description": RECORD_DESCRIPTIONS[name], "type": "object", "required": list(required),
            "properties": properties, "additionalProperties": False}


def json_schema() -> dict[str, Any]:
    """docs/log-schema.json as a dict: the JSON Schema (draft 2020-12) of one audit-log record."""
    envelope = {key: {"description": ENVELOPE_DESCRIPTIONS[key], **schema.ENVELOPE[key].json}  # type: ignore[attr-defined]
                for key in ("seq", "ts")}
    envelope["event"] = {"description": ENVELOPE_DESCRIPTIONS["event"], "enum": list(RECORD_NAMES)}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": TITLE,
        "description": DESCRIPTION,
        "type": "object",
        "required": list(schema.REQUIRED_ENVELOPE),
        "properties": envelope,
        "allOf": [{"if": {"properties": {"event": {"const": name}}}, "then": {"$ref": f"#/$defs/{name}"}}
                  for name in RECORD_NAMES],
        "$defs": {**_defs(), **{name: _record(name) for name in RECORD_NAMES}},
    }


def render() -> str:
    """The text of docs/log-schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text(encoding="utf-8") != text:
            print(f"{SCHEMA_PATH} is not the one events/_schema.py generates: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
