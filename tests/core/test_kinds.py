"""One decision ``Kind``: the rules, the policy, the hook and the readers all use engine.core.kinds.Kind."""

from __future__ import annotations

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before LiteLLM is imported: never fetch a price map

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

import engine.policy
from engine import Entry, Tier
from engine.core.config import default_config
from engine.core.kinds import Kind
from engine.core.rules import decide_route
from events import Route, RouteRules

MODELS = (("SIMPLE", ("openai/gpt-4o-mini",)), ("MEDIUM", ("openai/gpt-4o",)), ("COMPLEX", ("openai/o3",)))


def test_the_policy_s_kind_is_the_core_s():
    assert engine.policy.Kind is Kind
    assert [k.value for k in Kind] == ["initialize", "retain", "upgrade", "bypass", "escalate", "switch", "refuse",
                                       "unavailable"]


def test_a_kind_is_logged_compared_and_hashed_as_its_value():
    assert orjson.dumps({"kind": Kind.BYPASS}) == b'{"kind":"bypass"}'
    assert Kind.REFUSE == "refuse" and "refuse" in {Kind.REFUSE} and {"refuse": 1}.get(Kind.REFUSE) == 1
    assert str(Kind.SWITCH) == "switch"


def test_the_hook_s_kind_sets_are_kinds():
    from engine.integrations import litellm

    for kinds in (litellm._PINNING, litellm._RETAINED, litellm._BYPASSED):
        assert all(type(k) is Kind for k in kinds)
    assert Kind.BYPASS not in litellm._PINNING and Kind.REFUSE not in litellm._PINNING


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["sticky", "adaptive", "none"]), st.sampled_from([None, *Tier]), st.integers(0, 3),
       st.booleans(), st.integers(-1, 3))
def test_every_decision_of_the_rules_is_a_kind(strategy, tier, turns, explicit, cap):
    rules = RouteRules(MODELS, strategy, max_cost_micros=cap)
    state = None if turns == 0 else Entry("openai/gpt-4o", Tier.MEDIUM, 0, 0, turns)
    route = Route("s", "openai/gpt-4o", tier, rules, explicit, "h", estimates=(("", 2),),
                  reservation_id="r" if cap >= 0 else "")
    routed, _ = decide_route(state, route, default_config())
    assert type(routed.kind) is Kind
