"""Error types shared by events/ and engine/ (re-exported from both)."""

from __future__ import annotations

__all__ = [
    "EngineError", "InvalidEvent",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidEvent(EngineError, ValueError):
    """Bad input: the message names the field and the rule, never the value."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field} {rule}")
        self.field = field
        self.rule = rule
