"""The visual report: where the money went and what the sessions did, read from the audit log alone.

Two streamed passes over the log, in bounded memory:

1. ``digest(records)`` folds every record into time buckets (spend, decisions by
   kind, strikes, escalations), the model mix and the escalation funnel, while
   ``_audit.lives`` (fed the same records) yields each session lifetime and a
   heap keeps the ``top`` costliest. Buckets widen (1 s, 5 s, ... 1 week) so
   there are never more than ``MAX_BUCKETS``; label sets stop at ``MAX_LABELS``.
2. ``add_timelines(d, records)`` reads the log again for those few lifetimes only.

``engine.tools.report_html.render_html(d)`` draws the digest with plotly, its
JavaScript inlined, so the file opens offline. The CLI (``session-engine
report``) only wires these together; docs/report.md says what each chart means.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.core.kinds import Kind
from engine.tools.audit import Life, explain, lives
from events import records as record_names

__all__ = [
    "BUCKET_WIDTHS_MS", "Bucket", "Digest", "LEDGER_MARK", "MAX_BUCKETS", "MAX_LABELS", "MAX_POINTS", "Timeline",
    "add_timelines", "digest", "read_digest",
]

#: Bucket widths, each a multiple of the one before, so buckets merge exactly when the log outgrows them.
BUCKET_WIDTHS_MS = (1_000, 5_000, 10_000, 30_000, 60_000, 300_000, 600_000, 1_800_000, 3_600_000, 10_800_000,
                    21_600_000, 43_200_000, 86_400_000, 604_800_000)
MAX_BUCKETS = 240
#: Most distinct models (or decision kinds, escalation reasons) charted; later ones are summed as "other".
MAX_LABELS = 40
TOP_SESSIONS = 10
#: Most decision and cost points kept per timeline (every other one is dropped when reached).
MAX_POINTS = 600
#: Most other timeline marks (escalations, pin changes, cache pins, the ending) kept per session.
MAX_MARKS = 300
_ENDINGS = frozenset({record_names.SESSION_EXPIRED, record_names.SESSION_CLEARED, record_names.SESSION_EVICTED})
_REQUESTS = frozenset({record_names.SESSION_UPDATED, record_names.SESSION_TOUCHED})
_MARKED = _ENDINGS | {record_names.SESSION_ESCALATED, record_names.STICKY_PINNED, record_names.SESSION_CREATED}
#: A timeline mark's name for an idle expiry whose budget ledger continued (the same lifetime goes on).
LEDGER_MARK = "budget_ledger"


@dataclass(slots=True)
class Bucket:
    """What happened in one time bucket."""

    spend_micros: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    strikes: int = 0
    escalations: int = 0


@dataclass(slots=True)
class Timeline:
    """One costly session lifetime, step by step (thinned to ``MAX_POINTS``)."""

    life: Life
    #: (ts, session total in micros) after each cost record.
    cost: list[tuple[int, int]] = field(default_factory=list)
    #: (ts, kind, model, tier, explanation) of each decision kept.
    decisions: list[tuple[int, str, str, str | None, str]] = field(default_factory=list)
    decisions_seen: int = 0
    #: (ts, record name, explanation) of escalations, pin changes, cache pins and the ending.
    marks: list[tuple[int, str, str]] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict, repr=False)

    def add(self, record: dict[str, Any]) -> None:
        name, ts = record["event"], record.get("ts", 0)
        text = explain(record, self.before)
        if name == record_names.COST_ADDED:
            _thin(self.cost, (ts, record.get("session_cost_micros", 0)), MAX_POINTS)
        elif name == record_names.DECISION_MADE:
            self.decisions_seen += 1
            _thin(self.decisions, (ts, str(record.get("kind")), str(record.get("model") or ""),
                                   record.get("tier"), text), MAX_POINTS)
        elif name == record_names.SESSION_CREATED and record.get("cause") == "budget_ledger":
            # Not an end and a start: the pin expired idle and the same budget goes on (one mark for both).
            if self.marks and self.marks[-1][1] == record_names.SESSION_EXPIRED:
                text = f"{self.marks.pop()[2]}; {text}"
            if len(self.marks) < MAX_MARKS:
                self.marks.append((ts, LEDGER_MARK, text))
        elif ((name in _MARKED or (name == record_names.SESSION_UPDATED and "model" in record))
              and len(self.marks) < MAX_MARKS):
            self.marks.append((ts, name, text))


def _thin(points: list[Any], point: Any, limit: int) -> None:
    """Append; at ``limit`` drop every other point (the last one stays): the shape stays, memory is bounded."""
    points.append(point)
    if len(points) >= limit:
        last = points[-1]
        del points[1::2]
        if points[-1] is not last:
            points.append(last)


class Labels(dict[str, int]):
    """Counts by label: ``MAX_LABELS`` labels, then every later one counts as "other"."""

    def add(self, label: str, n: int = 1) -> None:
        if label not in self and len(self) >= MAX_LABELS:
            label = "other"
        self[label] = self.get(label, 0) + n


@dataclass(slots=True)
class Digest:
    """Everything the report draws, folded from the log's records."""

    top_n: int = TOP_SESSIONS
    width_ms: int = BUCKET_WIDTHS_MS[0]
    buckets: dict[int, Bucket] = field(default_factory=dict)
    records: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    lifetimes: int = 0
    spend_micros: int = 0
    decision_kinds: Labels = field(default_factory=Labels)
    #: Requests by the model that served them (from decisions; a refusal served nothing).
    served: Labels = field(default_factory=Labels)
    #: Requests by the session's pinned model (request records): the mix of a log without decisions.
    pinned: Labels = field(default_factory=Labels)
    #: Spend by the model of the session's last decision (or its pin when it has none).
    model_spend: Labels = field(default_factory=Labels)
    hashed: int = 0
    strikes: int = 0
    escalations: Labels = field(default_factory=Labels)
    #: The ``top_n`` costliest lifetimes as a min-heap of (cost, -order, Life).
    top: list[tuple[int, int, Life]] = field(default_factory=list)
    timelines: list[Timeline] = field(default_factory=list)
    order: Iterator[int] = field(default_factory=itertools.count, repr=False)
    #: Live sessions only (dropped when they end): the model serving each, and its strike count.
    live_model: dict[str, str] = field(default_factory=dict, repr=False)
    live_strikes: dict[str, int] = field(default_factory=dict, repr=False)

    # -- pass 1 ------------------------------------------------------------------------------
    def bucket(self, ts: int) -> Bucket:
        index = ts // self.width_ms
        got = self.buckets.get(index)
        if got is None:
            got = self.buckets[index] = Bucket()
            if len(self.buckets) > 1 and max(self.buckets) - min(self.buckets) >= MAX_BUCKETS:
                self._widen()
                return self.bucket(ts)
        return got

    def _widen(self) -> None:
        """Merge into the narrowest wider width that keeps the span within ``MAX_BUCKETS``."""
        low, high, old = min(self.buckets), max(self.buckets), self.width_ms

        def fits(width: int) -> bool:
            return (high * old) // width - (low * old) // width < MAX_BUCKETS

        new = next((w for w in BUCKET_WIDTHS_MS if w > old and fits(w)), 0)
        if not new:  # past the last named width: keep doubling
            new = max(old, BUCKET_WIDTHS_MS[-1]) * 2
            while not fits(new):
                new *= 2
        merged: dict[int, Bucket] = {}
        for index, b in self.buckets.items():
            into = merged.setdefault(index * old // new, Bucket())
            into.spend_micros += b.spend_micros
            into.strikes += b.strikes
            into.escalations += b.escalations
            for kind, n in b.decisions.items():
                into.decisions[kind] = into.decisions.get(kind, 0) + n
        self.buckets = merged
        self.width_ms = new

    def add(self, record: dict[str, Any]) -> None:
        """Fold one record (a name this page does not chart only counts)."""
        self.records += 1
        ts = record.get("ts")
        if type(ts) is not int:
            return
        if self.first_ts is None or ts < self.first_ts:
            self.first_ts = ts
        if self.last_ts is None or ts > self.last_ts:
            self.last_ts = ts
        name = record.get("event")
        sid = record.get("session_id")
        if sid is None:
            if name == record_names.LOG_SNAPSHOT:
                for snap_sid, fields in (record.get("sessions") or {}).items():
                    self.live_strikes[snap_sid] = fields.get("strikes", 0)
                    if fields.get("model"):
                        self.live_model.setdefault(snap_sid, fields["model"])
            return
        if name == record_names.COST_ADDED:
            micros = record.get("micros", 0)
            if type(micros) is int and micros > 0:
                self.spend_micros += micros
                self.bucket(ts).spend_micros += micros
                self.model_spend.add(self.live_model.get(sid) or "(no model)", micros)
        elif name == record_names.DECISION_MADE:
            kind = str(record.get("kind") or "unknown")
            self.decision_kinds.add(kind)
            b = self.bucket(ts)
            b.decisions[kind] = b.decisions.get(kind, 0) + 1
            if kind != Kind.REFUSE and record.get("model"):
                self.served.add(record["model"])
                self.live_model[sid] = record["model"]
            if kind == Kind.BYPASS and record.get("lift"):
                # A lifting stall escalation (stall_lift) moves no pin and writes no session.escalated.
                self.escalations.add("strikes")
                b.escalations += 1
        elif name == record_names.HASH_RECORDED:
            self.hashed += 1
            strikes = record.get("strikes", 0)
            if type(strikes) is int and strikes > self.live_strikes.get(sid, 0):
                self.strikes += 1
                self.bucket(ts).strikes += 1
            self.live_strikes[sid] = strikes
        elif name == record_names.SESSION_ESCALATED:
            self.escalations.add(str(record.get("reason") or "unknown"))
            self.bucket(ts).escalations += 1
        elif name == record_names.SESSION_CREATED:
            self.live_strikes[sid] = record.get("strikes", 0)
            if record.get("model"):
                self.live_model[sid] = record["model"]
                if record.get("request_count", 0) > 0:
                    self.pinned.add(record["model"])
        elif name in _REQUESTS:
            if "model" in record:
                self.live_model[sid] = record["model"]
            model = record.get("model") or self.live_model.get(sid)
            if model:
                self.pinned.add(model)
        elif name in _ENDINGS:
            self.live_model.pop(sid, None)
            self.live_strikes.pop(sid, None)

    def watch(self, records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Pass each record on after folding it (so ``lives`` reads the same stream)."""
        for record in records:
            self.add(record)
            yield record

    def add_life(self, life: Life) -> None:
        self.lifetimes += 1
        if life.cost_micros <= 0:
            return
        item = (life.cost_micros, -next(self.order), life)  # ties: the earlier lifetime ranks higher
        if len(self.top) < self.top_n:
            heapq.heappush(self.top, item)
        elif item[:2] > self.top[0][:2]:
            heapq.heapreplace(self.top, item)

    def costliest(self) -> list[Life]:
        """The top lifetimes, costliest first."""
        return [life for _, _, life in sorted(self.top, key=lambda item: item[:2], reverse=True)]

    @property
    def decisions(self) -> int:
        return sum(self.decision_kinds.values())


def digest(records: Iterable[dict[str, Any]], top: int = TOP_SESSIONS) -> Digest:
    """Pass 1: the aggregates and the ``top`` costliest lifetimes."""
    d = Digest(top_n=top)
    for life in lives(d.watch(records)):
        d.add_life(life)
    return d


def add_timelines(d: Digest, records: Iterable[dict[str, Any]]) -> None:
    """Pass 2: the step-by-step timeline of each of the costliest lifetimes."""
    wanted = {(life.session_id, life.started_at): Timeline(life) for life in d.costliest()}
    sids = {sid for sid, _ in wanted}
    open_: dict[str, Timeline] = {}
    for record in records:
        sid = record.get("session_id")
        if sid is None:
            if record.get("event") == record_names.LOG_SNAPSHOT:  # a lifetime whose start is in deleted history
                for snap_sid, fields in (record.get("sessions") or {}).items():
                    if snap_sid in sids and snap_sid not in open_:
                        tl = wanted.get((snap_sid, fields.get("created_at")))
                        if tl is not None and not tl.before:
                            tl.before.update(fields)
                            ts = record.get("ts", 0)
                            tl.cost.append((ts, fields.get("session_cost_micros", 0)))
                            tl.marks.append((ts, record_names.LOG_SNAPSHOT,
                                             "present in a snapshot (earlier history not read)"))
                            open_[snap_sid] = tl
            continue
        if sid not in sids:
            continue
        name = record["event"]
        if name == record_names.SESSION_CREATED:
            # A budget ledger keeps its session's created_at: it continues the same lifetime (engine.tools.audit.lives).
            start = record.get("created_at")
            tl = wanted.get((sid, start if start is not None else record.get("ts")))
            if tl is None:  # another lifetime of the same id
                open_.pop(sid, None)
                continue
            open_[sid] = tl
        tl = open_.get(sid)
        if tl is None:
            continue
        tl.add(record)
        if name in _ENDINGS:
            del open_[sid]
    d.timelines = list(wanted.values())


def read_digest(path: str | Path, top: int = TOP_SESSIONS) -> Digest:
    """Both passes over a log file or segment directory (the Python API behind ``session-engine report``)."""
    from engine.log.replay import read_log

    d = digest(read_log(path, history=True), top)
    add_timelines(d, read_log(path, history=True))
    return d
