"""The audit log's hash chain: pure functions over bytes that any writer (file, Redis stream) can call.

A log's chain starts at a random 32-byte **genesis** value, written (hex) as
the ``genesis`` field of the first chained record. Records are sealed in
batches: the last line of each batch ends with ``"chain":"<hex>"``, the
SHA-256 of the previous head followed by every byte of the batch, the
sealing line taken without its own ``chain`` field::

    head_0 = genesis
    head_n = SHA-256(head_{n-1} || lines of batch n, the last one without ',"chain":"…"')

So changing, dropping, inserting, duplicating or swapping any line changes
some head, and ``verify`` finds the first seal that no longer matches.
Optional signing: HMAC-SHA256 of a head under a key from the environment
(``SESSION_ENGINE_AUDIT_KEY``), so that someone who can rewrite files but
lacks the key cannot rebuild a valid chain. docs/audit-log.md has the
format, the threat model and the measurements behind these choices.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

__all__ = ["CHAIN_MODES", "HEX_LEN", "KEY_ENV", "genesis", "key_from_env", "link", "seal", "sign", "unseal"]

#: "batch": one seal per written batch (the default); "record": one seal per record; "off": no chain.
CHAIN_MODES = ("batch", "record", "off")
#: The environment variable holding the signing key (any non-empty text; use 32+ random bytes, e.g. hex).
KEY_ENV = "SESSION_ENGINE_AUDIT_KEY"
HEX_LEN = 64
_SEAL_KEY = b',"chain":"'
#: Bytes a seal adds at the end of a line: ,"chain":"<64 hex>"}\n  (replacing the line's closing }\n).
SEAL_LEN = len(_SEAL_KEY) + HEX_LEN + 3
_sha256 = hashlib.sha256


def genesis() -> bytes:
    """A fresh random chain start for a new log (32 bytes)."""
    return os.urandom(32)


def link(prev: bytes, data: bytes | bytearray | memoryview) -> bytes:
    """The head after ``data`` (the batch's bytes, its sealing line without the chain field) follows ``prev``."""
    h = _sha256(prev)
    h.update(data)
    return h.digest()


def seal(data: bytearray, prev: bytes, start: int = 0, prefix: bytes = b"") -> bytes:
    """Seal the batch ``data[start:]`` in place: hash it after ``prev``, write the head into its last line.

    ``prefix`` is what was written before the batch but not sealed yet (a
    batch a crash cut before its sealing line): the new seal covers it too.
    ``data`` must end with a JSON object's ``}\\n`` (every rendered record
    does). Returns the new head.
    """
    if not data.endswith(b"}\n"):
        raise ValueError("a sealed batch must end with a JSON object and a newline")
    h = _sha256(prev)
    if prefix:
        h.update(prefix)
    with memoryview(data) as view:
        h.update(view[start:])
    head = h.digest()
    data[-2:] = _SEAL_KEY + head.hex().encode() + b'"}\n'
    return head


def unseal(line: bytes) -> tuple[bytes, str] | None:
    """(the bytes hashed for a sealing line, its head in hex), or None when the line carries no seal.

    ``line`` ends with ``\\n`` (a last line that lost its newline is given one
    back first, as restart recovery does).
    """
    if len(line) > SEAL_LEN and line.endswith(b'"}\n') and line[-SEAL_LEN:-SEAL_LEN + len(_SEAL_KEY)] == _SEAL_KEY:
        return line[:-SEAL_LEN] + b"}\n", line[-HEX_LEN - 3:-3].decode("ascii", "replace")
    return None


def sign(key: bytes, seq: int, head: bytes) -> str:
    """HMAC-SHA256 (hex) of the head reached after record ``seq``: binds the head to its position."""
    return hmac.new(key, b"session-engine audit head %d " % seq + head, hashlib.sha256).hexdigest()


def key_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The signing key from ``SESSION_ENGINE_AUDIT_KEY`` (UTF-8 bytes of its text), or None when unset/empty."""
    value = (os.environ if environ is None else environ).get(KEY_ENV, "")
    return value.encode() if value else None
