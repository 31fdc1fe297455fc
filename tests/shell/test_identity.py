"""The identity chain finds the session in realistic requests and says where it came from."""

from __future__ import annotations

import re

import pytest

from engine import derive_session_id
from engine.identity import (
    FINGERPRINT,
    USER,
    IdentityResolver,
    Scope,
    keyed_session_id,
    resolve_session,
    scoped_session_id,
    split,
)
from events import InvalidEvent

HEX64 = re.compile(r"[0-9a-f]{64}")
SCOPE = Scope("identity-test-secret-0123")
TEAM_A, TEAM_B = SCOPE.tenant("team-a"), SCOPE.tenant("team-b")
CHAT = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "hi"}]
ANTHROPIC_METADATA = {"user_id": '{"device_id":"d1","account_uuid":"a1","session_id":"cc-7f3a"}'}

CASES = [
    # (name, headers, body, expected session id or "fp" for a fingerprint, expected source)
    ("openai body with user", {}, {"model": "gpt-4o", "messages": CHAT, "user": "u-42"}, "u-42", "user"),
    ("prompt_cache_key wins over user", {}, {"messages": CHAT, "prompt_cache_key": "pck-1", "user": "u-42"},
     "pck-1", "prompt_cache_key"),
    ("anthropic metadata.user_id json", {}, {"system": "be brief", "messages": CHAT[1:],
                                            "metadata": ANTHROPIC_METADATA}, "cc-7f3a", "metadata.user_id"),
    ("metadata.user_id that is not json falls through", {}, {"messages": CHAT, "metadata": {"user_id": "u_1"}},
     "fp", FINGERPRINT),
    ("configured header, any case", {"X-Session-ID": "abc"}, {"user": "u-42"}, "abc", "header:x-session-id"),
    ("header list value gives its first item", {"x-session-id": ["first", "second"]}, {}, "first",
     "header:x-session-id"),
    ("asgi raw headers", [(b"x-session-affinity", b"oc-1")], {"messages": CHAT}, "oc-1",
     "header:x-session-affinity"),
    ("claude code harness header", {"X-Claude-Code-Session-Id": "cc-2"}, {}, "cc-2",
     "header:x-claude-code-session-id"),
    ("codex session_id header", {"session_id": "cx-3"}, {"user": "u"}, "cx-3", "header:session_id"),
    ("over-long explicit id gives no session, not a weaker source", {"x-session-id": "x" * 300},
     {"user": "u-42", "messages": CHAT}, "", "invalid:header:x-session-id"),
    ("control characters in a body id give no session", {}, {"prompt_cache_key": "a\nb", "messages": CHAT},
     "", "invalid:prompt_cache_key"),
    ("nothing explicit: fingerprint", {}, {"messages": CHAT}, "fp", FINGERPRINT),
    ("nothing at all: no session", None, None, "", "none"),
    ("empty header value is absent", {"x-session-id": ""}, {"user": "u-9"}, "u-9", "user"),
]


@pytest.mark.parametrize(("name", "headers", "body", "expected", "source"), CASES, ids=[c[0] for c in CASES])
def test_identity_chain_over_realistic_requests(name, headers, body, expected, source):
    session_id, got_source = IdentityResolver(secret="s3cret").resolve(headers, body)
    assert got_source == source
    if expected == "fp":
        assert HEX64.fullmatch(session_id)
    else:
        assert session_id == expected


def test_two_tenants_with_the_same_first_message_get_different_sessions():
    resolver = IdentityResolver(secret="s3cret")
    a, source_a = resolver.resolve({}, {"messages": CHAT}, tenant=TEAM_A)
    b, source_b = resolver.resolve({}, {"messages": CHAT}, tenant=TEAM_B)
    again, _ = resolver.resolve({}, {"messages": CHAT}, tenant=TEAM_A)
    assert source_a == source_b == FINGERPRINT
    assert a != b
    assert a == again  # stable across turns: the opening does not change
    assert derive_session_id("hi") not in (a, b)
    assert split(a)[0] == TEAM_A and HEX64.fullmatch(split(a)[1])  # the fingerprint is scoped too


def test_fingerprint_depends_on_the_secret_and_the_system_prompt():
    one = keyed_session_id("hi", secret="k1", tenant="t", system_prompt="sys")
    assert keyed_session_id("hi", secret="k2", tenant="t", system_prompt="sys") != one
    assert keyed_session_id("hi", secret="k1", tenant="t", system_prompt="other") != one
    # Moving text between the system prompt and the first message never collides.
    assert keyed_session_id("bc", system_prompt="a") != keyed_session_id("c", system_prompt="ab")


def test_fingerprint_ignores_later_turns():
    resolver = IdentityResolver()
    first, _ = resolver.resolve({}, {"messages": CHAT})
    later, _ = resolver.resolve({}, {"messages": [*CHAT, {"role": "assistant", "content": "hello"},
                                                   {"role": "user", "content": "fix the bug"}]})
    assert first == later


def test_content_part_lists_are_read_as_text():
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert IdentityResolver().resolve({}, {"messages": parts}) == IdentityResolver().resolve(
        {}, {"messages": [{"role": "user", "content": "hi"}]})


def test_every_explicit_source_is_scoped_by_the_tenant():
    resolver = IdentityResolver()
    a, _ = resolver.resolve({"x-session-id": "s1"}, {}, tenant=TEAM_A)
    b, _ = resolver.resolve({"x-session-id": "s1"}, {}, tenant=TEAM_B)
    assert (a, b) == (f"{TEAM_A}:s1", f"{TEAM_B}:s1")
    for body in ({"user": "s1"}, {"prompt_cache_key": "s1"},
                 {"metadata": {"user_id": '{"session_id": "s1"}'}}):
        assert resolver.resolve({}, body, tenant=TEAM_A)[0] == a
    # An id that no longer fits once scoped gives no session rather than a cut one.
    assert resolver.resolve({"x-session-id": "x" * 240}, {}, tenant=TEAM_A) == ("", "invalid:header:x-session-id")


def test_an_id_that_carries_a_scope_of_its_own_gives_no_session():
    forged = f"{TEAM_B}:s1"  # B's session, named by A (or by an unauthenticated caller)
    resolver = IdentityResolver()
    assert resolver.resolve({"x-session-id": forged}, {}, tenant=TEAM_A) == ("", "invalid:header:x-session-id")
    assert resolver.resolve({"x-session-id": forged}, {}) == ("", "invalid:header:x-session-id")
    assert resolver.resolve({"x-session-id": "user:42"}, {}, tenant=TEAM_A)[0] == f"{TEAM_A}:user:42"


@pytest.mark.parametrize("tenant", ["a:b", "acme", TEAM_A.upper(), TEAM_A + "0", "\n" * 24, 42])
def test_scoped_ids_reject_a_tenant_not_made_by_scope(tenant):
    with pytest.raises(InvalidEvent) as err:
        scoped_session_id(tenant, "c")
    assert err.value.field == "tenant"


def test_order_is_configurable():
    resolver = IdentityResolver(order=(USER, "header"))
    assert resolver.resolve({"x-session-id": "h"}, {"user": "u"}) == ("u", "user")
    assert IdentityResolver(header_name="X-Conversation").resolve({"x-conversation": "c"}, {}) == (
        "c", "header:x-conversation")


def test_unknown_source_names_are_rejected():
    with pytest.raises(InvalidEvent) as err:
        IdentityResolver(order=("header", "cookie"))
    assert err.value.field == "order"


def test_resolve_session_is_the_default_chain():
    assert resolve_session({"x-session-id": "z"}, {}) == ("z", "header:x-session-id")
