"""``session-engine backtest``: re-run the recorded routing decisions with changed options.

Every ``decision.made`` record of a routed turn carries the decision's inputs
(docs/events.md): the router's model and tier, the three-strike hash, the stall
signal, tool use, the long-context flag, the candidates, the estimates, and on
the session's first turn the rules it was decided under. The backtest streams
the log once, rebuilds a ``Route`` event from each such record with the
**variant** rules (the recorded ones with ``--set`` changes applied) and applies
it to the session's variant state through the core's own transition
(``engine.core.transitions.apply``, which runs ``engine.core.rules``): never a second copy of a
rule. The responses' costs (``cost.added``, joined to their decision by the
reservation id, else to the session's latest decision) settle the variant's
reservations; a failed call's ``budget.released`` releases them.

The baseline is what the log recorded. With no change the variant re-takes every
decision exactly (kind, model, tier): ``decisions_changed == 0`` and the variant's
figures equal the baseline's (tests/tools/test_backtest.py). docs/backtest.md says
what a backtest can and cannot answer.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from engine.core.config import Config
from engine.core.entry import Entry
from engine.core.kinds import Kind
from engine.core.transitions import apply, ledger_only, rules_from_fields
from engine.log.replay import (
    PREFIX,
    LogCorrupt,
    Share,
    Tail,
    history_files,
    new_fields,
    paused_gc,
    read_file,
    to_entry,
)
from events import Cost, EngineError, InvalidEvent, Release, Route, RouteRules, SetDeployment, Tier
from events import records as record_names
from events._validate import MAX_MICROS, check_session_id

__all__ = [
    "BacktestResult", "Figures", "NoSession", "OPTIONS", "Prices", "backtest", "parse_changes", "run_backtest",
]

#: The options ``--set`` may change, and how a value is read.
OPTIONS: dict[str, str] = {
    "max_cost_usd": "a number of USD, or none", "budget_mode": "graceful or strict",
    "strike_limit": "an int >= 1", "escalate_on_strikes": "true or false",
    "strategy": "sticky, adaptive or none", "warmup_turns": "an int >= 0", "cache_sticky": "true or false",
    "simple_bypass": "true or false", "reservation_ttl_ms": "an int >= 1",
    "stall_detector": "window or strikes (re-reads the recorded hash and counts)", "stall_lift": "true or false",
}
#: Records a route's turn writes besides its decision (the baseline's escalations and pin moves are
#: counted from these, as the variant's are from the records its own turn produces).
_TURN_RECORDS = frozenset({record_names.SESSION_CREATED, record_names.SESSION_UPDATED, record_names.SESSION_TOUCHED,
                           record_names.HASH_RECORDED,
                           record_names.SESSION_ESCALATED, record_names.STICKY_PINNED, record_names.DEPLOYMENT_SET,
                           record_names.BUDGET_RESERVED,
                           record_names.STICKY_EXPIRED, record_names.BUDGET_LAPSED, record_names.DEPLOYMENT_GROUP_SET})
_ENDINGS = frozenset({record_names.SESSION_EXPIRED, record_names.SESSION_CLEARED, record_names.SESSION_EVICTED})
#: Records the backtest reads nothing of but seq, event, session_id (and whether session.updated has a model):
#: the reader checks only those for them (read_file's ``light``); the rest get every value-domain check.
_LIGHT = (_TURN_RECORDS - {record_names.DEPLOYMENT_SET, record_names.DEPLOYMENT_GROUP_SET}) | _ENDINGS
_TIER = {t.value: t for t in Tier}


def _set_deployment(sid: str, record: dict[str, Any]) -> SetDeployment:
    """The deployment a ``deployment.set`` or ``deployment.group_set`` record the caller reported names."""
    if record["event"] == record_names.DEPLOYMENT_GROUP_SET:
        return SetDeployment(sid, record["group_deployment"], record["group_model"],
                             _TIER.get(record["group_tier"]))
    return SetDeployment(sid, record["deployment"])
_ESCALATED, _UPDATED = record_names.SESSION_ESCALATED, record_names.SESSION_UPDATED
_NEVER_MS = 10**15


class BacktestError(EngineError):
    """The backtest cannot run as asked (a bad option, model table or price file)."""


class NoSession(BacktestError):
    """``session=`` names a session the log holds no record of."""


class _Serial(Exception):
    """A share of a parallel run met what only a run over the whole log can decide: run it serially."""


# -- options -------------------------------------------------------------------------------------
def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise InvalidEvent(name, "must be true or false")


def _int(name: str, value: Any) -> int:
    try:
        number = int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or (isinstance(value, float) and value != number):
        raise InvalidEvent(name, "must be an int")
    return number


def _pairs(changes: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    if not isinstance(changes, Mapping):
        pairs: dict[str, Any] = {}
        for item in changes:
            name, sep, value = str(item).partition("=")
            if not sep:
                raise InvalidEvent("set", f"{str(item)[:60]!r} is not OPTION=VALUE")
            pairs[name.strip()] = value.strip()
        return pairs
    return dict(changes)


def parse_changes(changes: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    """``--set OPTION=VALUE`` pairs (or a mapping) -> the ``RouteRules`` fields they change.

    Each value is read as its option's type here; the options are then checked and encoded as the policy does
    it (``engine.policy.Options``, ``route_rules``: USD to micros included). Raises ``InvalidEvent`` naming the
    option for an unknown option or a bad value.
    """
    from engine.policy import Options, route_rules

    changes = _pairs(changes)
    typed: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in OPTIONS:
            raise InvalidEvent(name, f"is not an option backtest can change (one of {', '.join(OPTIONS)})")
        if name == "max_cost_usd":
            if value is None or str(value).strip().lower() in ("none", "null", ""):
                typed[name] = None
                continue
            try:
                usd = float(value)
            except (TypeError, ValueError):
                raise InvalidEvent(name, "must be a number of USD >= 0, or none") from None
            if not usd >= 0 or usd == float("inf"):
                raise InvalidEvent(name, "must be a number of USD >= 0, or none")
            typed[name] = usd
        elif name in ("escalate_on_strikes", "cache_sticky", "simple_bypass", "stall_lift"):
            typed[name] = _bool(name, value)
        elif name in ("strike_limit", "warmup_turns", "reservation_ttl_ms"):
            typed[name] = _int(name, value)
        else:
            typed[name] = str(value).strip()
    rules = route_rules({}, Options(**typed))  # Options checks each value, naming it; RouteRules the encoding
    return {(_RULE_OF.get(name, name)): getattr(rules, _RULE_OF.get(name, name)) for name in typed}


#: The ``RouteRules`` field an option of ``OPTIONS`` sets, where it has another name.
_RULE_OF = {"max_cost_usd": "max_cost_micros"}


def read_models(path: str | Path) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A JSON model table ``{"SIMPLE": "model" | ["model", ...], ...}`` as ``RouteRules.models``."""
    from engine.policy import Options, route_rules

    try:
        table = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise BacktestError(f"cannot read the model table {path}: {exc}") from None
    if not isinstance(table, dict) or not table:
        raise BacktestError(f"the model table {path} must be a JSON object of tier -> model or list of models")
    return route_rules(table, Options()).models


# -- prices ----------------------------------------------------------------------------------------
class Prices:
    """USD per input and output token, by model: a JSON price file, else LiteLLM's price map when installed.

    A price file is LiteLLM's own format, ``{"model": {"input_cost_per_token": x,
    "output_cost_per_token": y}}``; a model is looked up as written, then without its provider prefix.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.source = str(path) if path else "litellm"
        self._table: dict[str, Any] | None = None
        if path:
            try:
                table = orjson.loads(Path(path).read_bytes())
            except (OSError, orjson.JSONDecodeError) as exc:
                raise BacktestError(f"cannot read the price file {path}: {exc}") from None
            if not isinstance(table, dict):
                raise BacktestError(f"the price file {path} must be a JSON object of model -> prices")
            self._table = table

    def _map(self) -> dict[str, Any]:
        if self._table is None:
            try:
                # The price map that ships with LiteLLM: never fetched over the network.
                os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
                import litellm  # imported only when a price is needed
                self._table = dict(litellm.model_cost)
            except Exception:  # not installed (or broken): nothing can be re-priced
                self.source = "none (no price file, LiteLLM not installed)"
                self._table = {}
        return self._table

    def per_token(self, model: str) -> tuple[float, float] | None:
        table = self._map()
        for key in (model, model.partition("/")[2]):
            entry = table.get(key) if key else None
            if isinstance(entry, dict):
                p_in, p_out = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
                if isinstance(p_in, (int, float)) and isinstance(p_out, (int, float)):
                    return float(p_in), float(p_out)
        return None

    def micros(self, model: str, prompt_tokens: int, completion_tokens: int) -> float | None:
        price = self.per_token(model)
        if price is None:
            return None
        return (prompt_tokens * price[0] + completion_tokens * price[1]) * 1_000_000


# -- figures ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Figures:
    """One side of the comparison (the recorded baseline, or the variant)."""

    cost_micros: int = 0
    escalations: int = 0
    refusals: int = 0
    downgrades: int = 0
    pin_switches: int = 0
    kinds: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str, downgrade: bool, lift: bool, escalations: int, switches: int) -> None:
        """One decision: its kind, a refusal or a budget downgrade (the decision's ``downgrade``), and the
        escalations and pin moves its turn wrote; a lifting stall escalation (``lift``) is a bypass whose turn
        writes no ``session.escalated``: it counts as one."""
        kinds = self.kinds
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == Kind.REFUSE:
            self.refusals += 1
        elif kind == Kind.BYPASS:
            if downgrade:
                self.downgrades += 1
            if lift and not escalations:
                escalations = 1
        self.escalations += escalations
        self.pin_switches += switches

    def to_json(self) -> dict[str, Any]:
        return {"cost_usd": self.cost_micros / 1_000_000, "escalations": self.escalations,
                "refusals": self.refusals, "downgrades": self.downgrades, "pin_switches": self.pin_switches,
                "decisions_by_kind": dict(sorted(self.kinds.items()))}


@dataclass(slots=True)
class Turn:
    """One re-run decision of the session asked for (``--session``)."""

    ts: int
    requested: str
    baseline: tuple[str, str, str | None]
    variant: tuple[str, str, str | None]
    baseline_micros: int = 0
    variant_micros: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"ts": self.ts, "requested": self.requested,
                "baseline": {"kind": self.baseline[0], "model": self.baseline[1], "tier": self.baseline[2],
                             "cost_usd": self.baseline_micros / 1_000_000},
                "variant": {"kind": self.variant[0], "model": self.variant[1], "tier": self.variant[2],
                            "cost_usd": self.variant_micros / 1_000_000},
                "changed": self.baseline != self.variant}


@dataclass(slots=True)
class BacktestResult:
    """The comparison; ``to_json()`` is the CLI's ``--json`` (its shape is binding, docs/backtest.md)."""

    changes: dict[str, Any]
    baseline: Figures = field(default_factory=Figures)
    variant: Figures = field(default_factory=Figures)
    decisions: int = 0
    decisions_changed: int = 0
    records: int = 0
    #: Decision records that carry no inputs (``unavailable`` answers, logs that record none): not re-run.
    not_rerun: int = 0
    #: Re-runnable decisions skipped because no rules were known for their session (logs without rules, no --models).
    no_rules: int = 0
    #: Costs re-priced from token counts because the variant served another model.
    repriced: int = 0
    #: Costs of another model that could not be re-priced (no tokens or no price): kept as recorded.
    unpriced: int = 0
    #: Requests the baseline refused and the variant serves: charged at their recorded estimate.
    estimated: int = 0
    prices: str = ""
    session: str | None = None
    turns: list[Turn] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "baseline": self.baseline.to_json(), "variant": self.variant.to_json(),
            "decisions_changed": self.decisions_changed, "decisions": self.decisions, "records": self.records,
            "changes": self.changes, "not_rerun": self.not_rerun, "no_rules": self.no_rules,
            "repriced": self.repriced, "unpriced": self.unpriced, "estimated": self.estimated, "prices": self.prices,
        }
        if self.session is not None:
            out["session"] = self.session
            out["turns"] = [t.to_json() for t in self.turns]
        return out


# -- the run ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Rules:
    variant: RouteRules
    config: Config


@dataclass(slots=True)
class _Joined:
    """A decision as a later cost or release needs it."""

    baseline_model: str
    variant_model: str
    variant_rid: str
    variant_refused: bool
    turn: Turn | None
    #: The store settings the variant decided it under (its costs settle under the same).
    config: Config


class _Run:
    def __init__(self, changes: dict[str, Any], models: tuple[tuple[str, tuple[str, ...]], ...] | None,
                 prices: Prices, session: str | None, share: Share | None = None, start: Tail | None = None) -> None:
        self.changes = changes
        #: One process's share of a parallel run (``_parallel``): it reads only its sessions' records.
        self.share = share
        self.start = start
        self.models = models
        self.prices = prices
        self.session = session
        self.result = BacktestResult(changes=dict(changes), prices=prices.source, session=session)
        #: Whether a record (or a snapshot entry) of ``session`` was read: none is an error (``NoSession``).
        self.seen = False
        self.states: dict[str, Entry | None] = {}
        self.rules: dict[str, _Rules] = {}
        self.by_rules: dict[tuple[RouteRules, int, bool], _Rules] = {}
        #: The recorded ``rules`` objects read so far (as JSON bytes) -> their variant: every new session's first
        #: decision carries one, and most are alike.
        self.by_recorded: dict[bytes, _Rules] = {}
        self.last_rules: _Rules | None = None
        self.fallback: _Rules | None = None
        self.configs: dict[tuple[int, bool], Config] = {}
        if models is not None:  # a log without rules: what an empty rules object reads as, with this table
            before, strike_limit, auto = rules_from_fields({})
            self.fallback = self._variant(dataclasses.replace(before, models=models), strike_limit, auto)
        self.held: dict[str, dict[str, Any]] = {}
        self.ended: dict[str, Any] = {}  # sessions whose idle expiry may leave a budget ledger (next record)
        #: Decisions by (session, reservation id): a response's cost settles its own session's reservation.
        self.by_rid: dict[tuple[str, str], _Joined] = {}
        self.last: dict[str, _Joined] = {}

    def _variant(self, recorded: RouteRules, strike_limit: int, auto: bool) -> _Rules:
        key = (recorded, strike_limit, auto)
        found = self.by_rules.get(key)
        if found is not None:
            return found
        changes = dict(self.changes)
        if self.models is not None:
            changes["models"] = self.models
        variant = dataclasses.replace(recorded, **changes) if changes else recorded
        limit = variant.strike_limit or strike_limit
        config_key = (limit if "strike_limit" in self.changes else strike_limit, auto)
        config = self.configs.get(config_key)
        if config is None:
            config = self.configs[config_key] = Config(enabled=True, timeout_ms=_NEVER_MS, tick_ms=0,
                                                       strike_limit=config_key[0], auto_escalate=auto)
        found = self.by_rules[key] = _Rules(variant, config)
        return found

    def _recorded(self, recorded: dict[str, Any]) -> _Rules:
        """The variant of a ``decision.made`` record's ``rules`` object (read once per distinct object)."""
        key = orjson.dumps(recorded)
        found = self.by_recorded.get(key)
        if found is None:
            found = self.by_recorded[key] = self._variant(*rules_from_fields(recorded))
        return found

    # The variant state of one session.
    def _apply(self, sid: str, event: Any, ts: int, config: Config) -> tuple[Any, tuple[Any, ...]]:
        # A re-run Route's turn never writes its decision.made: the variant's figures come from the result.
        state, result, records = apply(self.states.get(sid), event, ts, config, decision_record=False)
        if state is None:
            self.states.pop(sid, None)
        else:
            self.states[sid] = state
        return result, records

    def _config(self, sid: str) -> Config:
        """The store settings for a session's costs, releases and deployments (a session with no rules of its
        own takes the last seen; a share of a parallel run, which never sees them all, the defaults: these
        events read only the idle timeout and budget window, the same in every backtest config)."""
        rules = self.rules.get(sid) or (self.last_rules if self.share is None else None) or self.fallback
        return rules.config if rules is not None else _DEFAULT_CONFIG

    def feed(self, records: Iterable[dict[str, Any]]) -> BacktestResult:
        result = self.result
        only = self.session
        count = result.records
        decision, cost, turn_records, released, endings = (record_names.DECISION_MADE, record_names.COST_ADDED,
                                                           _TURN_RECORDS,
                                                           record_names.BUDGET_RELEASED, _ENDINGS)
        updated, deployment_sets = record_names.SESSION_UPDATED, (record_names.DEPLOYMENT_SET,
                                                                  record_names.DEPLOYMENT_GROUP_SET)
        held_of, ended = self.held, self.ended
        escalated, created = record_names.SESSION_ESCALATED, record_names.SESSION_CREATED
        # The turn records just before a decision (consecutive seqs, the same session): the baseline's
        # escalations and pin moves in that decision's turn.
        run_sid: str | None = None
        run_next = escalations = switches = 0
        share = self.share
        first = share is None or share.index == 0  # counts the records of no session (every share reads snapshots)
        for r in records:  # a share's reader yields only its sessions' records, the snapshots and, to share 0,
            sid = r.get("session_id")  # the other records of no session
            if sid is None:
                count += first
                if r["event"] == record_names.LOG_SNAPSHOT and (
                        count == r.get("part", 1) if share is None
                        else r["seq"] - self.start.first["seq"] + 1 == r.get("part", 1)):  # type: ignore[union-attr]
                    # The log starts at a snapshot (its older history deleted): the sessions live then.
                    for snap_sid, fields in r["sessions"].items():
                        if (only is None or snap_sid == only) and (
                                share is None or share.own(snap_sid.encode()) is not False):
                            self.states[snap_sid] = to_entry(new_fields(fields))
                            self.seen = True
                continue
            count += 1
            if only is not None:
                if sid != only:
                    continue
                self.seen = True
            name = r["event"]
            if held_of:
                held = held_of.pop(sid, None)
                if held is not None and not ((name == record_names.BUDGET_RESERVED or name == decision)
                                             and r["seq"] == held["seq"] + 1):
                    # A deployment the caller reported (record_response), not one the route's turn chose.
                    self._apply(sid, _set_deployment(sid, held), held["ts"], self._config(sid))
            if name in turn_records:
                seq = r["seq"]
                if seq != run_next or sid != run_sid:
                    run_sid, escalations, switches = sid, 0, 0
                run_next = seq + 1
                if name == escalated:
                    escalations += 1
                elif name == updated and "model" in r:
                    switches += 1
                elif name in deployment_sets:
                    held_of[sid] = r
            elif name == decision:
                if sid == run_sid and r["seq"] == run_next:
                    self._rerun_decision(sid, r, escalations, switches)
                else:
                    self._rerun_decision(sid, r, 0, 0)
                run_sid = None
            elif name == cost:
                self._cost(sid, r)
            elif name == released:
                joined = self.by_rid.pop((sid, r.get("reservation_id", "")), None)
                if joined is not None and joined.variant_rid:
                    self._apply(sid, Release(sid, joined.variant_rid), r["ts"], self._config(sid))
            elif name in endings:
                ended_state = self.states.pop(sid, None)
                self.last.pop(sid, None)
                if ended_state is not None and name == record_names.SESSION_EXPIRED:
                    self.ended[sid] = ended_state
                continue
            if name == created and r.get("cause") == "budget_ledger":
                # The recorded session left its budget ledger behind: so does the variant's.
                ended_state = ended.pop(sid, None)
                if ended_state is not None and (ended_state.session_cost_micros or ended_state.reservations):
                    self.states[sid] = ledger_only(ended_state)
            if ended:
                ended.pop(sid, None)
        result.records = count
        for sid, held in list(held_of.items()):
            self._apply(sid, _set_deployment(sid, held), held["ts"], self._config(sid))
        held_of.clear()
        return result

    def _rerun_decision(self, sid: str, r: dict[str, Any], escalations: int, switches: int) -> None:
        """Re-run one recorded decision; ``escalations`` and ``switches``: the baseline's in its turn."""
        result = self.result
        get = r.get
        requested = get("requested_model")
        if requested is None:
            result.not_rerun += 1
            return
        recorded_rules = get("rules")
        if recorded_rules is not None:
            try:
                self.rules[sid] = self.last_rules = rules = self._recorded(recorded_rules)
            except (InvalidEvent, TypeError, ValueError, AttributeError) as exc:
                field = exc.field if isinstance(exc, InvalidEvent) else "models"
                rule = exc.rule if isinstance(exc, InvalidEvent) else "must be tier -> list of models"
                raise LogCorrupt(f"seq {r['seq']} (decision.made of session {sid[:40]}): "
                                 f"rules.{field} {rule}") from None
        else:
            rules = self.rules.get(sid)
            if rules is None:
                if self.share is not None:  # the rules last seen in the whole log: only a serial run knows them
                    raise _Serial(f"session {sid[:40]} has no rules of its own in the log")
                rules = self.last_rules or self.fallback
                if rules is None:
                    result.no_rules += 1
                    return
                self.rules[sid] = rules
        var = result.variant
        kind, model, tier = r["kind"], get("model", ""), get("tier")
        refused = kind == Kind.REFUSE
        result.baseline.count(kind, get("downgrade", False), get("lift", False), escalations, switches)

        variant, config = rules.variant, rules.config
        recorded_rid = get("reservation_id", "")
        rid = recorded_rid
        if not rid and variant.max_cost_micros >= 0:
            rid = f"backtest-{r['seq']}"
        estimates = get("estimates")
        if estimates is not None:
            pairs = tuple(estimates.items())
        else:
            estimate = get("estimate_micros", 0)
            pairs = (("", estimate),) if estimate or variant.max_cost_micros >= 0 else ()
        candidates = get("candidates")
        requested_tier = get("requested_tier")
        route = _route(sid, requested, _TIER[requested_tier] if requested_tier is not None else None, variant,
                       get("explicit", False), get("request_hash", ""), get("stall", False), get("tools", False),
                       get("long_context", False), tuple(candidates) if candidates else (), get("source", ""), pairs,
                       rid, get("keyword", ""), get("tool_repeats", 0), get("tool_errors", 0))
        ts = r["ts"]
        routed, records = self._apply(sid, route, ts, config)
        vkind, vmodel, vtier = routed.kind, routed.model, routed.tier
        vrefused = vkind is Kind.REFUSE
        escalations = switches = 0
        for rec_name, fields in records:
            if rec_name == _ESCALATED:
                escalations += 1
            elif rec_name == _UPDATED and "model" in fields:
                switches += 1
        var.count(vkind.value, routed.downgrade, routed.lift, escalations, switches)
        result.decisions += 1
        # A Tier is a str: it equals its recorded name.
        if vkind != kind or vmodel != model or vtier != tier:
            result.decisions_changed += 1
        turn = None
        if self.session is not None:
            turn = Turn(ts, requested_tier or "", (kind, model, tier),
                        (vkind, vmodel, vtier.value if vtier is not None else None))
            result.turns.append(turn)
        if refused:
            if not vrefused:  # served now, refused then: no response was recorded, charge the estimate
                result.estimated += 1
                var.cost_micros += routed.estimate_micros
                if turn is not None:
                    turn.variant_micros = routed.estimate_micros
                self._apply(sid, Cost(sid, routed.estimate_micros, routed.reservation_id), ts, config)
            return
        joined = _Joined(model, vmodel, routed.reservation_id, vrefused, turn, config)
        self.last[sid] = joined
        if recorded_rid:
            self.by_rid[sid, recorded_rid] = joined

    def _cost(self, sid: str, r: dict[str, Any]) -> None:
        result = self.result
        micros = r["micros"]
        result.baseline.cost_micros += micros
        rid = r.get("reservation_id")
        joined = self.by_rid.pop((sid, rid), None) if rid else None
        last = self.last.pop(sid, None)
        if joined is None and not rid:
            joined = last
        if joined is None:  # spend the log does not tie to a routed decision: the same in both
            result.variant.cost_micros += micros
            self._apply(sid, Cost(sid, micros), r["ts"], self._config(sid))
            return
        turn = joined.turn
        if turn is not None:
            turn.baseline_micros += micros
        if joined.variant_refused:
            return  # the variant did not serve this request
        vmicros = micros
        if joined.variant_model != joined.baseline_model:
            vmicros = self._reprice(joined, micros, r.get("prompt_tokens", 0), r.get("completion_tokens", 0))
        result.variant.cost_micros += vmicros
        if turn is not None:
            turn.variant_micros += vmicros
        self._apply(sid, _settle(sid, vmicros, joined.variant_rid), r["ts"], joined.config)

    def _reprice(self, joined: _Joined, micros: int, prompt: int, completion: int) -> int:
        """The cost with the variant's model: the recorded cost scaled by the price ratio on the same tokens
        (so discounts such as cached input carry over), or the variant's list price when the recorded
        model has no price. No tokens or no price for the variant's model: the recorded cost, counted."""
        if prompt or completion:
            new = self.prices.micros(joined.variant_model, prompt, completion)
            if new is not None:
                self.result.repriced += 1
                old = self.prices.micros(joined.baseline_model, prompt, completion)
                return round(micros * new / old) if old else round(new)
        self.result.unpriced += 1
        return micros


_DEFAULT_CONFIG = Config(enabled=True, timeout_ms=_NEVER_MS, tick_ms=0)
_ROUTE_SLOTS = tuple(Route.__dict__[name].__set__ for name in Route.__slots__)  # type: ignore[attr-defined]
if Route.__slots__ != ("session_id", "model", "tier", "rules", "user_explicit", "request_hash",  # type: ignore[attr-defined]
                       "stall", "tools", "long_context", "candidates", "source", "estimates", "reservation_id",
                       "keyword", "tool_repeats", "tool_errors"):
    raise ImportError("engine.tools.backtest builds Route by its slots: update it")


(_put_sid, _put_model, _put_tier, _put_rules, _put_explicit, _put_hash, _put_stall, _put_tools, _put_long,
 _put_candidates, _put_source, _put_estimates, _put_rid, _put_keyword, _put_tool_repeats,
 _put_tool_errors) = _ROUTE_SLOTS
_new = object.__new__


def _route(sid: str, model: str, tier: Tier | None, rules: RouteRules, explicit: bool, request_hash: str,
           stall: bool, tools: bool, long_context: bool, candidates: tuple[str, ...], source: str,
           estimates: tuple[tuple[str, int], ...], rid: str, keyword: str, tool_repeats: int,
           tool_errors: int) -> Route:
    """A ``Route`` from a record the log reader has already checked against the value domains of
    docs/events.md (names, tiers, flags, candidates, estimates), so its own validation is skipped:
    building it is a large share of a re-run decision's cost."""
    route = _new(Route)
    _put_sid(route, sid)
    _put_model(route, model)
    _put_tier(route, tier)
    _put_rules(route, rules)
    _put_explicit(route, explicit)
    _put_hash(route, request_hash)
    _put_stall(route, stall)
    _put_tools(route, tools)
    _put_long(route, long_context)
    _put_candidates(route, candidates)
    _put_source(route, source)
    _put_estimates(route, estimates)
    _put_rid(route, rid)
    _put_keyword(route, keyword)
    _put_tool_repeats(route, tool_repeats)
    _put_tool_errors(route, tool_errors)
    return route


_COST_SLOTS = tuple(Cost.__dict__[name].__set__ for name in Cost.__slots__)  # type: ignore[attr-defined]
if Cost.__slots__ != ("session_id", "micros", "reservation_id", "prompt_tokens", "completion_tokens"):  # type: ignore[attr-defined]
    raise ImportError("engine.tools.backtest builds Cost by its slots: update it")
_put_cost_sid, _put_micros, _put_cost_rid, _put_prompt, _put_completion = _COST_SLOTS


def _settle(sid: str, micros: int, rid: str) -> Cost:
    """``Cost(sid, micros, rid)`` for the session id the variant's ``Route`` was built with and an amount the
    reader checked (an int >= 0) or re-priced: only ``Cost``'s bounds the reader does not check are checked
    here (at most ``MAX_MICROS``, a reservation id of at most 64 characters); past them ``Cost`` raises."""
    if not 0 <= micros <= MAX_MICROS or len(rid) > 64:
        return Cost(sid, micros, rid)  # raises InvalidEvent, naming the field
    cost = _new(Cost)
    _put_cost_sid(cost, sid)
    _put_micros(cost, micros)
    _put_cost_rid(cost, rid)
    _put_prompt(cost, 0)
    _put_completion(cost, 0)
    return cost


def run_backtest(records: Iterable[dict[str, Any]], changes: Mapping[str, Any] | Iterable[str] = (),
                 *, models: tuple[tuple[str, tuple[str, ...]], ...] | None = None, prices: Prices | None = None,
                 session: str | None = None, share: Share | None = None, start: Tail | None = None
                 ) -> BacktestResult:
    """The backtest over a stream of records (in ``seq`` order); ``share``: only that share's sessions are read,
    and ``start`` learns the log's first record (a share tells a snapshot at the log's start by its seq)."""
    run = _Run(parse_changes(changes), models, prices or Prices(), session, share, start)
    run.result.changes = {name: str(value) for name, value in _pairs(changes).items()}
    if session is not None:
        check_session_id(session, "session")  # as every command and the store refuse it
    with paused_gc():
        result = run.feed(records)
        if session is not None and not run.seen:
            raise NoSession(f"no records for session {session!r}")
        # The variant's sessions are dropped while the cyclic GC is still paused: freed by their reference
        # counts now, not traced by the first collection after it resumes (a few % of a large run).
        run.states.clear()
        run.by_rid.clear()
        run.last.clear()
        run.rules.clear()
        return result


def backtest(log: str | Path, changes: Mapping[str, Any] | Iterable[str] = (), *, models: str | Path | None = None,
             prices: str | Path | None = None, session: str | None = None, jobs: int | None = None) -> BacktestResult:
    """The backtest of a log (file or segment directory, every segment on disk), streamed.

    ``changes``: ``{"strike_limit": 5}`` or ``["strike_limit=5"]``; ``models``: a JSON model table file;
    ``prices``: a JSON price file (else LiteLLM's price map when installed). This is what the CLI runs.
    ``jobs``: processes that re-run the sessions, each its share of them (``_parallel``); None: one per
    CPU for a log file of ``PARALLEL_BYTES`` or more read by a process with no other thread (the CLI),
    else 1; the figures are the same whatever it is.
    """
    path = Path(log)
    table = read_models(models) if models else None
    changes = _pairs(changes)  # read once (it may be an iterator)
    parse_changes(changes)  # a bad option is reported before any process starts
    if jobs is not None and (type(jobs) is not int or jobs < 1):
        raise InvalidEvent("jobs", "must be an int >= 1")
    files = history_files(path)
    if session is None and files:
        count = jobs if jobs is not None else (
            _cpus() if sum(f.stat().st_size for f in files) >= PARALLEL_BYTES and _start_method() == "fork" else 1)
        if count > 1:
            result = _parallel(files, changes, table, prices, count)
            if result is not None:
                return result
    if session is not None:
        check_session_id(session, "session")
    try:
        return run_backtest(_history(files), changes, models=table, prices=Prices(prices), session=session)
    except NoSession:
        raise NoSession(f"no records for session {session!r} in {log}") from None


#: A log at least this large (all its files) is backtested by one process per CPU when ``jobs`` is not given.
PARALLEL_BYTES = 16 << 20
#: Most processes ``jobs=None`` starts.
MAX_JOBS = 8


def _cpus() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_JOBS))


def _parallel(files: list[Path], changes: Mapping[str, Any] | Iterable[str], models: Any,
              prices: str | Path | None, jobs: int) -> BacktestResult | None:
    """The backtest in ``jobs`` processes, each re-running its share of the sessions (sessions are independent:
    a decision reads only its own session's state). Each process passes over every line but parses only
    its sessions' (``engine.log.replay.Share``); every line is still checked, by the process that owns it,
    and every ``seq`` by all. Shares are balanced by session size, sampled from the file. The figures are
    summed; they equal a serial run's (tests/tools/test_backtest_parallel.py). None, and the caller runs
    serially, when a share met anything only a serial run can decide or report: a corrupt line (the
    serial run names it), a session without rules of its own (a log that starts at a snapshot holds
    such sessions, mostly)."""
    import multiprocessing

    pairs = _pairs(changes)
    source = Prices(prices).source  # a bad price file is reported before any process starts
    heavy = _heavy_sessions(files, jobs)
    tasks = [([str(f) for f in files], pairs, models, None if prices is None else str(prices), index, jobs, heavy)
             for index in range(jobs)]
    try:
        parts = _run_shares(multiprocessing.get_context(_start_method()), tasks)
    except (OSError, AssertionError, ValueError):  # no processes here (a daemon process, a limit): one it is
        return None
    return None if parts is None else _summed(parts, pairs, source)


def _start_method() -> str:
    """fork is the cheapest start, but only safe in a process with one thread (and not on every platform);
    else a fresh server forks the shares, or each starts afresh: both import the caller's ``__main__``
    first, so they are used only when ``jobs`` asks for processes (a script then guards its top level
    with ``if __name__ == "__main__":``, as multiprocessing requires)."""
    import multiprocessing
    import threading

    methods = multiprocessing.get_all_start_methods()
    return next(m for m in ("fork", "forkserver", "spawn")
                if m in methods and (m != "fork" or threading.active_count() == 1))


def _run_shares(context: Any, tasks: list[tuple[Any, ...]]) -> list[BacktestResult] | None:
    """One process per share, each answering through its own pipe; None as soon as one answers anything but
    its figures or dies without answering (the others are stopped: the caller runs serially)."""
    from multiprocessing.connection import wait

    running: dict[Any, Any] = {}
    try:
        for task in tasks:
            reader, writer = context.Pipe(duplex=False)
            process = context.Process(target=_share_main, args=(writer, task), daemon=True)
            process.start()
            writer.close()  # the share holds the only writer: its death is the reader's end of file
            running[reader] = process
        parts: list[BacktestResult] = []
        while running:
            for reader in wait(list(running)):
                process = running.pop(reader)
                try:
                    part = reader.recv()
                except EOFError:  # killed (out of memory, a signal) before it answered
                    part = None
                reader.close()
                process.join()
                if not isinstance(part, BacktestResult):
                    return None
                parts.append(part)
        return parts
    finally:
        for process in running.values():
            process.terminate()
        for process in running.values():
            process.join()


def _share_main(writer: Any, task: tuple[Any, ...]) -> None:
    with writer:
        writer.send(_share_run(task))


def _owner(heavy: dict[bytes, int], jobs: int) -> Callable[[bytes], int]:
    """Which share a session id (UTF-8 bytes) belongs to: the sampled heavy sessions as balanced, the rest
    by a hash that is the same in every process (``crc32``; Python's ``hash`` of bytes is salted)."""
    crc32 = zlib.crc32

    def owner(sid: bytes) -> int:
        index = heavy.get(sid)
        return crc32(sid) % jobs if index is None else index

    return owner


def _share_run(task: tuple[Any, ...]) -> BacktestResult | str:
    files, pairs, models, prices, index, jobs, heavy = task
    try:
        share, start = Share(index, _owner(heavy, jobs)), Tail()
        records = _history([Path(f) for f in files], start, share)
        return run_backtest(records, pairs, models=models, prices=Prices(prices), share=share, start=start)
    except Exception as exc:  # anything (_Serial, a corrupt line): the caller runs serially and reports it
        return f"{type(exc).__name__}: {exc}"


#: Evenly spaced blocks of the file whose lines ``_heavy_sessions`` counts.
_SAMPLES, _SAMPLE_BYTES = 256, 1 << 16


def _cost_of(line: bytes) -> int:
    """A line's share of a backtest's time, roughly (measured on the bench log: a re-run decision takes
    about 8 times a line that is only read, a settled cost 2.5 times)."""
    if b'"event":"decision.made"' in line:
        return 80
    return 25 if b'"event":"cost.added"' in line else 10


def _heavy_sessions(files: list[Path], jobs: int) -> dict[bytes, int]:
    """The sessions seen in 256 blocks of 64 KiB sampled evenly over the log's files, weighed by ``_cost_of``
    their lines there and assigned to shares largest first, each to the share with the least so far; the
    sessions the sample missed (small ones, mostly) are spread by hash."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    counts: dict[bytes, int] = {}
    match = PREFIX.match
    for file, size in zip(files, sizes, strict=True):
        samples = round(_SAMPLES * size / total) if total else 0
        if not samples:
            continue
        with open(file, "rb") as f:
            for k in range(samples):
                f.seek(size * k // samples)
                for line in f.read(_SAMPLE_BYTES).split(b"\n")[1:-1]:  # whole lines only
                    placed = match(line)
                    if placed is not None:
                        sid = placed[1]
                        counts[sid] = counts.get(sid, 0) + _cost_of(line)
    # Largest first, each to the least loaded share: the sampled sessions' shares balance to within the smallest.
    loads = [0] * jobs
    heavy: dict[bytes, int] = {}
    for n, sid in sorted(((n, sid) for sid, n in counts.items()), reverse=True):
        index = loads.index(min(loads))
        heavy[sid] = index
        loads[index] += n
    return heavy


def _summed(parts: list[BacktestResult], pairs: dict[str, Any], prices: str) -> BacktestResult:
    """One result from the shares' (they hold disjoint sessions: every figure is a sum)."""
    result = BacktestResult(changes={name: str(value) for name, value in pairs.items()}, prices=prices)
    for part in parts:
        for mine, theirs in ((result.baseline, part.baseline), (result.variant, part.variant), (result, part)):
            _add_counts(mine, theirs)
        for mine, theirs in ((result.baseline, part.baseline), (result.variant, part.variant)):
            for kind, n in theirs.kinds.items():
                mine.kinds[kind] = mine.kinds.get(kind, 0) + n
        if part.prices != prices:  # a share that needed LiteLLM's price map and found none
            result.prices = part.prices
    return result


def _add_counts(into: Any, other: Any) -> None:
    """Add every int field of a ``Figures`` or ``BacktestResult`` (its counts) to ``into``'s."""
    for f in dataclasses.fields(into):
        value = getattr(other, f.name)
        if type(value) is int:
            setattr(into, f.name, getattr(into, f.name) + value)


def _history(files: list[Path], start: Tail | None = None, share: Share | None = None) -> Iterator[dict[str, Any]]:
    """The records of ``files`` as one log (each file's first seq follows the previous file's last); ``start``
    learns the first file's first record; ``share``: read_file's. A single file is read by ``read_file``
    itself (no generator in between: a record costs ~0.1 µs less)."""
    start = start if start is not None else Tail()
    if len(files) == 1:
        return read_file(files[0], start, light=_LIGHT, share=share)
    return _chained(files, start, share)


def _chained(files: list[Path], start: Tail, share: Share | None) -> Iterator[dict[str, Any]]:
    expect = None
    for index, file in enumerate(files):
        tail = start if index == 0 else Tail()
        yield from read_file(file, tail, expect=expect, last=index == len(files) - 1, light=_LIGHT, share=share)
        expect = tail.last_seq
