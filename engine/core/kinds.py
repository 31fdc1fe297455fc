"""What a routing decision did: the one ``Kind`` every rule, reader and counter uses.

Pure (the standard library only). ``engine.policy.Kind`` is this enum; a ``str`` enum, so a kind
compares equal to, hashes as and is logged as its value (``decision.made``'s ``kind``).
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "Kind",
]


class Kind(str, Enum):
    """What a decision did, as logged in ``decision.made`` records."""

    INITIALIZE = "initialize"  # a new pin: first turn, end of warmup, or a user-explicit model
    RETAIN = "retain"  # the pinned model serves the request
    UPGRADE = "upgrade"  # the router asked for a higher tier: the pin moves up
    BYPASS = "bypass"  # another model serves this request; the pin is unchanged
    ESCALATE = "escalate"  # three-strike: the pin moves one tier up
    SWITCH = "switch"  # the deployment that served the session is gone: another one takes over
    REFUSE = "refuse"  # over budget: the request is not served (BudgetExceeded)
    UNAVAILABLE = "unavailable"  # the engine did not answer in time: the router's own choice

    def __str__(self) -> str:
        return self.value
