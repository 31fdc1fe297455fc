"""The seed's module functions, including the whitespace defect SPEC.md says to fix."""

from __future__ import annotations

import hashlib
import http.client
import io
from email.message import Message

import pytest

from engine import (
    MessageInfo,
    cache_ttl_for_provider,
    derive_session_id,
    get_session_id,
    hash_request_content,
    provider_from_model,
    should_cache_sticky,
)


@pytest.mark.parametrize(("provider", "ttl"), [
    ("anthropic", 300_000), ("openai", 300_000), ("deepseek", 300_000), ("google", 300_000),
    ("groq", 300_000), ("vllm", 600_000), ("dosrouter", 600_000), ("mistral", 300_000), ("", 300_000),
])
def test_cache_ttl_for_provider(provider, ttl):
    assert cache_ttl_for_provider(provider) == ttl


@pytest.mark.parametrize(("model", "provider"), [
    ("anthropic/claude-sonnet-4.6", "anthropic"), ("gpt-4o", "default"), ("/x", "default"),
    ("a/b/c", "a"), ("", "default"),
])
def test_provider_from_model(model, provider):
    assert provider_from_model(model) == provider


def test_derive_session_id_is_sha256_hex():
    sid = derive_session_id("héllo")
    assert sid == hashlib.sha256("héllo".encode()).hexdigest() and len(sid) == 64 and sid == sid.lower()


def test_get_session_id_from_many_header_shapes():
    assert get_session_id({"X-Session-ID": "abc"}) == "abc"
    assert get_session_id({"x-session-id": ["first", "second"]}) == "first"
    assert get_session_id({"other": "x"}) == ""
    assert get_session_id({"X-Conv": "c"}, "x-conv") == "c"
    assert get_session_id({}, "") == ""
    msg = Message()
    msg["X-Session-Id"] = "from-email"
    assert get_session_id(msg) == "from-email"
    raw = b"HTTP/1.1 200 OK\r\nX-SESSION-ID: from-http\r\n\r\n"
    parsed = http.client.parse_headers(io.BytesIO(raw.split(b"\r\n", 1)[1]))
    assert get_session_id(parsed) == "from-http"
    assert get_session_id([(b"x-session-id", b"asgi-raw")]) == "asgi-raw"


def test_get_session_id_from_starlette_headers():
    starlette = pytest.importorskip("starlette.datastructures")
    headers = starlette.Headers(raw=[(b"x-session-id", b"st")])
    assert get_session_id(headers) == "st"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def test_hash_request_content_collapses_real_whitespace():
    assert hash_request_content("  fix   the\n\tbug  ") == _sha("fix the bug")
    # The seed's regex `s+` matched the letter s: "less" must not become "le ".
    assert hash_request_content("less") == _sha("less")
    assert hash_request_content("a b") == hash_request_content("a \n b")


def test_hash_request_content_truncates_and_appends_sorted_tools():
    long = "x" * 600
    assert hash_request_content(long) == _sha("x" * 500)
    assert hash_request_content("q", ["search", "edit"]) == _sha("q|tools:edit,search")
    assert hash_request_content("q", []) == _sha("q")
    assert len(hash_request_content("q")) == 32


def test_should_cache_sticky_thresholds():
    assert should_cache_sticky([MessageInfo("user", "x" * 9000)]) is True
    assert should_cache_sticky([MessageInfo("user", "x" * 8999)]) is False
    history = [{"role": "user", "content": "y" * 5000} for _ in range(3)]  # 15000 // 3 = 5000
    assert should_cache_sticky(history) is True
    assert should_cache_sticky([*history[:2], {"role": "user", "content": "y" * 4997}]) is False
    assert should_cache_sticky([MessageInfo("user", "é" * 4500)]) is True  # bytes, not characters
    assert should_cache_sticky([]) is False


def test_normalisation_of_long_prompts_equals_collapsing_everything():
    import re

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from engine.core.requests import _normalized_prefix

    pieces = st.lists(st.one_of(st.text("ab", min_size=1, max_size=300), st.text(" \t\n\r", min_size=1,
                                                                                  max_size=3000)), max_size=40)

    @settings(max_examples=300, deadline=None)
    @given(pieces)
    def check(parts):
        content = "".join(parts)
        assert _normalized_prefix(content) == re.sub(r"\s+", " ", content).strip()[:500]

    check()
