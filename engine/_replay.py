"""Rebuild live sessions from the audit log by folding each record's changed fields."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from engine._entry import Entry
from events import EngineError, Tier
from events import records as R


class LogCorrupt(EngineError):
    """A line in the middle of the log is not a valid record."""


_FIELDS = set(Entry.__slots__)


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield each record; a torn or garbage *last* line is skipped, one in the middle is an error."""
    with open(path, "rb") as f:
        pending: tuple[int, bytes] | None = None
        for number, line in enumerate(f, 1):
            if pending is not None:
                yield _parse(*pending)
            pending = (number, line)
        if pending is not None:
            try:
                yield _parse(*pending)
            except LogCorrupt:
                return


def _parse(number: int, line: bytes) -> dict[str, Any]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        raise LogCorrupt(f"line {number}: not a JSON record") from None
    if not isinstance(record, dict) or "event" not in record or "seq" not in record:
        raise LogCorrupt(f"line {number}: not a log record (needs seq and event)")
    return record


def fold(state: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    """Apply one record's changed fields to the per-session field maps."""
    name = record["event"]
    sid = record.get("session_id")
    if sid is None:
        return
    if name == R.SESSION_CREATED:
        state[sid] = {k: v for k, v in record.items() if k in _FIELDS}
    elif name in R.ENDING_RECORDS:
        state.pop(sid, None)
    else:
        fields = state.get(sid)
        if fields is not None:
            for key, value in record.items():
                if key in _FIELDS:
                    fields[key] = value


def to_entry(fields: dict[str, Any]) -> Entry:
    tier = fields.get("tier")
    return Entry(
        model=fields.get("model", ""), tier=Tier(tier) if tier else None,
        created_at=fields.get("created_at", 0), last_used_at=fields.get("last_used_at", 0),
        request_count=fields.get("request_count", 0),
        recent_hashes=tuple(fields.get("recent_hashes", ())), strikes=fields.get("strikes", 0),
        escalated=fields.get("escalated", False), user_explicit=fields.get("user_explicit", False),
        cache_sticky=fields.get("cache_sticky", False), cache_sticky_at=fields.get("cache_sticky_at", 0),
        provider=fields.get("provider", ""), session_cost_micros=fields.get("session_cost_micros", 0),
        deployment=fields.get("deployment", ""),
    )


def replay(path: str | Path) -> dict[str, Entry]:
    """The live sessions as they stood when the log ends."""
    state: dict[str, dict[str, Any]] = {}
    for record in read_records(path):
        fold(state, record)
    return {sid: to_entry(fields) for sid, fields in state.items()}
