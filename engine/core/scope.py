"""The tenant scope of a session id: one representation for the store, the log, replay, metrics and Redis.

A *tenant* is the caller a session belongs to, written as 24 lowercase hex
characters: the first 96 bits of an HMAC-SHA256 of the caller's identity
(an API-key hash, a team id, an authenticated principal) keyed by the
operator's secret (``Scope.tenant``). It is never the raw identity, so the
log and the metrics carry no credential, and nobody without the secret can
compute another caller's tenant.

A *scoped session id* is ``<tenant>:<id>``; a session without a tenant (the
``""`` tenant: an unauthenticated caller, or a deployment that opted out of
scoping) keeps its id as it is. The tenant has a fixed width, so the split is
unambiguous whatever the id holds, and ``tenant_of`` reads the tenant from
the id alone in a few operations: the per-tenant limits, ``audit --tenant``,
the metrics and the Redis keys all use it as is.

Pure: no clock, no I/O, no environment read except in ``Scope.from_env``.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from events import InvalidEvent
from events._validate import MAX_ID_LEN, check_text

__all__ = [
    "SECRET_ENV", "Scope", "TENANT_LEN", "check_caller_id", "check_tenant", "is_tenant", "scoped", "split",
    "tenant_of",
]

#: Separator between the tenant and the caller's id.
SEP = ":"
#: Width of a tenant: 24 hex characters (96 bits of the HMAC).
TENANT_LEN = 24
#: Longest id a caller may send when it is scoped (the scoped id stays within ``MAX_ID_LEN``).
MAX_SCOPED_ID_LEN = MAX_ID_LEN - TENANT_LEN - len(SEP)
#: Shortest operator secret accepted (bytes): 128 bits.
MIN_SECRET_BYTES = 16
#: Environment variable that ``Scope.from_env`` reads.
SECRET_ENV = "SESSION_ENGINE_SECRET"
#: Domain separation: the same secret keys the fingerprint, which must never equal a tenant.
_TENANT_CONTEXT = b"session-engine/tenant/v1\x00"
_HEX_DIGITS = "0123456789abcdef"


def is_tenant(value: object) -> bool:
    """Whether ``value`` is a tenant (24 lowercase hex characters); ``""`` is not."""
    return type(value) is str and len(value) == TENANT_LEN and not value.strip(_HEX_DIGITS)


def check_tenant(value: object, field: str = "tenant") -> None:
    """Raise ``InvalidEvent`` unless ``value`` is ``""`` or a tenant."""
    if value == "" or is_tenant(value):
        return
    check_text(value, field, TENANT_LEN)  # names a wrong type, a control character or the length first
    raise InvalidEvent(field, f"must be {TENANT_LEN} lowercase hex characters (Scope.tenant), or empty")


def tenant_of(session_id: str) -> str:
    """The tenant of a session id; ``""`` for an unscoped id. Cheap: the shards call it per batch."""
    if len(session_id) > TENANT_LEN and session_id[TENANT_LEN] == SEP:
        head = session_id[:TENANT_LEN]
        if not head.strip(_HEX_DIGITS):  # C speed: nothing left when every character is a hex digit
            return head
    return ""


def split(session_id: str) -> tuple[str, str]:
    """``(tenant, id)`` of a session id: ``("", session_id)`` when it is unscoped."""
    tenant = tenant_of(session_id)
    return (tenant, session_id[TENANT_LEN + 1:]) if tenant else ("", session_id)


def check_caller_id(session_id: object, field: str = "session_id", *, scoped: bool = True) -> None:
    """Raise ``InvalidEvent`` unless ``session_id`` may be sent by a caller.

    Beyond the store's rules (a str, no control characters, at most 256
    characters, or ``MAX_SCOPED_ID_LEN`` when it is to be scoped), an id must
    not carry a scope of its own (``<24 hex>:...``): it would name another
    tenant's session in an unscoped store, and be ambiguous to read.
    """
    check_text(session_id, field, MAX_SCOPED_ID_LEN if scoped else MAX_ID_LEN)
    if tenant_of(session_id):  # type: ignore[arg-type]
        raise InvalidEvent(field, f"must not start with a tenant scope ({TENANT_LEN} hex characters and {SEP!r})")


def scoped(tenant: str, session_id: str) -> str:
    """The scoped id ``<tenant>:<id>`` (``session_id`` itself for the ``""`` tenant).

    Raises ``InvalidEvent`` naming the field: a tenant that is not
    ``Scope.tenant``'s form, or an id with control characters, too long, or
    carrying a scope of its own.
    """
    check_tenant(tenant)
    check_caller_id(session_id, scoped=bool(tenant))
    return f"{tenant}{SEP}{session_id}" if tenant else session_id


def _secret_bytes(secret: object) -> bytes:
    if isinstance(secret, str):
        return secret.encode()
    if isinstance(secret, bytes):
        return secret
    raise InvalidEvent("secret", f"must be str or bytes, got {type(secret).__name__}")


class Scope:
    """Turns a caller's identity into its tenant, keyed by the operator's secret.

    The secret must be at least ``MIN_SECRET_BYTES`` bytes and not one byte
    repeated: a missing or weak secret is refused (``InvalidEvent`` naming
    ``secret``), because tenants computed from it would be guessable, and a
    random secret per process would move every session to a new tenant at
    each restart. Generate one with
    ``python -c "import secrets; print(secrets.token_hex(32))"``.
    """

    __slots__ = ("_key",)

    def __init__(self, secret: str | bytes) -> None:
        key = _secret_bytes(secret)
        if len(key) < MIN_SECRET_BYTES or len(set(key)) < 2:
            raise InvalidEvent("secret", f"must be at least {MIN_SECRET_BYTES} bytes of real randomness "
                                         f"(set {SECRET_ENV}, or opt out of tenant scoping)")
        self._key = key

    @classmethod
    def from_env(cls, secret: str | bytes | None = None) -> Scope:
        """``Scope(secret)``, or the secret in ``SESSION_ENGINE_SECRET`` when none is given."""
        if secret is None:
            secret = os.environ.get(SECRET_ENV, "")
        return cls(secret)

    def tenant(self, identity: str) -> str:
        """The tenant of a caller identity (``""`` for ``""``: no authenticated caller)."""
        if type(identity) is not str:
            raise InvalidEvent("identity", f"must be a str, got {type(identity).__name__}")
        if not identity:
            return ""
        digest = hmac.new(self._key, _TENANT_CONTEXT + identity.encode(), hashlib.sha256).hexdigest()
        return digest[:TENANT_LEN]

    def __repr__(self) -> str:
        return "Scope(secret=<hidden>)"
