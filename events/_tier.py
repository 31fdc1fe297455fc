"""Routing tiers, ranked SIMPLE < MEDIUM < COMPLEX < REASONING."""

from __future__ import annotations

from enum import Enum

from events._errors import InvalidEvent

__all__ = [
    "Tier", "parse_tier", "tier_above", "tier_rank",
]


class Tier(str, Enum):
    SIMPLE = "SIMPLE"
    MEDIUM = "MEDIUM"
    COMPLEX = "COMPLEX"
    REASONING = "REASONING"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def __str__(self) -> str:
        return self.value


_RANK = {Tier.SIMPLE: 0, Tier.MEDIUM: 1, Tier.COMPLEX: 2, Tier.REASONING: 3}
_BY_RANK = (Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX, Tier.REASONING)


def tier_rank(tier: Tier | None) -> int:
    """Rank of a tier; "no tier" ranks as MEDIUM, as the seed ranks unknown tiers."""
    return 1 if tier is None else _RANK[tier]


def tier_above(tier: Tier | None) -> Tier:
    """The tier one step up; REASONING stays REASONING."""
    return _BY_RANK[min(tier_rank(tier) + 1, 3)]


def parse_tier(value: object, field: str = "tier") -> Tier | None:
    """Accept a Tier, its value as a string, or ""/None for "no tier"."""
    if value is None or value == "":
        return None
    if isinstance(value, Tier):
        return value
    if isinstance(value, str):
        try:
            return Tier(value)
        except ValueError:
            pass
        raise InvalidEvent(field, "must be one of SIMPLE, MEDIUM, COMPLEX, REASONING or empty")
    raise InvalidEvent(field, f"must be a Tier, a tier name or None, got {type(value).__name__}")
