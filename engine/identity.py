"""Session identity: find a request's session id in its headers and body, and say where it came from.

``IdentityResolver.resolve(headers, body, tenant=...)`` walks a configurable
chain of sources and returns ``(session_id, source)``. The default order:

1. the configured header (``x-session-id``);
2. headers that agent harnesses send on their own (``x-litellm-session-id``, ``x-session-affinity``, ...);
3. any other vendor ``x-<vendor>-session-id`` header, LiteLLM's convention;
4. the OpenAI-compatible body field ``prompt_cache_key``, then ``user``;
5. an Anthropic Messages body's ``metadata.user_id``: JSON (or an object) with a ``session_id``, or
   Claude Code's ``user_<hash>_account_<uuid>_session_<id>`` string;
6. the W3C ``baggage`` header's ``session.id`` entry;
7. a fingerprint of the system prompt plus the first user message, keyed per tenant (HMAC).

With a tenant (``Scope.tenant`` of the authenticated caller), every id from
every source is scoped by it (``<tenant>:<id>``, engine/core/scope.py): two
callers never name the same session.

An explicit id that is invalid (too long, control characters, a scope of its
own) gives *no*
session, ``("", "invalid:<source>")``, rather than silently falling back to
a weaker source: a caller that meant to name its session must not be merged
into a fingerprint it did not choose. docs/identity.md explains each source.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

import orjson

from engine.core.requests import DEFAULT_HEADER, get_session_id
from engine.core.scope import (
    SECRET_ENV,
    Scope,
    check_caller_id,
    check_tenant,
    is_tenant,
    scoped,
    split,
    tenant_of,
)
from events import InvalidEvent
from events._validate import check_text

__all__ = [
    "AFFINITY_HEADER", "BAGGAGE", "DEFAULT_AFFINITY_HEADERS", "DEFAULT_ORDER", "FINGERPRINT", "HEADER",
    "INVALID_PREFIX", "METADATA_USER_ID", "NONE", "PROMPT_CACHE_KEY", "SECRET_ENV", "USER", "VENDOR_HEADER",
    "IdentityResolver", "Scope", "baggage_session", "check_caller_id", "check_tenant", "first_user_message",
    "is_tenant", "keyed_session_id", "message_text", "resolve_session", "scoped", "scoped_session_id", "split",
    "system_prompt", "tenant_of",
]

#: Source names, in the default resolution order. A resolved source is one of these,
#: with the header's name appended for header sources ("header:x-session-id").
HEADER = "header"
AFFINITY_HEADER = "affinity_header"
VENDOR_HEADER = "vendor_header"
PROMPT_CACHE_KEY = "prompt_cache_key"
USER = "user"
METADATA_USER_ID = "metadata.user_id"
BAGGAGE = "baggage"
FINGERPRINT = "fingerprint"
NONE = "none"
INVALID_PREFIX = "invalid:"

DEFAULT_ORDER: tuple[str, ...] = (HEADER, AFFINITY_HEADER, VENDOR_HEADER, PROMPT_CACHE_KEY, USER, METADATA_USER_ID,
                                  BAGGAGE, FINGERPRINT)
_KNOWN = frozenset(DEFAULT_ORDER)

#: Headers harnesses and gateways send on their own (docs/identity.md cites where each comes from).
DEFAULT_AFFINITY_HEADERS: tuple[str, ...] = (
    "x-litellm-session-id",  # LiteLLM's own session header
    "x-session-affinity",  # opencode
    "x-claude-code-session-id",  # Claude Code
    "session_id",  # Codex CLI
    "session-id",  # Codex CLI, as some proxies normalise it
    "x-model-affinity",  # Plano's affinity header, sent by its clients
)

#: ``x-<vendor>-session-id`` (LiteLLM's ``_GENERIC_SESSION_ID_HEADER_RE``) and the value such a header
#: must hold to count (LiteLLM's ``_SESSION_ID_VALUE_RE``: 8 or more of letters, digits, ``-``, ``_``).
_VENDOR_HEADER_RE = re.compile(r"^x-.+-session-id$", re.IGNORECASE)
_VENDOR_VALUE_RE = re.compile(r"^[A-Za-z0-9_\-]{8,}$")
#: The id after Claude Code's ``_session_`` marker (LiteLLM's ``_ANTHROPIC_SESSION_ID_VALUE_RE``).
_SUFFIX_VALUE_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_SESSION_MARKER = "_session_"

_SYSTEM_ROLES = frozenset({"system", "developer"})


# -- message text -----------------------------------------------------------------
def message_text(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    return ""


def _field(message: Any, name: str) -> Any:
    if isinstance(message, Mapping):
        return message.get(name)
    return getattr(message, name, None)


def first_user_message(messages: Iterable[Any]) -> str:
    """Text of the first message whose role is ``user`` ("" when there is none)."""
    for message in messages or ():
        if _field(message, "role") == "user":
            return message_text(_field(message, "content"))
    return ""


def system_prompt(messages: Iterable[Any], system: Any = None) -> str:
    """The system prompt: an Anthropic top-level ``system`` plus any system/developer messages."""
    parts = [message_text(system)] if system else []
    for message in messages or ():
        if _field(message, "role") in _SYSTEM_ROLES:
            parts.append(message_text(_field(message, "content")))
    return "\n".join(p for p in parts if p)


# -- keyed and scoped ids ---------------------------------------------------------------
def _key_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def keyed_session_id(first_user_message: str, *, secret: str | bytes = b"", tenant: str = "",
                     system_prompt: str = "") -> str:
    """HMAC-SHA256 (hex, 64 characters) of the conversation's opening, keyed by secret and tenant.

    Unlike ``derive_session_id`` two tenants (or users, if the tenant names the
    user) whose first message is "hi" get different ids, and without the secret
    nobody can compute another caller's id offline. The parts are length-prefixed
    so that moving text between the system prompt and the first message never
    yields the same input.
    """
    key = _key_bytes(secret) + b"\x00" + tenant.encode()
    # surrogatepass: message text may hold a lone surrogate (a JSON escape); valid text encodes as with encode().
    system = system_prompt.encode("utf-8", "surrogatepass")
    first = first_user_message.encode("utf-8", "surrogatepass")
    msg = b"%d:%b|%d:%b" % (len(system), system, len(first), first)
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def scoped_session_id(tenant: str, session_id: str) -> str:
    """Composite identity ``<tenant>:<id>`` (``engine.core.scope.scoped``): two tenants' ids never meet.

    ``tenant`` is ``Scope.tenant``'s form (24 hex characters) or ``""``. Raises
    ``InvalidEvent`` naming the field for a bad tenant or id.
    """
    return scoped(tenant, session_id)


# -- the chain ------------------------------------------------------------------------
def _metadata_session(body: Mapping[str, Any]) -> str | None:
    """``metadata.user_id``'s session: a JSON string or object with ``session_id``, or the id after the
    last ``_session_`` of Claude Code's ``user_<hash>_account_<uuid>_session_<id>``."""
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return None
    raw = metadata.get("user_id")
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            raw = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
    if isinstance(raw, Mapping):
        value = raw.get("session_id")
        return value if isinstance(value, str) and value else None
    if not isinstance(raw, str):
        return None
    at = raw.rfind(_SESSION_MARKER)
    value = raw[at + len(_SESSION_MARKER):] if at >= 0 else ""
    return value if _SUFFIX_VALUE_RE.fullmatch(value) else None


def _header_items(headers: Any) -> Iterable[tuple[Any, Any]]:
    """``(name, value)`` pairs of any headers ``get_session_id`` accepts (a mapping or a pair list)."""
    if hasattr(headers, "items"):
        return headers.items()
    if isinstance(headers, Sequence) and not isinstance(headers, (str, bytes, bytearray)):
        return (item for item in headers if isinstance(item, (tuple, list)) and len(item) == 2)
    return ()


def _text_of(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("latin-1")
    return value if isinstance(value, str) else ""


def _vendor_session(headers: Any, skip: frozenset[str]) -> tuple[str, str] | None:
    """The first ``x-<vendor>-session-id`` header (in the order sent) not in ``skip`` whose value looks
    like a session id: ``(name, value)``."""
    for name, value in _header_items(headers):
        name = _text_of(name).lower()
        if name in skip or not _VENDOR_HEADER_RE.match(name):
            continue
        text = _text_of(value).strip()
        if _VENDOR_VALUE_RE.fullmatch(text):
            return name, text
    return None


def baggage_session(baggage: str) -> str | None:
    """The ``session.id`` entry of a W3C Baggage header (``session.id=abc-123,user.id=42``), its
    properties (``;...``) dropped and its percent-encoding decoded; None when absent or empty."""
    for member in baggage.split(","):
        key, _, value = member.partition("=")
        if key.strip() == "session.id":
            value = unquote(value.split(";", 1)[0].strip())
            if value:
                return value
    return None


class IdentityResolver:
    """The identity resolution chain; immutable after construction, safe to share between threads.

    ``order``: the sources to try, a subsequence of ``DEFAULT_ORDER``.
    ``header_name``: the configured session header. ``affinity_headers``: harness headers.
    ``secret``: key of the fingerprint HMAC (keep it out of source control).
    ``resolve(..., tenant=T)`` scopes every id it returns by ``T`` (``<T>:<id>``);
    ``tenant=""`` (no authenticated caller, or scoping turned off) leaves ids as they are.
    """

    __slots__ = ("affinity_headers", "header_name", "order", "secret")

    def __init__(self, order: Sequence[str] = DEFAULT_ORDER, *, header_name: str = DEFAULT_HEADER,
                 affinity_headers: Sequence[str] = DEFAULT_AFFINITY_HEADERS, secret: str | bytes = b"") -> None:
        unknown = [name for name in order if name not in _KNOWN]
        if unknown or len(set(order)) != len(order):
            raise InvalidEvent("order", f"must be distinct names from {', '.join(DEFAULT_ORDER)}")
        check_text(header_name, "header_name", 128)
        for name in affinity_headers:
            check_text(name, "affinity_headers", 128)
        if not isinstance(secret, (str, bytes)):
            raise InvalidEvent("secret", f"must be str or bytes, got {type(secret).__name__}")
        self.order = tuple(order)
        self.header_name = header_name.lower()
        self.affinity_headers = tuple(h.lower() for h in affinity_headers)
        self.secret = secret

    def fingerprint(self, messages: Iterable[Any], *, tenant: str = "", system: Any = None) -> str:
        """Keyed fingerprint of a conversation's opening, scoped by ``tenant``; "" when it has no user
        message. Raises ``InvalidEvent`` for a tenant that is not ``Scope.tenant``'s form."""
        check_tenant(tenant)
        messages = list(messages or ())
        first = first_user_message(messages)
        if not first:
            return ""
        fp = keyed_session_id(first, secret=self.secret, tenant=tenant, system_prompt=system_prompt(messages, system))
        return scoped(tenant, fp)

    def explicit(self, value: str, source: str, tenant: str = "") -> tuple[str, str]:
        """An id the caller sent, scoped by ``tenant``: ``(session_id, source)``, or
        ``("", "invalid:<source>")`` when the id cannot be a session (too long, control
        characters, a scope of its own) or the tenant is malformed."""
        try:
            return scoped(tenant, value), source
        except InvalidEvent:
            return "", INVALID_PREFIX + source

    def resolve(self, headers: Any = None, body: Mapping[str, Any] | None = None, *,
                tenant: str = "") -> tuple[str, str]:
        """``(session_id, source)``; ``("", "none")`` when no source applies.

        Raises ``InvalidEvent`` for a tenant that is not ``Scope.tenant``'s form (a programming
        error of the host, not the caller's input)."""
        check_tenant(tenant)
        body = body if isinstance(body, Mapping) else {}
        for name in self.order:
            if name == HEADER:
                value = get_session_id(headers, self.header_name)
                if value:
                    return self.explicit(value, f"{HEADER}:{self.header_name}", tenant)
            elif name == AFFINITY_HEADER:
                for header in self.affinity_headers:
                    value = get_session_id(headers, header)
                    if value:
                        return self.explicit(value, f"{HEADER}:{header}", tenant)
            elif name == VENDOR_HEADER:
                found = _vendor_session(headers, frozenset((self.header_name, *self.affinity_headers)))
                if found:
                    return self.explicit(found[1], f"{HEADER}:{found[0]}", tenant)
            elif name in (PROMPT_CACHE_KEY, USER):
                value = body.get(name)
                if isinstance(value, str) and value:
                    return self.explicit(value, name, tenant)
            elif name == METADATA_USER_ID:
                value = _metadata_session(body)
                if value:
                    return self.explicit(value, name, tenant)
            elif name == BAGGAGE:
                value = baggage_session(get_session_id(headers, "baggage"))
                if value:
                    return self.explicit(value, "baggage:session.id", tenant)
            elif name == FINGERPRINT:
                messages = body.get("messages")
                if isinstance(messages, Sequence):
                    fp = self.fingerprint(messages, tenant=tenant, system=body.get("system"))
                    if fp:
                        return fp, FINGERPRINT
        return "", NONE


def resolve_session(headers: Any = None, body: Mapping[str, Any] | None = None, *, tenant: str = "",
                    secret: str | bytes = b"") -> tuple[str, str]:
    """The default chain in one call: ``IdentityResolver(secret=secret).resolve(headers, body, tenant=...)``."""
    return IdentityResolver(secret=secret).resolve(headers, body, tenant=tenant)
