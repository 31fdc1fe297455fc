"""The semantics of a session, pure: ``apply(state, event, now, config)``.

No clock reads, no locks, no I/O. ``state`` is the frozen ``Entry`` (or None
when the session does not exist); the result is the next state, the
caller's result and the log records of every transition, each record being
``(name, changed_fields)`` with the new values of the fields that changed.

Before any event is applied the session is *settled* at ``now``: a session
idle past ``timeout_ms`` is expired, and a cache pin idle past its
provider's TTL is ended. So "expired" means expired whether or not a clock
tick has run yet, and a pin that has lapsed is never revived by later
activity (a seed defect).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields as dataclass_fields
from dataclasses import replace
from functools import lru_cache
from typing import Any, NamedTuple

from engine.core.config import Config
from engine.core.entry import SLOT_SETTERS, Entry, build_entry
from engine.core.providers import cache_ttl_for_provider, provider_from_model
from engine.core.rules import HASH_WINDOW, Routed, count_strikes, decide_route
from events import (
    Clear,
    Cost,
    Decision,
    Escalate,
    Evict,
    Expire,
    GetCost,
    GetSession,
    Hash,
    InvalidEvent,
    IsCacheSticky,
    Release,
    Route,
    RouteRules,
    SessionEvent,
    SetCacheSticky,
    SetDeployment,
    SetSession,
    Touch,
    tier_above,
)
from events import records as record_names
from events._validate import MAX_TOTAL_MICROS

Record = tuple[str, dict[str, Any]]
_NO_RECORDS: tuple[Record, ...] = ()
__all__ = [
    "Check", "HASH_WINDOW", "LAPSE_GEN", "Outcome", "RULES_BEFORE", "Rejected", "apply", "check_due_again",
    "clear_for_all", "deadline_checks", "entry_fields", "holds_ledger", "idle_deadline", "ledger_only", "ledger_until",
    "needs_check", "new_deadline_checks", "next_deadline", "pin_deadline", "reservation_deadlines", "rules_fields",
    "rules_from_fields", "settle", "stats_sessions",
]


class Outcome(NamedTuple):
    state: Entry | None
    result: Any
    records: tuple[Record, ...]


class Rejected(NamedTuple):
    """The result of an event the core refuses in the session's turn (its input passed the event's own
    checks, but not against the session): the shell raises ``error`` to an asking caller and drops it for
    a told event; the outcome's records say why (``input.rejected``, never the value) and its state is
    the session as it was."""

    error: InvalidEvent


def _rejected(s: Entry | None, records: tuple[Record, ...], operation: str, field: str, rule: str) -> Outcome:
    return Outcome(s, Rejected(InvalidEvent(field, rule)),
                   (*records, (record_names.INPUT_REJECTED, {"operation": operation, "field": field, "rule": rule})))


#: Why a cost that would push the session's total past MAX_TOTAL_MICROS is refused (input.rejected's rule).
TOTAL_RULE = f"must keep the session's total within {MAX_TOTAL_MICROS} micros (2^63-1)"


_put_model, _put_tier = SLOT_SETTERS["model"], SLOT_SETTERS["tier"]
_put_last_used_at, _put_request_count = SLOT_SETTERS["last_used_at"], SLOT_SETTERS["request_count"]
_put_recent_hashes, _put_strikes = SLOT_SETTERS["recent_hashes"], SLOT_SETTERS["strikes"]
_put_user_explicit, _put_cost = SLOT_SETTERS["user_explicit"], SLOT_SETTERS["session_cost_micros"]
_put_reservations = SLOT_SETTERS["reservations"]


def _copy(e: Entry) -> Entry:
    """An equal, distinct Entry (only ever modified before anyone else sees it)."""
    return build_entry(e.model, e.tier, e.created_at, e.last_used_at, e.request_count, e.recent_hashes,
                       e.strikes, e.escalated, e.user_explicit, e.cache_sticky, e.cache_sticky_at, e.provider,
                       e.session_cost_micros, e.deployment, e.reservations, e.deployments)


def _evolve(e: Entry, **changes: Any) -> Entry:
    """A cheaper ``dataclasses.replace`` (no validation: the core only passes Entry field names)."""
    n = _copy(e)
    for name, value in changes.items():
        SLOT_SETTERS[name](n, value)
    return n


def entry_fields(e: Entry) -> dict[str, Any]:
    """Every field of an entry, as logged in ``session.created`` and snapshots."""
    return {
        "model": e.model, "tier": e.tier.value if e.tier else None, "created_at": e.created_at,
        "last_used_at": e.last_used_at, "request_count": e.request_count,
        "recent_hashes": list(e.recent_hashes), "strikes": e.strikes, "escalated": e.escalated,
        "user_explicit": e.user_explicit, "cache_sticky": e.cache_sticky,
        "cache_sticky_at": e.cache_sticky_at, "provider": e.provider,
        "session_cost_micros": e.session_cost_micros, "deployment": e.deployment,
        "reservations": [list(r) for r in e.reservations],
        "deployments": [list(p) for p in e.deployments],
    }


def holds_ledger(e: Entry, config: Config) -> bool:
    """Whether the entry's budget ledger (spend, open reservations) outlives its idle expiry."""
    return config.budget_window_ms > 0 and (e.session_cost_micros > 0 or bool(e.reservations))


def ledger_until(e: Entry, config: Config) -> int:
    """First ms at which the budget ledger ends: ``budget_window_ms`` after the session's first request."""
    return e.created_at + config.budget_window_ms


def idle_deadline(e: Entry, config: Config) -> int:
    """First ms at which the session counts as expired (its ledger, if it holds one, then stays on as a
    ledger-only entry: that one ends at ``ledger_until``)."""
    idle = e.last_used_at + config.timeout_ms + 1
    if not e.model and not e.request_count and holds_ledger(e, config):
        until = ledger_until(e, config)
        return until if until > idle else idle
    return idle


def stats_sessions(sessions: Iterable[tuple[str, Entry]], now: int, config: Config) -> list[tuple[str, Entry]]:
    """The sessions ``get_stats`` at ``now`` lists, of those a shard holds: every one not idle past
    ``timeout_ms`` (one the clock has not expired yet is not listed)."""
    timeout = config.timeout_ms
    return [(sid, e) for sid, e in sessions if now - e.last_used_at <= timeout]


def ledger_only(e: Entry) -> Entry:
    """What stays of an idle-expired session within its budget window: its spend and open reservations,
    in an entry that pins nothing (model "", like a cost-only entry); ``created_at`` is kept, so the
    window is still counted from the session's first request."""
    return build_entry("", None, e.created_at, e.last_used_at, 0, (), 0, False, False, False, 0, "",
                       e.session_cost_micros, "", e.reservations)


def pin_deadline(e: Entry) -> int:
    """First ms at which the cache pin counts as lapsed."""
    return e.last_used_at + cache_ttl_for_provider(e.provider) + 1


#: Generation of a deadline-heap entry that checks budget reservations (idle checks use the session's
#: ``created_at`` >= 0, pin checks ``-cache_sticky_at - 1``, which stays far above this).
LAPSE_GEN = -(1 << 62)


def reservation_deadlines(e: Entry) -> list[int]:
    """First ms at which each open budget reservation counts as lapsed."""
    return [r[2] for r in e.reservations]


#: One deadline a session needs checked: (first ms it is due, generation). The generation names the
#: check: the session's ``created_at`` (>= 0) its idle check, ``-cache_sticky_at - 1`` its pin check,
#: ``LAPSE_GEN`` a budget reservation's lapse.
Check = tuple[int, int]


def deadline_checks(e: Entry, config: Config) -> list[Check]:
    """Every deadline the session needs checked: its idle expiry (or its ledger's end), the end of its
    cache pin, the lapse of each open budget reservation. The memory shard keeps these in its heap
    (engine.core.table, engine.shell.shard); the Redis backend keeps their earliest (``next_deadline``)."""
    checks = [(idle_deadline(e, config), e.created_at)]
    if e.cache_sticky:
        checks.append((pin_deadline(e), -e.cache_sticky_at - 1))
    for r in e.reservations:
        checks.append((r[2], LAPSE_GEN))
    return checks


def next_deadline(e: Entry, config: Config) -> int:
    """The first ms at which something is due for the session (``settle`` does whichever it is)."""
    return min(check[0] for check in deadline_checks(e, config))


def _check_key(check: Check) -> tuple[int, int]:
    # A check stays the same check while its generation does; its deadline moves with use (a popped
    # check not yet due is pushed again: ``check_due_again``). A lapse is named by its deadline too.
    return (check[1], check[0] if check[1] == LAPSE_GEN else 0)


def new_deadline_checks(before: Entry | None, after: Entry, config: Config) -> list[Check]:
    """The checks ``after`` needs that ``before``'s (already in the shard's heap) do not name."""
    if (before is not None and before.created_at == after.created_at and before.cache_sticky == after.cache_sticky
            and before.cache_sticky_at == after.cache_sticky_at and before.reservations is after.reservations):
        return []  # the hot path (a use): every key of after's checks is one of before's
    checks = deadline_checks(after, config)
    if before is None:
        return checks
    known = {_check_key(check) for check in deadline_checks(before, config)}
    return [check for check in checks if _check_key(check) not in known]


def needs_check(e: Entry, generation: int, config: Config) -> bool:
    """Whether the session still needs the check of this generation (a popped one that it does not is stale)."""
    return any(check[1] == generation for check in deadline_checks(e, config))


def check_due_again(e: Entry, generation: int, config: Config) -> int | None:
    """When a popped idle or pin check is due next for ``e`` (settled at the pop), None when ``e`` needs it
    no more. A lapse check is never pushed again: each reservation has its own."""
    if generation == LAPSE_GEN:
        return None
    for deadline, gen in deadline_checks(e, config):
        if gen == generation:
            return deadline
    return None


def _lapse_due(reservations: tuple[tuple[str, int, int], ...], now: int) -> bool:
    # A plain loop, not any(): checked before every event on a session holding budget.
    for r in reservations:  # noqa: SIM110
        if r[2] <= now:
            return True
    return False


def settle(state: Entry | None, now: int, config: Config) -> tuple[Entry | None, tuple[Record, ...]]:
    """Apply what the passage of time implies: expiry, then the end of a lapsed cache pin, then the
    lapse of budget reservations past their TTL (a crashed caller never holds budget for ever)."""
    if state is None:
        return None, _NO_RECORDS
    idle = now - state.last_used_at
    records: tuple[Record, ...] = _NO_RECORDS
    if idle > config.timeout_ms:
        expired: Record = (record_names.SESSION_EXPIRED, {"reason": "idle", "idle_ms": idle})
        if not holds_ledger(state, config) or now >= ledger_until(state, config):
            return None, (expired,)
        if state.model or state.request_count:
            # The session ends; its budget ledger stays for the rest of the window (waiting out the
            # idle timeout never buys a fresh budget).
            state = ledger_only(state)
            records = (expired, (record_names.SESSION_CREATED, {**entry_fields(state), "cause": "budget_ledger"}))
    if state.cache_sticky and idle > cache_ttl_for_provider(state.provider):
        state = _evolve(state, cache_sticky=False)
        records += ((record_names.STICKY_EXPIRED, {"cache_sticky": False, "idle_ms": idle}),)
    if state.reservations and _lapse_due(state.reservations, now):
        lapsed = [r for r in state.reservations if r[2] <= now]
        kept = tuple(r for r in state.reservations if r[2] > now)
        state = _evolve(state, reservations=kept)
        records += ((record_names.BUDGET_LAPSED, {"reservation_ids": [r[0] for r in lapsed],
                                       "micros": sum(r[1] for r in lapsed),
                                       "reservations": [list(r) for r in kept]}),)
    return state, records


def _escalate(state: Entry, reason: str) -> tuple[Entry, Record | None]:
    tier = tier_above(state.tier)
    if state.escalated and tier == state.tier:
        return state, None
    fields = {"tier": tier.value, "escalated": True, "reason": reason,
              "from_tier": state.tier.value if state.tier else None}
    return _evolve(state, tier=tier, escalated=True), (record_names.SESSION_ESCALATED, fields)


def _set_session(s: Entry | None, ev: SetSession, now: int, own: bool = False) -> Outcome:
    if s is None:
        new = Entry(ev.model, ev.tier, now, now, 1, user_explicit=ev.user_explicit)  # type: ignore[arg-type]
        return Outcome(new, None, ((record_names.SESSION_CREATED, entry_fields(new)),))
    used = now if now > s.last_used_at else s.last_used_at
    count = s.request_count + 1
    new = s if own else _copy(s)
    _put_last_used_at(new, used)
    _put_request_count(new, count)
    changes: dict[str, Any] = {"last_used_at": used, "request_count": count}
    if ev.model != s.model:
        _put_model(new, ev.model)
        _put_tier(new, ev.tier)
        changes["model"] = ev.model
        changes["tier"] = ev.tier.value if ev.tier else None  # type: ignore[union-attr]
    if ev.user_explicit and not s.user_explicit:
        _put_user_explicit(new, True)
        changes["user_explicit"] = True
    return Outcome(new, None, ((record_names.SESSION_UPDATED, changes),))


def _touch(s: Entry | None, now: int, own: bool = False) -> Outcome:
    """``own``: ``s`` is an entry the caller's turn built and nobody else has seen: updated in place."""
    if s is None:
        return Outcome(None, None, _NO_RECORDS)
    used = now if now > s.last_used_at else s.last_used_at
    count = s.request_count + 1
    new = s if own else _copy(s)
    _put_last_used_at(new, used)
    _put_request_count(new, count)
    return Outcome(new, None, ((record_names.SESSION_TOUCHED, {"last_used_at": used, "request_count": count}),))


def _hash(s: Entry | None, ev: Hash, config: Config, own: bool = False) -> Outcome:
    if s is None:
        return Outcome(None, 0, _NO_RECORDS)
    hashes, strikes = count_strikes(s.recent_hashes, s.strikes, ev.hash, ev.stall)
    new = s if own else _copy(s)
    _put_recent_hashes(new, hashes)
    _put_strikes(new, strikes)
    records: tuple[Record, ...] = ((record_names.HASH_RECORDED, {"recent_hashes": list(hashes), "strikes": strikes}),)
    if (config.auto_escalate and strikes >= config.strike_limit
            and not new.escalated and not new.user_explicit):
        new, record = _escalate(new, "strikes")
        if record is not None:
            record[1]["strikes"] = strikes
            records += (record,)
    return Outcome(new, strikes, records)


def _escalate_event(s: Entry | None, ev: Escalate) -> Outcome:
    if s is None or s.user_explicit:
        return Outcome(s, None, _NO_RECORDS)
    new, record = _escalate(s, ev.reason)
    return Outcome(new, new.tier, (record,) if record else _NO_RECORDS)


def _cost_only(now: int, cause: str = "cost") -> tuple[Entry, tuple[Record, ...]]:
    # The seed dropped spend for unknown sessions; a cost-only entry keeps it (SPEC.md: even
    # for 0 micros, an absent session gets its entry).
    s = Entry("", None, now, now, 0)
    return s, ((record_names.SESSION_CREATED, {**entry_fields(s), "cause": cause}),)


def _find(reservations: tuple[tuple[str, int, int], ...], rid: str) -> int:
    for i, r in enumerate(reservations):
        if r[0] == rid:
            return i
    return -1


def _cost(s: Entry | None, ev: Cost, now: int) -> Outcome:
    records: tuple[Record, ...] = ()
    if s is None:
        s, records = _cost_only(now)
    at = _find(s.reservations, ev.reservation_id) if ev.reservation_id and s.reservations else -1
    if ev.micros == 0 and at < 0:
        return Outcome(s, None, records)
    total = s.session_cost_micros + ev.micros
    if total > MAX_TOTAL_MICROS:
        # The log's JSON writer holds a signed 64-bit int: refused here, in the turn, the session unchanged.
        return _rejected(s, records, "Cost", "micros", TOTAL_RULE)
    new = _copy(s)
    _put_cost(new, total)
    fields: dict[str, Any] = {"micros": ev.micros, "session_cost_micros": total}
    if ev.prompt_tokens or ev.completion_tokens:
        fields.update(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)
    if at >= 0:
        # Settlement: the actual cost replaces the reservation's estimate.
        held = s.reservations
        kept = () if len(held) == 1 else held[:at] + held[at + 1:]
        _put_reservations(new, kept)
        fields["reservation_id"] = ev.reservation_id
        fields["estimate_micros"] = held[at][1]
        fields["reservations"] = [list(r) for r in kept] if kept else []
    return Outcome(new, None, (*records, (record_names.COST_ADDED, fields)))


def _release(s: Entry | None, ev: Release) -> Outcome:
    at = _find(s.reservations, ev.reservation_id) if s is not None and s.reservations else -1
    if at < 0:
        return Outcome(s, False, _NO_RECORDS)
    assert s is not None
    kept = s.reservations[:at] + s.reservations[at + 1:]
    fields = {"reservation_id": ev.reservation_id, "micros": s.reservations[at][1],
              "reservations": [list(r) for r in kept]}
    return Outcome(_evolve(s, reservations=kept), True, ((record_names.BUDGET_RELEASED, fields),))


def _implied(s: Entry | None, event: SessionEvent, now: int, config: Config, own: bool = False) -> Outcome:
    """One event a routing decision implies, applied within the route's turn: the session is already
    settled at ``now``, so this skips ``apply``'s settle check (the turn's hot path). ``own``: ``s`` was
    built by an earlier event of the same turn, unseen by anyone yet: Touch, Hash and SetSession update
    it in place instead of copying it again."""
    t = type(event)
    if t is Touch:
        return _touch(s, now, own)
    if t is Hash:
        return _hash(s, event, config, own)  # type: ignore[arg-type]
    if t is SetSession:
        return _set_session(s, event, now, own)  # type: ignore[arg-type]
    return apply(s, event, now, config)


def _route(s: Entry | None, ev: Route, now: int, config: Config, decision_record: bool = True) -> Outcome:
    """Decide on the live state, apply what the decision implies, reserve its estimate, log it: one turn.
    ``decision_record=False``: the same turn without its ``decision.made`` record (see ``apply``)."""
    routed, implied = decide_route(s, ev, config)
    records: list[Record] = []
    before = s
    # Under the window stall detector the rules alone escalate: the store's auto-escalation (cumulative
    # strikes, SPEC.md) does not act on the hashes a routed turn records.
    applied = _without_auto_escalate(config) if config.auto_escalate and ev.rules.stall_detector == "window" \
        else config
    for event in implied:
        out = _implied(s, event, now, applied, s is not before)
        s = out.state
        records.extend(out.records)
    if routed.reservation_id:
        if s is None:  # strategy none: nothing else keeps the session, the reservation needs one
            s, created = _cost_only(now)
            records.extend(created)
        rid, micros, expires = routed.reservation_id, routed.estimate_micros, now + ev.rules.reservation_ttl_ms
        open_ = s.reservations
        held = (*open_, (rid, micros, expires)) if open_ else ((rid, micros, expires),)
        if s is before:  # else the entry is this turn's own, unseen yet: set the slot in place
            s = _copy(s)
        _put_reservations(s, held)
        records.append((record_names.BUDGET_RESERVED, {"reservation_id": rid, "micros": micros, "expires_at": expires,
                                            "reservations": [list(r) for r in held] if open_
                                            else [[rid, micros, expires]]}))
    if decision_record:
        _log_decision(records, before, ev, routed, config)
    return Outcome(s, routed, tuple(records))


def _log_decision(records: list[Record], before: Entry | None, ev: Route, routed: Routed, config: Config) -> None:
    fields = _decision_fields(ev, routed)
    if before is None or (not before.model and before.request_count == 0):
        # The session's first routed turn carries the rules it was decided under (backtest re-runs them).
        fields["rules"] = rules_fields(ev.rules, config)
    records.append((record_names.DECISION_MADE, fields))


@lru_cache(maxsize=16)
def _without_auto_escalate(config: Config) -> Config:
    return replace(config, auto_escalate=False)


def rules_fields(rules: RouteRules, config: Config) -> dict[str, Any]:
    """A ``RouteRules`` (plus the store settings the rules read) as ``decision.made`` logs it; read back by
    ``rules_from_fields``."""
    return {"models": {tier: list(models) for tier, models in rules.models}, "strategy": rules.strategy,
            "simple_bypass": rules.simple_bypass, "warmup_turns": rules.warmup_turns,
            "escalate_on_strikes": rules.escalate_on_strikes, "strike_limit": rules.strike_limit,
            "cache_sticky": rules.cache_sticky, "max_cost_micros": rules.max_cost_micros,
            "budget_mode": rules.budget_mode, "reservation_ttl_ms": rules.reservation_ttl_ms,
            "config_strike_limit": config.strike_limit, "auto_escalate": config.auto_escalate,
            "stall_detector": rules.stall_detector, "stall_window": rules.stall_window, "stall_lift": rules.stall_lift,
            "candidates_by_provider": rules.candidates_by_provider, "affinity_by_record": rules.affinity_by_record}


#: What ``rules_from_fields`` reads for a field a ``rules`` object lacks: the rules a log without the field
#: was decided by (every other field absent reads as ``RouteRules``' default).
RULES_BEFORE: dict[str, Any] = {"stall_detector": "strikes", "candidates_by_provider": False,
                                "affinity_by_record": False}
#: The store settings a ``rules`` object without them reads as (Config's defaults for such logs).
CONFIG_BEFORE = (2, False)
_RULE_NAMES = tuple(f.name for f in dataclass_fields(RouteRules) if f.name != "models")


def rules_from_fields(fields: Mapping[str, Any]) -> tuple[RouteRules, int, bool]:
    """``rules_fields``' inverse: a ``decision.made`` record's ``rules`` object -> (RouteRules, the store's
    strike limit, auto-escalation), validated by ``RouteRules`` (InvalidEvent naming the field; a TypeError,
    ValueError or AttributeError for a ``models`` that is not tier -> list of models)."""
    models = tuple((str(tier), tuple(names)) for tier, names in fields.get("models", {}).items())
    values = {**RULES_BEFORE, **{name: fields[name] for name in _RULE_NAMES if name in fields}}
    rules = RouteRules(models, **values)
    return (rules, int(fields.get("config_strike_limit", CONFIG_BEFORE[0])),
            bool(fields.get("auto_escalate", CONFIG_BEFORE[1])))


def _decision_fields(ev: Route, routed: Routed) -> dict[str, Any]:
    """``decision.made`` of a routed request: the decision, then its inputs (never prompt text)."""
    fields: dict[str, Any] = {"kind": routed.kind.value, "model": routed.model}
    if routed.tier is not None:
        fields["tier"] = routed.tier.value
    fields["provider"] = provider_from_model(routed.model)
    fields["reason"] = routed.reason
    if routed.downgrade:
        fields["downgrade"] = True
    if routed.lift:
        fields["lift"] = True
    fields["strategy"] = ev.rules.strategy
    if ev.source:
        fields["source"] = ev.source
    if routed.deployment:
        fields["deployment"] = routed.deployment
    fields["requested_model"] = ev.model
    if ev.tier is not None:
        fields["requested_tier"] = ev.tier.value  # type: ignore[union-attr]
    if ev.request_hash:
        fields["request_hash"] = ev.request_hash
    if ev.user_explicit:
        fields["explicit"] = True
    if ev.tools:
        fields["tools"] = True
    if ev.stall:
        fields["stall"] = True
    if ev.tool_repeats:
        fields["tool_repeats"] = ev.tool_repeats
    if ev.tool_errors:
        fields["tool_errors"] = ev.tool_errors
    if ev.keyword:
        fields["keyword"] = ev.keyword
    if ev.long_context:
        fields["long_context"] = True
    if ev.candidates:
        fields["candidates"] = list(ev.candidates)
    limit = routed.limit_micros
    if limit >= 0 or routed.estimate_micros:
        fields["estimate_micros"] = routed.estimate_micros
    if limit >= 0:
        fields["limit_micros"] = limit
        fields["spent_micros"] = routed.spent_micros
        fields["reserved_micros"] = routed.reserved_micros
    if routed.reservation_id:
        fields["reservation_id"] = routed.reservation_id
    if len(ev.estimates) > 1 or (ev.estimates and ev.estimates[0][0]):
        fields["estimates"] = dict(ev.estimates)  # per model (an estimator priced the table)
    return fields


def _set_sticky(s: Entry | None, ev: SetCacheSticky, now: int) -> Outcome:
    if s is None or s.cache_sticky:
        return Outcome(s, None, _NO_RECORDS)
    new = _evolve(s, cache_sticky=True, cache_sticky_at=now, provider=ev.provider)
    fields = {"cache_sticky": True, "cache_sticky_at": now, "provider": ev.provider,
              "ttl_ms": cache_ttl_for_provider(ev.provider)}
    return Outcome(new, None, ((record_names.STICKY_PINNED, fields),))


#: Deployment pins per (model group, tier) a session keeps; the oldest goes first.
MAX_GROUP_DEPLOYMENTS = 8


def _set_group_deployment(s: Entry | None, ev: SetDeployment, now: int) -> Outcome:
    """The deployment of one (model group, tier) that served the session without moving its pin."""
    created: tuple[Record, ...] = ()
    if s is None:  # strategy none keeps no pin: the deployment pin needs an entry (like a cost-only one)
        s, created = _cost_only(now, "deployment")
    tier = ev.tier.value if ev.tier is not None else ""  # type: ignore[union-attr]
    previous = s.group_deployment(ev.model, ev.tier)  # type: ignore[arg-type]
    if previous == ev.deployment:
        return Outcome(s, None, created)
    others = tuple(p for p in s.deployments if p[0] != ev.model or p[1] != tier)
    kept = (*others[len(others) - MAX_GROUP_DEPLOYMENTS + 1:], (ev.model, tier, ev.deployment))
    new = _evolve(s, deployments=kept)
    return Outcome(new, None, (*created, (record_names.DEPLOYMENT_GROUP_SET, {
        "group_model": ev.model, "group_tier": tier, "group_deployment": ev.deployment, "previous": previous,
        "deployments": [list(p) for p in kept]})))


def _set_deployment(s: Entry | None, ev: SetDeployment, now: int) -> Outcome:
    if ev.model:
        return _set_group_deployment(s, ev, now)
    if s is None or s.deployment == ev.deployment:
        return Outcome(s, None, _NO_RECORDS)
    new = _evolve(s, deployment=ev.deployment)
    return Outcome(new, None, ((record_names.DEPLOYMENT_SET, {"deployment": ev.deployment, "previous": s.deployment}),))


def _record_decision(s: Entry | None, ev: Decision) -> Outcome:
    fields: dict[str, Any] = {"kind": ev.kind}
    for name in ("model", "provider", "reason", "strategy", "source", "deployment"):
        value = getattr(ev, name)
        if value:
            fields[name] = value
    if ev.tier is not None:
        fields["tier"] = ev.tier.value  # type: ignore[union-attr]
    return Outcome(s, None, ((record_names.DECISION_MADE, fields),))


def _end(s: Entry | None, name: str, reason: str) -> Outcome:
    if s is None:
        return Outcome(None, False, _NO_RECORDS)
    return Outcome(None, True, ((name, {"reason": reason}),))


def apply(state: Entry | None, event: SessionEvent, now: int, config: Config, *,
          decision_record: bool = True) -> Outcome:
    """Apply one session event at ``now``: every rule of SPEC.md's SessionStore table.

    ``decision_record=False``: a ``Route``'s turn leaves out its ``decision.made`` record (state,
    result and every other record are the same), for a caller that re-runs recorded decisions and
    never writes that record (``engine.tools.backtest``); it does not change any other event's turn."""
    if state is None:
        s, settled = None, _NO_RECORDS
    else:
        # Most events find the session neither idle nor holding a lapsed pin: skip settle's call.
        idle = now - state.last_used_at
        if (idle > config.timeout_ms or (state.cache_sticky and idle > cache_ttl_for_provider(state.provider))
                or (state.reservations and _lapse_due(state.reservations, now))):
            s, settled = settle(state, now, config)
        else:
            s, settled = state, _NO_RECORDS
    t = type(event)
    if t is Route:
        out = _route(s, event, now, config, decision_record)  # type: ignore[arg-type]
    elif t is Touch:
        out = _touch(s, now)
    elif t is Hash:
        out = _hash(s, event, config)  # type: ignore[arg-type]
    elif t is SetSession:
        out = _set_session(s, event, now)  # type: ignore[arg-type]
    elif t is Cost:
        out = _cost(s, event, now)  # type: ignore[arg-type]
    elif t is GetSession:
        out = Outcome(s, s, _NO_RECORDS)
    elif t is Escalate:
        out = _escalate_event(s, event)  # type: ignore[arg-type]
    elif t is GetCost:
        out = Outcome(s, s.session_cost_micros / 1_000_000 if s else 0.0, _NO_RECORDS)
    elif t is SetCacheSticky:
        out = _set_sticky(s, event, now)  # type: ignore[arg-type]
    elif t is IsCacheSticky:
        out = Outcome(s, bool(s and s.cache_sticky), _NO_RECORDS)
    elif t is SetDeployment:
        out = _set_deployment(s, event, now)  # type: ignore[arg-type]
    elif t is Decision:
        out = _record_decision(s, event)  # type: ignore[arg-type]
    elif t is Release:
        out = _release(s, event)  # type: ignore[arg-type]
    elif t is Expire:
        out = Outcome(s, state is not None and s is None, _NO_RECORDS)
    elif t is Clear:
        out = _end(s, record_names.SESSION_CLEARED, "cleared")
    elif t is Evict:
        if s is not None and event.last_used_at >= 0 and s.last_used_at != event.last_used_at:  # type: ignore[attr-defined]
            out = Outcome(s, False, _NO_RECORDS)  # used since the evictor looked: keep it
        else:
            out = _end(s, record_names.SESSION_EVICTED, event.reason)  # type: ignore[attr-defined]
    else:
        raise InvalidEvent("event", f"must be a session event, got {t.__name__}")
    if settled:
        return Outcome(out.state, out.result, settled + out.records)
    return out


def clear_for_all(state: Entry | None) -> Outcome:
    """``clear_all`` seen from one session: it ends with reason "clear_all"."""
    return _end(state, record_names.SESSION_CLEARED, "clear_all")
