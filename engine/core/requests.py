"""What a router reads from a request (the seed's functions, pure): the session id header, a derived id,
the request hash the strikes compare, and whether the context is long enough for a cache pin."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from engine.core.entry import MessageInfo

__all__ = ["DEFAULT_HEADER", "derive_session_id", "get_session_id", "hash_request_content", "should_cache_sticky"]

DEFAULT_HEADER = "x-session-id"
_WHITESPACE = re.compile(r"\s+")
#: Tokens are estimated as UTF-8 bytes // 3, as the seed does.
_STICKY_ONE_MESSAGE_TOKENS = 3000
_STICKY_HISTORY_TOKENS = 5000



def derive_session_id(first_user_message: str) -> str:
    """Lower-case hex SHA-256 of the first user message (unkeyed: see docs/identity.md)."""
    return hashlib.sha256(first_user_message.encode("utf-8", "surrogatepass")).hexdigest()


def get_session_id(headers: Any, header_name: str = "") -> str:
    """Case-insensitive header lookup in any mapping-like headers object; "" when missing."""
    name = (header_name or DEFAULT_HEADER).lower()
    if headers is None:
        return ""
    value: Any = None
    items = headers.items() if hasattr(headers, "items") else headers
    for key, val in items:
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(key, str) and key.lower() == name:
            value = val
            break
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if isinstance(value, str) else ""


_HASHED_CHARS = 500


def _normalized_prefix(content: str) -> str:
    r"""``re.sub(r"\s+", " ", content).strip()[:500]`` without collapsing a long prompt whole.

    Collapsing a prefix gives the same first characters as collapsing everything, so once a
    prefix yields more than 500 characters its first 500 are the answer.
    """
    size = 1024
    while size < len(content):
        text = _WHITESPACE.sub(" ", content[:size]).lstrip()
        if len(text) > _HASHED_CHARS:
            return text[:_HASHED_CHARS]
        size *= 4
    return _WHITESPACE.sub(" ", content).strip()[:_HASHED_CHARS]


def hash_request_content(content: str, tool_names: Iterable[str] | None = None) -> str:
    """Short hash of a request: whitespace collapsed, first 500 chars, tool names appended.

    The seed's regular expression ``s+`` matched the letter s; this collapses
    real whitespace, as the seed's documentation says.
    """
    text = _normalized_prefix(content)
    names = sorted(tool_names or ())
    if names:
        text += "|tools:" + ",".join(names)
    # surrogatepass: a lone surrogate a JSON body carried hashes (as valid text hashes the same), never raises.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _content(message: MessageInfo | Mapping[str, Any]) -> str:
    if isinstance(message, MessageInfo):
        return message.content
    content = message.get("content") or ""
    return content if isinstance(content, str) else str(content)


def should_cache_sticky(messages: Iterable[MessageInfo | Mapping[str, Any]]) -> bool:
    """Whether the context is long enough to pin a provider for its prefix cache."""
    total = 0
    for message in messages:
        size = len(_content(message).encode("utf-8", "surrogatepass"))
        if size // 3 >= _STICKY_ONE_MESSAGE_TOKENS:
            return True
        total += size
    return total // 3 >= _STICKY_HISTORY_TOKENS
