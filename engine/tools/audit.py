"""The audit report: what happened to each session, read from the log alone.

``lives(records)`` streams one ``Life`` per session lifetime: a session is
reported as soon as it ends (expired, cleared, evicted), and the ones still
live when the log ends come last. So memory holds the live sessions, never
the whole log. ``timeline(records, session_id)`` explains one session's
records in words. The CLI (``session-engine audit``) only formats these.

A scoped session id (``<tenant>:<id>``, engine/core/scope.py) is reported as its
tenant and its id, separately; ``lives(records, tenant=T)`` keeps one
tenant's sessions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from engine.core.scope import TENANT_LEN, split, tenant_of
from events import records as record_names

__all__ = [
    "Life", "explain", "fmt_ts", "fmt_usd", "lives", "table_header", "table_row", "timeline",
]

#: Most items kept in one list of a Life (counts stay exact): bounds memory for very long sessions.
MAX_ITEMS = 100


def fmt_ts(ts: int | None, *, date: bool = True) -> str:
    """Unix ms as UTC text: ``2024-05-01 12:00:00.000`` (or just the time of day)."""
    if ts is None:
        return "-"
    moment = datetime.fromtimestamp(ts / 1000, UTC)
    text = moment.strftime("%Y-%m-%d %H:%M:%S.%f" if date else "%H:%M:%S")
    return text[:-3] if date else text


def fmt_usd(micros: int) -> str:
    return f"${micros / 1_000_000:.6f}"


def _push(items: list[Any], item: Any) -> None:
    if len(items) < MAX_ITEMS:
        items.append(item)


@dataclass(slots=True)
class Life:
    """One lifetime of one session id, summarised."""

    session_id: str
    started_at: int | None = None
    #: "request", "cost" (a cost report for an unknown session), or "snapshot" (history not on disk).
    origin: str = "request"
    requests: int = 0
    models: list[str] = field(default_factory=list)
    tiers: list[str | None] = field(default_factory=list)
    strikes: int = 0
    escalations: list[dict[str, Any]] = field(default_factory=list)
    escalation_count: int = 0
    cost_micros: int = 0
    pins: list[dict[str, Any]] = field(default_factory=list)
    pin_count: int = 0
    decisions: list[dict[str, Any]] = field(default_factory=list)
    decision_count: int = 0
    deployment: str = ""
    user_explicit: bool = False
    rejected: int = 0
    #: Open budget reservations: [reservation id, micro-USD held, lapse ms].
    reservations: list[list[Any]] = field(default_factory=list)
    #: None while live; else {"how": expired|cleared|evicted, "reason", "ts"}.
    ended: dict[str, Any] | None = None
    last_seq: int = 0
    #: Times the session expired idle while it held spend or reservations and its budget ledger continued
    #: (``session.created`` with ``cause: "budget_ledger"``): the same lifetime, the same budget.
    ledger_count: int = 0
    #: Each continuation: {"ts", "idle_ms", "spent_micros", "reservations"} (at most ``MAX_ITEMS``).
    ledger: list[dict[str, Any]] = field(default_factory=list)
    #: The session is a ledger-only entry now (it pins nothing until its next request).
    in_ledger: bool = False
    #: Requests of the pins before the last ledger continuation (request_count starts again at 0 there).
    request_base: int = 0
    #: Spend the lifetime's first record carried that no record of this log added to it: only a budget
    #: ledger whose expired session this log does not hold (never in a log the engine writes whole).
    carried_micros: int = 0

    def note_model(self, model: str | None, tier: str | None) -> None:
        if model is not None and (not self.models or self.models[-1] != model):
            _push(self.models, model)
        if not self.tiers or self.tiers[-1] != tier:
            _push(self.tiers, tier)

    @property
    def tenant(self) -> str:
        """The session's tenant ("" when its id is unscoped)."""
        return tenant_of(self.session_id)

    @property
    def id(self) -> str:
        """The session id as its caller named it (without the tenant)."""
        return split(self.session_id)[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "tenant": self.tenant, "id": self.id,
            "started_at": self.started_at, "origin": self.origin,
            "requests": self.requests, "models": self.models, "tiers": self.tiers, "strikes": self.strikes,
            "escalation_count": self.escalation_count, "escalations": self.escalations,
            "cost_micros": self.cost_micros, "cost_usd": self.cost_micros / 1_000_000,
            "pin_count": self.pin_count, "pins": self.pins, "decision_count": self.decision_count,
            "decisions": self.decisions, "deployment": self.deployment, "user_explicit": self.user_explicit,
            "rejected_inputs": self.rejected, "ended": self.ended,
            "reservations": self.reservations, "reserved_micros": self.reserved_micros,
            "ledger_count": self.ledger_count, "ledger": self.ledger, "in_ledger": self.in_ledger,
        }

    @property
    def reserved_micros(self) -> int:
        return sum(r[1] for r in self.reservations)


_ENDINGS = {record_names.SESSION_EXPIRED: "expired", record_names.SESSION_CLEARED: "cleared",
            record_names.SESSION_EVICTED: "evicted"}


def _start(sid: str, fields: dict[str, Any], ts: int, origin: str) -> Life:
    life = Life(sid, fields.get("created_at", ts), origin)
    if origin == "budget_ledger":  # its expired session is not in this log: its spend was not added here
        life.carried_micros = fields.get("session_cost_micros", 0)
        life.in_ledger = True
    elif not fields.get("model") and not fields.get("request_count") and (
            fields.get("session_cost_micros") or fields.get("reservations")):
        life.in_ledger = origin == "snapshot"  # a ledger-only entry a snapshot holds
    _update(life, fields)
    if not life.in_ledger:
        life.note_model(fields.get("model"), fields.get("tier"))
    return life


def _continue_ledger(life: Life, record: dict[str, Any], ts: int) -> None:
    """The session expired idle holding budget, and its ledger goes on: the same lifetime (and budget)."""
    ended = life.ended or {}
    life.ended = None
    life.ledger_count += 1
    life.in_ledger = True
    life.request_base = life.requests
    _update(life, record)
    _push(life.ledger, {"ts": ts, "idle_ms": ended.get("idle_ms"), "spent_micros": life.cost_micros,
                        "reservations": len(record.get("reservations") or ())})


def _update(life: Life, fields: dict[str, Any]) -> None:
    """Carry over the absolute values a record or snapshot states."""
    if "request_count" in fields:
        life.requests = life.request_base + fields["request_count"]
    if "strikes" in fields:
        life.strikes = fields["strikes"]
    if "session_cost_micros" in fields:
        life.cost_micros = fields["session_cost_micros"] - life.carried_micros
    if fields.get("user_explicit"):
        life.user_explicit = True
    if fields.get("deployment"):
        life.deployment = fields["deployment"]
    if "reservations" in fields:
        life.reservations = fields["reservations"]


#: Keys that are not session fields: the record envelope and the hash chain's (docs/audit-log.md).
_ENVELOPE = frozenset({"seq", "ts", "event", "session_id", "chain", "genesis"})


def lives(records: Iterable[dict[str, Any]], tenant: str | None = None) -> Iterator[Life]:
    """Every session lifetime in the log: each one when it ends, then the live ones by start time.

    ``tenant``: only that tenant's sessions ("" for the unscoped ones); None: all.

    A lifetime is one budget: a session that expires idle while it holds
    spend or open reservations continues as its budget ledger (the
    ``session.expired`` record is followed at once by ``session.created`` with
    ``cause: "budget_ledger"``, engine/core/transitions.py ``settle``), and a request in
    the budget window pins a model on that same ledger. That is the same
    lifetime, not a new one: its cost is counted once (so the lifetimes' costs
    sum to the ``cost.added`` micros of the log), its requests add up, and
    ``ledger`` lists each continuation. The lifetime ends when the session
    ends for good (its ledger's window over, cleared, evicted).
    """
    live: dict[str, Life] = {}
    held: Life | None = None  # expired just now: yielded unless the next record continues its budget ledger
    for record in records:
        name = record["event"]
        ts = record.get("ts", 0)
        sid = record.get("session_id")
        if held is not None:
            if (name == record_names.SESSION_CREATED and sid == held.session_id
                    and record.get("cause") == "budget_ledger"):
                live[sid] = held
                _continue_ledger(held, record, ts)
                held.last_seq = record["seq"]
                held = None
                continue
            yield held
            held = None
        if sid is None:
            if name == record_names.LOG_SNAPSHOT:
                # History before the snapshot may be deleted: sessions first seen here start "restored".
                for snap_sid, fields in record.get("sessions", {}).items():
                    if tenant is not None and tenant_of(snap_sid) != tenant:
                        continue
                    life = live.get(snap_sid)
                    if life is None:
                        live[snap_sid] = _start(snap_sid, fields, ts, "snapshot")
                    else:
                        _update(life, fields)
            continue
        if tenant is not None and tenant_of(sid) != tenant:
            continue
        life = live.get(sid)
        if name == record_names.SESSION_CREATED:
            cause = record.get("cause")
            if cause == "budget_ledger" and life is not None:  # (never: the expiry comes first) the same budget
                _continue_ledger(life, record, ts)
                life.last_seq = record["seq"]
                continue
            live[sid] = life = _start(sid, record, ts, cause if cause in ("cost", "budget_ledger") else "request")
        elif life is None:
            continue  # a record for a session that does not exist (a decision, a rejected input)
        life.last_seq = record["seq"]
        if name in _ENDINGS:
            life.ended = {"how": _ENDINGS[name], "reason": record.get("reason"), "ts": ts}
            if "idle_ms" in record:
                life.ended["idle_ms"] = record["idle_ms"]
            del live[sid]
            if (name == record_names.SESSION_EXPIRED
                    and (life.cost_micros + life.carried_micros > 0 or life.reservations)):
                held = life  # its budget ledger may continue: the next record says
            else:
                yield life
            continue
        _update(life, record)
        if name == record_names.SESSION_UPDATED and "model" in record:
            life.in_ledger = False
            life.note_model(record["model"], record.get("tier"))
        elif name == record_names.SESSION_ESCALATED:
            life.escalation_count += 1
            _push(life.escalations, {"ts": ts, "from_tier": record.get("from_tier"), "to_tier": record.get("tier"),
                                     "reason": record.get("reason")})
            life.note_model(None, record.get("tier"))
        elif name == record_names.STICKY_PINNED:
            life.pin_count += 1
            _push(life.pins, {"ts": ts, "provider": record.get("provider"), "ttl_ms": record.get("ttl_ms"),
                              "ended_at": None})
        elif name == record_names.STICKY_EXPIRED:
            if life.pins and life.pins[-1]["ended_at"] is None:
                life.pins[-1]["ended_at"] = ts
        elif name == record_names.DECISION_MADE:
            life.decision_count += 1
            _push(life.decisions, {"ts": ts, **{k: record[k] for k in _DECISION_KEYS if k in record}})
        elif name == record_names.INPUT_REJECTED:
            life.rejected += 1
    if held is not None:
        yield held
    yield from sorted(live.values(), key=lambda life: (life.started_at or 0, life.session_id))


_DECISION_KEYS = ("kind", "reason", "strategy", "source", "model", "tier", "provider", "deployment")

# -- the table ------------------------------------------------------------------------------------

COLUMNS = (("REQS", 5), ("MODELS", 26), ("TIERS", 22), ("STRIKES", 7), ("ESCALATIONS", 30), ("COST", 11),
           ("PINS", 4), ("DECISIONS", 24), ("ENDED", 26))


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _tier(tier: str | None) -> str:
    return tier or "none"


def table_header() -> str:
    return "  ".join(name.ljust(width) for name, width in COLUMNS) + "  " + "TENANT".ljust(TENANT_LEN) + "  SESSION"


def table_row(life: Life) -> str:
    """One line per lifetime; cells cut to their column (``~``); ``--json`` has everything."""
    models = " > ".join(m or '""' for m in life.models) or "-"
    tiers = " > ".join(_tier(t) for t in life.tiers) or "-"
    if life.escalations:
        last = life.escalations[-1]
        escalations = f"{life.escalation_count}: {fmt_ts(last['ts'], date=False)} {last['reason']}"
    else:
        escalations = "0"
    if life.decisions:
        kinds: dict[str, int] = {}
        for d in life.decisions:
            kinds[d.get("kind", "?")] = kinds.get(d.get("kind", "?"), 0) + 1
        decisions = f"{life.decision_count}: " + ",".join(f"{k}x{n}" for k, n in kinds.items())
    else:
        decisions = "0"
    if life.ended is None:
        ended = "live (budget ledger)" if life.in_ledger else "live"
    else:
        ended = f"{life.ended['how']} {fmt_ts(life.ended['ts'], date=False)}"
        if life.ended.get("reason") not in (None, "idle", "cleared", "capacity"):
            ended += f" ({life.ended['reason']})"
    cells = (str(life.requests), models, tiers, str(life.strikes), escalations, fmt_usd(life.cost_micros),
             str(life.pin_count), decisions, ended)
    return "  ".join(_cut(cell, width).ljust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True)) + \
        "  " + (life.tenant or "-").ljust(TENANT_LEN) + "  " + life.id


# -- the timeline -----------------------------------------------------------------------------------

def _secs(ms: int | None) -> str:
    return "?" if ms is None else f"{ms / 1000:g}s"


def explain(record: dict[str, Any], before: dict[str, Any]) -> str:
    """One transition in words; ``before`` holds the session's fields before it (updated here)."""
    name = record["event"]
    r = record.get
    if name == record_names.SESSION_CREATED:
        before.clear()
        before.update(record)
        if r("cause") == "cost":
            return "created by a cost report for an unknown session (no model pinned yet), so no spend is lost"
        if r("cause") == "budget_ledger":
            held = r("reservations") or []
            return (f"budget ledger continued: {fmt_usd(r('session_cost_micros', 0))} spent, {len(held)} "
                    f"reservation(s) held ({fmt_usd(sum(x[1] for x in held))}); the pin ended idle, the spend "
                    "counts against the same budget until its window ends (no model pinned until the next request)")
        if r("cause") == "deployment":
            return ("created to hold a deployment pin per model group (no model pinned yet): "
                    f"{r('deployments')}")
        explicit = ", chosen explicitly by the user" if r("user_explicit") else ""
        return f"created: pinned to model {r('model')!r}, tier {_tier(r('tier'))}{explicit}; request 1"
    text = ""
    if name == record_names.SESSION_UPDATED:
        if "model" in record and not before.get("model"):
            text = f"request {r('request_count')}: pinned to model {r('model')!r}, tier {_tier(r('tier'))}"
        elif "model" in record:
            text = (f"request {r('request_count')}: model changed from {before.get('model')!r} to "
                    f"{r('model')!r}, tier {_tier(before.get('tier'))} -> {_tier(r('tier'))}")
        else:
            text = f"request {r('request_count')} on the pinned model {before.get('model')!r}"
        if r("user_explicit"):
            text += "; the pin is now user-explicit (never auto-escalated)"
    elif name == record_names.SESSION_TOUCHED:
        text = f"touched: request {r('request_count')}, idle timer restarted"
    elif name == record_names.HASH_RECORDED:
        if r("strikes", 0) > before.get("strikes", 0):
            text = f"request hash repeats the previous one: strike {r('strikes')}"
        else:
            text = f"request hash recorded (strikes stay {r('strikes')})"
    elif name == record_names.SESSION_ESCALATED:
        why = "repeated identical requests reached the strike limit" if r("reason") == "strikes" \
            else f"reason: {r('reason')}"
        text = f"escalated from tier {_tier(r('from_tier'))} to {_tier(r('tier'))} ({why})"
    elif name == record_names.COST_ADDED:
        text = f"cost {fmt_usd(r('micros', 0))} added; session total {fmt_usd(r('session_cost_micros', 0))}"
        if r("reservation_id"):
            text += (f"; settles reservation {r('reservation_id')} (estimate {fmt_usd(r('estimate_micros', 0))} "
                     "replaced by the actual cost)")
    elif name == record_names.BUDGET_RESERVED:
        text = (f"budget reserved: {fmt_usd(r('micros', 0))} held for this request (reservation "
                f"{r('reservation_id')}, lapses at {fmt_ts(r('expires_at'))}); {len(r('reservations', []))} open")
    elif name == record_names.BUDGET_RELEASED:
        text = f"budget released: reservation {r('reservation_id')} ({fmt_usd(r('micros', 0))}) given back, no cost"
    elif name == record_names.BUDGET_LAPSED:
        text = (f"budget reservation(s) {', '.join(r('reservation_ids', []))} lapsed unsettled after their TTL: "
                f"{fmt_usd(r('micros', 0))} freed")
    elif name == record_names.STICKY_PINNED:
        text = (f"cache-pinned to provider {r('provider')!r} while its prefix cache is warm "
                f"(ends after {_secs(r('ttl_ms'))} idle)")
    elif name == record_names.STICKY_EXPIRED:
        text = f"cache pin ended: idle {_secs(r('idle_ms'))}, past the provider's cache TTL"
    elif name == record_names.DEPLOYMENT_SET:
        was = f"was {r('previous')!r}" if r("previous") else "none before"
        text = (f"served by deployment {r('deployment')!r} ({was})" if r("deployment") else
                f"no deployment yet for the new model ({was}, which served the model the pin left)")
    elif name == record_names.DEPLOYMENT_GROUP_SET:
        was = f"was {r('previous')!r}" if r("previous") else "none before"
        tier = f" at {r('group_tier')}" if r("group_tier") else ""
        text = f"{r('group_model')}{tier} served by deployment {r('group_deployment')!r} ({was}); the pin's own kept"
    elif name == record_names.DECISION_MADE:
        parts = [f"{k} {r(k)}" for k in ("model", "tier", "provider", "deployment", "strategy", "source")
                 if r(k)]
        text = f"routing decision {r('kind')!r}" + (f": {', '.join(parts)}" if parts else "")
        if r("reason"):
            text += f" because {r('reason')}"
    elif name == record_names.SESSION_EXPIRED:
        text = f"expired: idle {_secs(r('idle_ms'))}, longer than the session timeout"
    elif name == record_names.SESSION_EVICTED and r("reason") == "tenant_limit":
        text = ("evicted: its tenant was at max_sessions_per_tenant and this was the tenant's least recently "
                "used session")
    elif name == record_names.SESSION_EVICTED:
        text = "evicted: the store was at max_sessions and this was the least recently used session"
    elif name == record_names.SESSION_REFUSED:
        text = (f"not created: its tenant had created {r('limit')} sessions in the last minute "
                "(max_creations_per_tenant_per_minute)")
    elif name == record_names.SESSION_CLEARED:
        text = "cleared by clear_all()" if r("reason") == "clear_all" else "cleared by clear_session()"
    elif name == record_names.INPUT_REJECTED:
        text = f"input rejected: {r('operation')} with a bad {r('field')} ({r('rule')}); nothing changed"
    else:
        changed = {k: v for k, v in record.items() if k not in _ENVELOPE}
        text = f"{name}: {changed}"
    if name not in (record_names.DECISION_MADE, record_names.INPUT_REJECTED):
        before.update(record)
    return text


def timeline(records: Iterable[dict[str, Any]], session_id: str) -> Iterator[dict[str, Any]]:
    """Each record about one session, with its explanation (``text``), in log order."""
    before: dict[str, Any] = {}
    for record in records:
        sid = record.get("session_id")
        if sid is None and record["event"] == record_names.LOG_SNAPSHOT:
            fields = record.get("sessions", {}).get(session_id)
            if fields is not None and not before:
                before.update(fields)
                yield {"seq": record["seq"], "ts": record.get("ts"), "event": record["event"],
                       "text": f"present in a snapshot (earlier history not read): model {fields.get('model')!r}, "
                               f"{fields.get('request_count')} requests, cost "
                               f"{fmt_usd(fields.get('session_cost_micros', 0))}",
                       "fields": fields}
            continue
        if sid != session_id:
            continue
        text = explain(record, before)
        fields = {k: v for k, v in record.items() if k not in _ENVELOPE}
        yield {"seq": record["seq"], "ts": record.get("ts"), "event": record["event"], "text": text,
               "fields": fields}
