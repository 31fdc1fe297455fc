"""engine.core.affinity's functions are the choices of the core's rule (engine.core.rules.deployment_affinity).

The LiteLLM hook places the Router's healthy deployments with ``place``/``switches`` after the routing
turn, and both the hook and ``record_response`` record with ``served_record``: these tests hold each to
what the core's rule decides in a routing turn for the same recorded deployments and candidates.
"""

from __future__ import annotations

from hypothesis import event, given
from hypothesis import strategies as st

from engine import Tier
from engine.core.affinity import GROUP_KINDS, PIN_KINDS, place, recorded, served_record, switches
from engine.core.entry import Entry
from engine.policy import Kind, Options, Request, decide
from events import SetDeployment

MODEL = "moonshot/kimi-k2"
CHEAP = "openai/gpt-4o-mini"
MODELS = {Tier.SIMPLE: CHEAP, Tier.MEDIUM: MODEL, Tier.COMPLEX: "anthropic/claude-opus"}
POOL = ("openai:a@https://x", "openai:b@https://x", "azure:c", "openrouter:d")

candidates_of = st.lists(st.sampled_from(POOL), min_size=1, max_size=4, unique=True).map(tuple)
recorded_of = st.sampled_from(("", *POOL))


def pinned(deployment: str, group: str = "") -> Entry:
    """A session pinned to MODEL at MEDIUM for two turns; ``group``: CHEAP's group pin at SIMPLE."""
    return Entry(MODEL, Tier.MEDIUM, 0, 0, 2, deployment=deployment,
                 deployments=((CHEAP, Tier.SIMPLE.value, group),) if group else ())


@given(served=recorded_of, candidates=candidates_of)
def test_a_retained_pin_goes_where_place_says_and_switches_as_switches_says(served: str,
                                                                           candidates: tuple[str, ...]) -> None:
    state = pinned(served)
    request = Request(model=MODEL, tier=Tier.MEDIUM, session_id="s", candidates=candidates,
                      messages=[{"role": "user", "content": "go on"}])
    d = decide(request, state, MODELS, Options())
    assert d.kind in (Kind.RETAIN, Kind.SWITCH)
    assert recorded(state, Kind.RETAIN, MODEL, Tier.MEDIUM) == served == d.served_deployment
    deployment, ordered, gone = place(served, candidates)
    event(f"gone={gone} recorded={bool(served)}")
    assert (d.deployment, d.candidates) == (deployment, ordered)
    assert (d.kind is Kind.SWITCH) == switches(Kind.RETAIN, gone)
    moved = served_record("s", deployment, Kind.RETAIN)
    assert (moved in d.events) == (not served or gone)


@given(served=recorded_of, group=recorded_of, candidates=candidates_of)
def test_a_bypass_goes_to_its_group_pin_as_place_says(served: str, group: str, candidates: tuple[str, ...]) -> None:
    state = pinned(served, group)
    request = Request(model=CHEAP, tier=Tier.SIMPLE, session_id="s", candidates=candidates,
                      messages=[{"role": "user", "content": "go on"}])
    d = decide(request, state, MODELS, Options(strategy="none"))
    assert d.kind is Kind.BYPASS
    assert recorded(state, Kind.BYPASS, CHEAP, Tier.SIMPLE) == group == d.served_deployment
    deployment, ordered, gone = place(group, candidates)
    event(f"gone={gone} recorded={bool(group)}")
    assert (d.deployment, d.candidates) == (deployment, ordered)
    assert not switches(Kind.BYPASS, gone)
    record = served_record("s", deployment, Kind.BYPASS, CHEAP, Tier.SIMPLE)
    assert record == SetDeployment("s", deployment, CHEAP, Tier.SIMPLE)
    assert (record in d.events) == (not group or gone)
    assert SetDeployment("s", deployment) not in d.events  # the pin's deployment is left alone


def test_served_record_names_the_pin_the_group_or_nothing() -> None:
    for kind in PIN_KINDS:
        assert served_record("s", "dep", kind, CHEAP, Tier.SIMPLE) == SetDeployment("s", "dep")
    for kind in GROUP_KINDS:
        assert served_record("s", "dep", kind, CHEAP, Tier.SIMPLE) == SetDeployment("s", "dep", CHEAP, Tier.SIMPLE)
        assert served_record("s", "dep", kind) is None  # a bypass with no model group names no group pin
    assert served_record("s", "dep", None) == SetDeployment("s", "dep")  # no decision: the pin served
    for kind in (Kind.REFUSE, Kind.UNAVAILABLE):  # not served by the session's choice
        assert served_record("s", "dep", kind, CHEAP, Tier.SIMPLE) is None
    assert served_record("s", "", Kind.RETAIN) is None
    assert set(Kind) == PIN_KINDS | GROUP_KINDS | {Kind.REFUSE, Kind.UNAVAILABLE}
