"""Every session-id carrier agents send, as the agents send it.

Each carrier is read by the identity chain (engine/identity.py) in the order
docs/identity.md documents, gives the same id LiteLLM 1.110's own parser gives
(``litellm.proxy.litellm_pre_call_utils``), is scoped by tenant, and works
through the LiteLLM hook with a real ``litellm.Router`` (``mock_response``).
A session id the LiteLLM proxy generated (``litellm_session_id_generated``)
is never pinned.
"""

from __future__ import annotations

import asyncio
import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

from typing import Any

import pytest
from litellm import Router
from litellm.caching.dual_cache import DualCache
from litellm.proxy._types import UserAPIKeyAuth
from litellm.proxy.litellm_pre_call_utils import (
    _get_anthropic_session_id_from_metadata,
    _session_id_from_baggage,
    apply_missing_session_id_policy,
    get_chain_id_from_headers,
)
from starlette.requests import Request

from engine.identity import DEFAULT_ORDER, IdentityResolver, baggage_session
from engine.integrations.litellm import DECISION_KEY
from tests.integrations import test_litellm
from tests.integrations.test_litellm import ask, model_list, served_group

make_hook = test_litellm.make_hook  # the registered-hook fixture, shared with tests/integrations/test_litellm.py
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")

TENANT_A = "a" * 24
TENANT_B = "b" * 24
UUID = "e96634a3-fa28-4083-b354-55542e2dca01"
#: Claude Code's metadata.user_id: the user hash, the account uuid, then the session uuid.
CLAUDE_USER_ID = f"user_{'0f' * 32}_account_7d3c1a2b-0000-4000-8000-000000000001_session_{UUID}"

#: (carrier, headers, body, id, source): each as the agent or SDK puts it on the wire.
CARRIERS = [
    ("x-litellm-session-id", {"X-LiteLLM-Session-Id": "conv-42"}, {}, "conv-42", "header:x-litellm-session-id"),
    ("vendor x-*-session-id", {"x-opencode-session-id": UUID}, {}, UUID, "header:x-opencode-session-id"),
    ("claude code header", {"X-Claude-Code-Session-Id": UUID}, {}, UUID, "header:x-claude-code-session-id"),
    ("claude code metadata.user_id", {}, {"model": "claude-sonnet-4-5", "max_tokens": 1024,
                                          "metadata": {"user_id": CLAUDE_USER_ID}}, UUID, "metadata.user_id"),
    ("metadata.user_id object", {}, {"metadata": {"user_id": {"session_id": UUID}}}, UUID, "metadata.user_id"),
    ("metadata.user_id json", {}, {"metadata": {"user_id": f'{{"session_id": "{UUID}"}}'}}, UUID,
     "metadata.user_id"),
    ("w3c baggage", {"baggage": f"user.id=42,session.id={UUID},deployment.env=prod"}, {}, UUID,
     "baggage:session.id"),
]


@pytest.mark.parametrize(("carrier", "headers", "body", "expected", "source"), CARRIERS, ids=[c[0] for c in CARRIERS])
def test_every_carrier_names_its_session_scoped_by_tenant(carrier, headers, body, expected, source):
    resolver = IdentityResolver()
    assert resolver.resolve(headers, body) == (expected, source)
    # Scoped: two callers sending the same carrier never name the same session.
    a, b = resolver.resolve(headers, body, tenant=TENANT_A), resolver.resolve(headers, body, tenant=TENANT_B)
    assert a == (f"{TENANT_A}:{expected}", source) and b == (f"{TENANT_B}:{expected}", source)
    # ASGI raw headers (byte pairs) carry it just the same.
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    assert resolver.resolve(raw, body) == (expected, source)


@pytest.mark.parametrize(("carrier", "headers", "body", "expected", "source"), CARRIERS, ids=[c[0] for c in CARRIERS])
def test_each_carrier_gives_the_id_litellm_itself_reads(carrier, headers, body, expected, source):
    theirs = (get_chain_id_from_headers(headers)
              or _get_anthropic_session_id_from_metadata(body.get("metadata"))
              or _session_id_from_baggage(headers.get("baggage", "")))
    if carrier == "metadata.user_id json":  # LiteLLM reads an object, not a JSON string: ours reads both
        theirs = _get_anthropic_session_id_from_metadata({"user_id": {"session_id": UUID}})
    assert theirs == expected == IdentityResolver().resolve(headers, body)[0]


def test_the_documented_order_decides_between_carriers():
    assert DEFAULT_ORDER == ("header", "affinity_header", "vendor_header", "prompt_cache_key", "user",
                             "metadata.user_id", "baggage", "fingerprint")
    r = IdentityResolver(secret=b"0123456789abcdef")
    everything = {"x-session-id": "h1", "x-litellm-session-id": "h2", "x-acme-session-id": "vendor-03",
                  "baggage": "session.id=bag-4"}
    body = {"user": "u5", "metadata": {"user_id": "user_x_session_md-6"}, "messages": ask("hi")}
    steps = [("h1", "header:x-session-id"), ("h2", "header:x-litellm-session-id"),
             ("vendor-03", "header:x-acme-session-id"), ("u5", "user"), ("md-6", "metadata.user_id"),
             ("bag-4", "baggage:session.id")]
    for expected in steps:
        assert r.resolve(everything, body) == expected
        # Take the winning carrier away: the next one in the order answers.
        name = expected[1].split(":", 1)[1] if expected[1].startswith("header:") else expected[1]
        if name in everything:
            everything.pop(name)
        elif name == "user":
            body.pop("user")
        elif name == "metadata.user_id":
            body.pop("metadata")
        else:
            everything.pop("baggage")
    assert r.resolve(everything, body)[1] == "fingerprint"


def test_carriers_that_do_not_look_like_a_session_are_passed_over():
    r = IdentityResolver()
    # LiteLLM's value rule for a vendor header: 8 or more of letters, digits, "-", "_".
    assert r.resolve({"x-acme-session-id": "short"}) == ("", "none")
    assert r.resolve({"x-acme-session-id": "has space in it"}) == ("", "none")
    assert r.resolve({"x-acme-session-id": "bad value", "x-other-session-id": "good-value-1"}) == (
        "good-value-1", "header:x-other-session-id")
    # A user_id without the marker, with an empty or unsafe suffix, is a user, not a session.
    for user_id in ("user_abc", "user_abc_session_", "user_abc_session_a b", "user_abc_session_x/y"):
        assert r.resolve(None, {"metadata": {"user_id": user_id}}) == ("", "none")
    # Baggage without session.id, or with an empty one; properties dropped, percent-encoding decoded.
    assert baggage_session("user.id=42") is None and baggage_session("session.id= ;p") is None
    assert baggage_session("session.id=conv%2042;ttl=1, x=y") == "conv 42"
    # An explicit carrier holding an impossible id gives no session (never a fall back to a weaker one).
    assert r.resolve({"x-litellm-session-id": "x" * 300}, {"user": "u"}) == ("", "invalid:header:x-litellm-session-id")
    assert r.resolve({"baggage": "session.id=" + "y" * 300}) == ("", "invalid:baggage:session.id")


def test_a_configured_header_list_still_wins_over_the_vendor_scan():
    r = IdentityResolver(affinity_headers=("x-team-session-id",))
    headers = {"x-acme-session-id": "vendor-value-1", "x-team-session-id": "team-1"}
    assert r.resolve(headers) == ("team-1", "header:x-team-session-id")
    assert IdentityResolver(order=("vendor_header",)).resolve(headers) == ("vendor-value-1",
                                                                           "header:x-acme-session-id")


SDK_CARRIERS = [
    ("x-litellm-session-id", {"headers": {"x-litellm-session-id": "sdk-conv-1"}}, "sdk-conv-1"),
    ("vendor header", {"headers": {"x-zed-session-id": UUID}}, UUID),
    ("claude code user_id", {"user_id": CLAUDE_USER_ID}, UUID),
    ("baggage", {"headers": {"baggage": "session.id=bag-conv-1"}}, "bag-conv-1"),
]


@pytest.mark.parametrize(("carrier", "metadata", "expected"), SDK_CARRIERS, ids=[c[0] for c in SDK_CARRIERS])
def test_a_real_router_pins_the_session_each_carrier_names(make_hook, carrier, metadata, expected):
    hook = make_hook()
    tenant = hook.tenant("app:acme")

    async def run() -> list[str]:
        router = Router(model_list=model_list())
        served = []
        for model, text in (("strong", "design it"), ("mid", "now build it")):
            response = await hook.acompletion(router, model=model, messages=ask(text),
                                              metadata={**metadata, "tenant": "acme"})
            served.append(served_group(response))
        await hook.wait_recorded(2)
        return served

    assert asyncio.run(run()) == ["strong", "strong"]  # the second turn keeps the first turn's pin
    entry = hook.policy.store.store.get_session(f"{tenant}:{expected}")
    assert entry is not None and entry.model == "strong" and entry.request_count == 2


def _proxy_request() -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "root_path": "",
                    "query_string": b"", "headers": []})


def _generated(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as LiteLLM's proxy leaves it under ``general_settings: missing_session_id: generate``."""
    apply_missing_session_id_policy(data, "metadata", {"missing_session_id": "generate"}, _proxy_request())
    assert data["metadata"]["litellm_session_id_generated"] is True and data["litellm_session_id"]
    return data


def test_a_proxy_generated_session_id_is_never_pinned(make_hook):
    hook = make_hook()
    auth = UserAPIKeyAuth(token="hashed-key-1")

    async def run() -> list[dict[str, Any]]:
        out = []
        for model in ("strong", "mid", "mid"):
            data = _generated({"model": model, "messages": ask("same words"), "metadata": {}})
            out.append(await hook.async_pre_call_hook(auth, DualCache(), data, "acompletion"))
        return out

    out = asyncio.run(run())
    # Three requests, three generated ids, and no session: each goes where it asked, as LiteLLM does.
    assert len({d["litellm_session_id"] for d in out}) == 3
    assert [d["model"] for d in out] == ["strong", "mid", "mid"]
    assert all(d["metadata"][DECISION_KEY]["session_id"] == "" for d in out)
    assert hook.policy.store.store.get_stats().count == 0
    # Through the hook's own id resolution: the generated id is skipped, the chain finds nothing.
    data = _generated({"model": "mid", "messages": ask("x"), "metadata": {}})
    assert hook.session_of(data, data["messages"], tenant="") == ("", "none")


def test_a_generated_id_gives_way_to_a_carrier_litellm_does_not_read(make_hook):
    hook = make_hook()
    auth = UserAPIKeyAuth(token="hashed-key-1")
    sid = f"{hook.proxy_tenant(auth)}:oc-{UUID}"

    async def run() -> list[str]:
        out = []
        for model in ("strong", "mid"):
            data = _generated({"model": model, "messages": ask("go"), "metadata": {},
                               "proxy_server_request": {"headers": {"x-session-affinity": f"oc-{UUID}"}}})
            out.append((await hook.async_pre_call_hook(auth, DualCache(), data, "acompletion"))["model"])
        return out

    assert asyncio.run(run()) == ["strong", "strong"]
    entry = hook.policy.store.store.get_session(sid)
    assert entry is not None and entry.request_count == 2


def test_an_id_the_caller_sent_is_still_pinned_when_the_proxy_generates_for_others(make_hook):
    hook = make_hook()
    auth = UserAPIKeyAuth(token="hashed-key-1")
    data = {"model": "mid", "messages": ask("x"), "metadata": {"session_id": "mine-1"}}
    apply_missing_session_id_policy(data, "metadata", {"missing_session_id": "generate"}, _proxy_request())
    assert "litellm_session_id_generated" not in data["metadata"]
    out = asyncio.run(hook.async_pre_call_hook(auth, DualCache(), data, "acompletion"))
    assert out["metadata"][DECISION_KEY]["session_id"] == f"{hook.proxy_tenant(auth)}:mine-1"
