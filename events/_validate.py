"""Field checks used by the events' constructors. Messages never echo the value."""

from __future__ import annotations

import re

from events._errors import InvalidEvent

__all__ = [
    "MAX_ID_LEN", "MAX_MICROS", "MAX_TOTAL_MICROS", "UNENCODABLE", "check_bool", "check_micros", "check_session_id",
    "check_text", "encodable", "is_valid_session_id", "text_problem",
]

MAX_ID_LEN = 256
MAX_TEXT_LEN = 256
# One event may add at most a billion dollars.
MAX_MICROS = 10**15
#: A session's running total (session_cost_micros) stays within a signed 64-bit int, which the log's JSON
#: writer (orjson) and its readers hold: a cost that would push it past is refused in the session's turn
#: (engine/core/transitions.py), whatever each event's own cap.
MAX_TOTAL_MICROS = 2**63 - 1

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


#: The rule a text with a lone surrogate breaks (UTF-8, and so the log's JSON, cannot hold one).
UNENCODABLE = "must be valid Unicode text (no lone surrogates)"


def encodable(value: str) -> bool:
    """Whether the log's JSON writer (orjson: UTF-8) can write ``value``: False for a lone surrogate
    (U+D800-U+DFFF alone), which a JSON body's ``\\ud800`` escape can carry into a Python str."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text_problem(value: str) -> str | None:
    """The rule a non-printable ``value`` breaks (control characters, lone surrogates), or None.

    Called only when ``value.isprintable()`` is False: every control character and every surrogate
    is non-printable, so the usual text is passed by that one C-speed test."""
    if _CONTROL.search(value) is not None:
        return "must not contain control characters"
    if not encodable(value):
        return UNENCODABLE
    return None


def check_text(value: object, field: str, max_len: int = MAX_TEXT_LEN) -> None:
    if type(value) is not str:
        raise InvalidEvent(field, f"must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise InvalidEvent(field, f"must be at most {max_len} characters, got {len(value)}")
    # isprintable() is False for every control character and every lone surrogate: a C-speed pass
    # for the usual id.
    if not value.isprintable():
        rule = text_problem(value)
        if rule is not None:
            raise InvalidEvent(field, rule)


def check_session_id(value: object, field: str = "session_id") -> None:
    check_text(value, field, MAX_ID_LEN)


def is_valid_session_id(value: object) -> bool:
    """Whether ``value`` would pass ``check_session_id`` (for callers that fall back instead of raising)."""
    return type(value) is str and len(value) <= MAX_ID_LEN and (value.isprintable() or text_problem(value) is None)


def check_bool(value: object, field: str) -> None:
    if type(value) is not bool:
        raise InvalidEvent(field, f"must be a bool, got {type(value).__name__}")


def check_micros(value: object, field: str = "micros") -> None:
    if type(value) is not int:
        raise InvalidEvent(field, f"must be a non-negative int, got {type(value).__name__}")
    if value < 0:
        raise InvalidEvent(field, "must be a non-negative int, got a negative int")
    if value > MAX_MICROS:
        raise InvalidEvent(field, f"must be at most {MAX_MICROS} per event")
