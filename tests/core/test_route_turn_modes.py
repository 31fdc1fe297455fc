"""The routing turn without its ``decision.made`` record (``apply(..., decision_record=False)``, the
backtest's re-run) is the same turn: same state, same result, the same records but that one. And a
turn never changes the entry it was handed (its implied events share one new entry, built in the turn)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.config import Config
from engine.core.transitions import apply, entry_fields
from events import Cost, Release, Route, RouteRules, SetDeployment, Tier
from events import records as record_names

SID = "s"
MODELS = (("SIMPLE", ("openai/gpt-4o-mini",)), ("MEDIUM", ("anthropic/claude-sonnet-4.5", "openai/gpt-4.1")),
          ("COMPLEX", ("anthropic/claude-opus-4.1",)), ("REASONING", ("openai/o3",)))
ESTIMATES = (("openai/gpt-4o-mini", 300), ("anthropic/claude-sonnet-4.5", 9_000), ("openai/gpt-4.1", 6_000),
             ("anthropic/claude-opus-4.1", 45_000), ("openai/o3", 6_000))

rules = st.builds(RouteRules, st.just(MODELS), st.sampled_from(["sticky", "adaptive", "none"]), st.booleans(),
                  st.integers(0, 2), st.booleans(), st.integers(0, 3), st.booleans(),
                  st.sampled_from([-1, 20_000, 200_000]), st.sampled_from(["graceful", "strict"]),
                  st.sampled_from([1_000, 600_000]), st.sampled_from(["window", "strikes"]), st.integers(1, 6),
                  st.booleans())


@st.composite
def routes(draw: st.DrawFn, n: int) -> Route:
    tier = draw(st.sampled_from([None, *Tier]))
    model = dict(MODELS).get(tier.value if tier else "MEDIUM", ("openai/gpt-4.1",))[0]
    the_rules = draw(rules)
    return Route(SID, draw(st.sampled_from([model, "openai/o3"])), tier, the_rules, draw(st.booleans()),
                 draw(st.sampled_from(["", "a", "b"])), draw(st.booleans()), draw(st.booleans()), draw(st.booleans()),
                 draw(st.sampled_from([(), ("d:east", "d:west"), ("d:west", "d:east", "d:west")])), "test",
                 draw(st.sampled_from([(), ESTIMATES, (("", 5_000),)])), f"r{n}",
                 draw(st.sampled_from(["", "", "LITELLM ESCALATE"])), draw(st.integers(0, 4)), draw(st.integers(0, 4)))


@st.composite
def sequences(draw: st.DrawFn) -> list[tuple[object, int]]:
    out: list[tuple[object, int]] = []
    for n in range(draw(st.integers(1, 25))):
        gap = draw(st.sampled_from([0, 10, 5_000, 700_000]))
        kind = draw(st.sampled_from(["route", "route", "route", "cost", "release", "deployment"]))
        if kind == "route":
            out.append((draw(routes(n)), gap))
        elif kind == "cost":
            out.append((Cost(SID, draw(st.integers(0, 50_000)), f"r{draw(st.integers(0, n))}", 10, 5), gap))
        elif kind == "release":
            out.append((Release(SID, f"r{draw(st.integers(0, n))}"), gap))
        else:
            out.append((SetDeployment(SID, draw(st.sampled_from(["d:east", "d:west"]))), gap))
    return out


configs = st.builds(Config, enabled=st.just(True), timeout_ms=st.sampled_from([1_000_000, 3_600_000]),
                    auto_escalate=st.booleans(), strike_limit=st.integers(1, 3))


@settings(max_examples=300, deadline=None)
@given(configs, sequences())
def test_a_route_turn_without_its_decision_record_is_the_same_turn(config: Config, sequence: list) -> None:
    """Both modes, in lockstep over one session's life: equal states and results; the records are the
    same but for decision.made, which only the default mode writes. The entry handed to a turn keeps
    every field (a turn's implied events update only the entry the turn itself built)."""
    state, now, routed = None, 1_700_000_000_000, 0
    for event, gap in sequence:
        now += gap
        before = entry_fields(state) if state is not None else None
        full = apply(state, event, now, config)
        if type(event) is Route:
            routed += 1
            lean = apply(state, event, now, config, decision_record=False)
            assert lean.state == full.state
            assert lean.result == full.result
            assert [n for n, _ in full.records].count(record_names.DECISION_MADE) == 1
            assert list(lean.records) == [rec for rec in full.records if rec[0] != record_names.DECISION_MADE]
        else:
            assert apply(state, event, now, config, decision_record=False) == full  # no other event changes
        if state is not None:
            assert entry_fields(state) == before, f"{type(event).__name__} changed the entry it was handed"
        state = full.state
