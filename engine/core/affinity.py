"""Deployment affinity's pure pieces: the deployment a session recorded serving what a decision serves,
where it goes among the deployments able to serve, and the record of the deployment that served.

``recorded``, ``place`` and ``switches`` are the choices the core's rule
(``engine.core.rules.deployment_affinity``) makes in the routing turn, as functions of their inputs
(tests/core/test_affinity_functions.py holds them to the rule), and the rule calls them. The LiteLLM
hook's ``async_filter_deployments`` places the Router's healthy deployments with them after the routing
turn (health filtering and retries happen after it); ``served_record`` is what both the policy's
``record_response`` and the hook's ``async_pre_call_deployment_hook`` record for the deployment that served."""

from __future__ import annotations

from engine.core.entry import Entry
from engine.core.kinds import Kind
from events import SetDeployment, Tier

__all__ = ["GROUP_KINDS", "PIN_KINDS", "SWITCHED", "place", "recorded", "served_first", "served_record",
           "switches"]

#: Decisions served by the session's pin: the deployment that serves one is the pin's (``Entry.deployment``).
PIN_KINDS = frozenset({Kind.INITIALIZE, Kind.RETAIN, Kind.UPGRADE, Kind.ESCALATE, Kind.SWITCH})
#: Decisions served without moving the pin (SIMPLE bypass, budget downgrade, strategy none): the deployment
#: that serves one is the deployment pin of its own (model group, tier) (``Entry.deployments``).
GROUP_KINDS = frozenset({Kind.BYPASS})
#: What a switch's reason says.
SWITCHED = "deployment gone, switched"


def recorded(state: Entry | None, kind: str, model: str, tier: Tier | None) -> str:
    """The deployment the session recorded serving what a decision of ``kind`` serves ("" when none): a
    bypass's group pin for (``model``, ``tier``), else the deployment that served the pinned model."""
    if state is None:
        return ""
    if kind in GROUP_KINDS:
        return state.group_deployment(model, tier) if state.deployments else ""
    return state.deployment


def served_first(served: str, candidates: tuple[str, ...]) -> tuple[str, ...]:
    """``candidates`` (which hold ``served``) with ``served`` first and not repeated."""
    if candidates[0] == served and candidates.count(served) == 1:
        return candidates  # the usual case: the deployment that served the session is already first
    return (served, *[c for c in candidates if c != served])


def place(served: str, candidates: tuple[str, ...]) -> tuple[str, tuple[str, ...], bool]:
    """Where the request goes among ``candidates`` (not empty): ``(deployment, candidates, gone)``.

    The recorded deployment ``served`` goes first when it is a candidate; otherwise the first candidate,
    and ``gone`` says the session had recorded a deployment that can no longer serve it."""
    if served and served in candidates:
        return served, served_first(served, candidates), False
    return candidates[0], candidates, bool(served)


def switches(kind: str, gone: bool) -> bool:
    """A retained pin whose recorded deployment is gone switches to another (a new pin, a move or a
    bypass just records the one that serves)."""
    return gone and kind == Kind.RETAIN


def served_record(session_id: str, deployment: str, kind: str | None, model: str = "",
                  tier: Tier | str | None = None) -> SetDeployment | None:
    """The record that ``deployment`` served a request decided ``kind`` for ``model`` at ``tier``.

    A decision served by the pin (``PIN_KINDS``; ``None``: no decision, the pinned model served)
    records the pin's deployment; a bypass (``GROUP_KINDS``) the deployment pin of its (model, tier);
    a refusal or an unavailable decision (the router's own choice, not the session's) records none."""
    if not deployment:
        return None
    if kind is None or kind in PIN_KINDS:
        return SetDeployment(session_id, deployment[:256])
    if kind in GROUP_KINDS and model:
        return SetDeployment(session_id, deployment[:256], model[:256], tier)
    return None
