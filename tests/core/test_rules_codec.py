"""The ``rules`` object of ``decision.made``: one encoder (``engine.core.transitions.rules_fields``) and its decoder
(``rules_from_fields``) side by side; the backtest decodes through it and reads ``--set`` through the policy's
own options and encoding."""

from __future__ import annotations

import dataclasses

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Config, Tier
from engine.core.transitions import RULES_BEFORE, rules_fields, rules_from_fields
from engine.policy import Options, route_rules
from engine.tools.backtest import parse_changes
from events import InvalidEvent, RouteRules
from events._events import BUDGET_MODES, MAX_STALL_WINDOW, STALL_DETECTORS, STRATEGIES

_models = st.lists(st.text(st.characters(categories=("L", "N")), min_size=1, max_size=12), max_size=3).map(tuple)
_table = st.lists(st.tuples(st.sampled_from([t.value for t in Tier]), _models), max_size=4, unique_by=lambda p: p[0])
rules_st = st.builds(
    RouteRules, models=_table.map(tuple), strategy=st.sampled_from(STRATEGIES), simple_bypass=st.booleans(),
    warmup_turns=st.integers(0, 10), escalate_on_strikes=st.booleans(), strike_limit=st.integers(0, 10),
    cache_sticky=st.booleans(), max_cost_micros=st.integers(-1, 10**12), budget_mode=st.sampled_from(BUDGET_MODES),
    reservation_ttl_ms=st.integers(1, 10**9), stall_detector=st.sampled_from(STALL_DETECTORS),
    stall_window=st.integers(1, MAX_STALL_WINDOW), stall_lift=st.booleans(), candidates_by_provider=st.booleans(),
    affinity_by_record=st.booleans())


@settings(max_examples=200, deadline=None)
@given(rules_st, st.integers(1, 20), st.booleans())
def test_encode_then_decode_gives_the_rules_back(rules, strike_limit, auto):
    config = Config(strike_limit=strike_limit, auto_escalate=auto)
    logged = orjson.loads(orjson.dumps(rules_fields(rules, config)))  # as the log holds it
    assert rules_from_fields(logged) == (rules, strike_limit, auto)


def test_every_rule_field_is_encoded():
    names = {f.name for f in dataclasses.fields(RouteRules)}
    assert names <= set(rules_fields(RouteRules(), Config()))


def test_a_field_an_older_log_lacks_reads_as_the_rules_then_were():
    rules, strike_limit, auto = rules_from_fields({})
    assert rules == RouteRules(**RULES_BEFORE) and (strike_limit, auto) == (2, False)
    assert rules.stall_detector == "strikes" and not rules.affinity_by_record


def test_a_bad_rules_object_names_its_field():
    with pytest.raises(InvalidEvent) as err:
        rules_from_fields({"budget_mode": "lenient"})
    assert err.value.field == "budget_mode"


def test_set_is_checked_and_encoded_by_the_policy_s_options():
    for usd in ("0.25", "1.0000005", "0", "12.345678"):
        cap = route_rules({}, Options(max_cost_usd=float(usd))).max_cost_micros
        assert parse_changes([f"max_cost_usd={usd}"]) == {"max_cost_micros": cap}
    assert parse_changes(["max_cost_usd=none", "strike_limit=4"]) == {"max_cost_micros": -1, "strike_limit": 4}
    for bad in ("strike_limit=0", "warmup_turns=-1", "reservation_ttl_ms=0", "strategy=greedy",
                "stall_detector=magic", "warmup_turns=x"):
        with pytest.raises(InvalidEvent) as err:
            parse_changes([bad])
        assert err.value.field == bad.partition("=")[0]
