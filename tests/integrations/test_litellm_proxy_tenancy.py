"""Two API keys through the real LiteLLM proxy: the same session id names two sessions.

One ``litellm --config`` process for the module (tests/support/litellm_proxy_server.py)
with no database: ``general_settings: custom_auth`` maps two bearer keys, A and
B, to two callers, as an operator's own auth function would. Both keys are in
one team, so the default ``scope="key"`` is what keeps them apart. Through each
carrier of a session id (the ``x-session-id`` header, ``litellm_session_id``
and ``metadata.session_id`` in the body), A and B sending the same id get two
sessions: two pins, two budgets, headers that speak of their own session only,
and two tenants in the audit log.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.core.scope import Scope
from tests.support.litellm_proxy_server import HOOK_MODULE, LIMIT_USD, MODEL_LIST, Proxy, decision, running_proxy

KEY_A, KEY_B = "sk-a-" + secrets.token_hex(16), "sk-b-" + secrets.token_hex(16)

CONFIG = MODEL_LIST + """\
general_settings:
  custom_auth: tenant_auth.auth
litellm_settings:
  callbacks: session_hook.hook
"""

#: The operator's auth function: a known bearer key is a caller (LiteLLM hashes ``api_key``); any
#: other is refused. Both callers are in one team: the hook's default scope is the key.
AUTH_MODULE = """\
import os

from fastapi import HTTPException
from litellm.proxy._types import UserAPIKeyAuth

KEYS = frozenset(os.environ["TENANT_TEST_KEYS"].split(","))


async def auth(request, api_key):
    key = api_key[7:] if api_key[:7].lower() == "bearer " else api_key
    if key not in KEYS:
        raise HTTPException(status_code=401, detail="unknown key")
    return UserAPIKeyAuth(api_key=key, team_id="one-team")
"""

#: How each carrier puts the session id in a request: (header id, extra body fields).
CARRIERS = {
    "header:x-session-id": lambda sid: (sid, {}),
    "litellm_session_id": lambda sid: ("", {"litellm_session_id": sid}),
    "metadata.session_id": lambda sid: ("", {"metadata": {"session_id": sid}}),
}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    """The proxy with the hook and the two-key auth, started once for the module."""
    with running_proxy(tmp_path_factory.mktemp("litellm-proxy-tenancy"), CONFIG,
                       {"session_hook": HOOK_MODULE, "tenant_auth": AUTH_MODULE},
                       env={"TENANT_TEST_KEYS": f"{KEY_A},{KEY_B}"}) as proxy:
        yield proxy


@dataclass
class Caller:
    """One API key sending its session id through one carrier."""

    proxy: Proxy
    key: str
    carrier: str

    @property
    def tenant(self) -> str:
        # The hook's tenant of a proxy caller: the operator's secret over LiteLLM's hash of the key.
        return Scope(self.proxy.env["SESSION_ENGINE_SECRET"]).tenant("key:" + hashlib.sha256(self.key.encode())
                                                                       .hexdigest())

    def chat(self, session: str, model: str, text: str) -> httpx.Response:
        header, body = CARRIERS[self.carrier](session)
        response = self.proxy.chat(header, model, text, key=self.key, body=body)
        if response.status_code == 200:
            assert response.headers["x-session-engine-session-source"] == self.carrier
        return response

    def costs(self, session: str) -> list[int]:
        return self.proxy.costs(session, self.tenant)


def callers(proxy: Proxy, carrier: str) -> tuple[Caller, Caller]:
    return Caller(proxy, KEY_A, carrier), Caller(proxy, KEY_B, carrier)


def assert_only_its_own(response: httpx.Response, caller: Caller, other: Caller, other_model: str) -> None:
    """No response header names a tenant or a scoped id, and the decision speaks of this caller's
    session only (not the other caller's model)."""
    assert response.headers["x-session-engine-model"] != other_model
    for name, value in response.headers.items():
        for tenant in (caller.tenant, other.tenant):
            assert tenant not in value, f"header {name} carries a tenant: {value!r}"
        assert caller.key not in value and other.key not in value, f"header {name} carries a key"


def audit(proxy: Proxy, tenant: str) -> list[dict[str, Any]]:
    """``session-engine audit --tenant T --json`` over the proxy's audit log."""
    result = CliRunner().invoke(app, ["audit", str(proxy.log), "--tenant", tenant, "--json"])
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def test_an_unknown_key_is_refused_by_the_operators_auth(proxy: Proxy):
    response = proxy.chat("conversation-0001", "mid", "hello", key="sk-" + secrets.token_hex(16))
    assert response.status_code == 401, response.text
    assert not any(k.startswith("x-session-engine-") for k in response.headers)


@pytest.mark.parametrize("carrier", CARRIERS)
def test_the_same_id_from_two_keys_is_two_sessions_with_two_pins(proxy: Proxy, carrier: str):
    a, b = callers(proxy, carrier)
    sid = f"conversation-0001-{carrier}"
    first_a = a.chat(sid, "strong", "design the schema")
    first_b = b.chat(sid, "mid", "summarise the thread")  # A's pin is not B's: B is served what it asked
    again_a = a.chat(sid, "mid", "now write it")
    again_b = b.chat(sid, "mid", "shorter")
    assert [r.status_code for r in (first_a, first_b, again_a, again_b)] == [200] * 4, again_b.text
    assert decision(first_a) == ("initialize", "strong", "strong")
    assert decision(first_b) == ("initialize", "mid", "mid")
    assert decision(again_a) == ("retain", "strong", "strong")
    assert decision(again_b) == ("retain", "mid", "mid")
    assert first_b.json()["choices"][0]["message"]["content"] == "from mid"
    for response in (first_a, again_a):
        assert_only_its_own(response, a, b, "mid")
    for response in (first_b, again_b):
        assert_only_its_own(response, b, a, "strong")

    # The audit log: one id, two sessions, two tenants, each with its own pin.
    assert a.tenant != b.tenant
    for caller, model in ((a, "strong"), (b, "mid")):
        kinds = [(r["kind"], r["model"]) for r in proxy.records(sid, caller.tenant) if r["event"] == "decision.made"]
        assert kinds == [("initialize", model), ("retain", model)]
        lives = [life for life in audit(proxy, caller.tenant) if life["id"] == sid]
        assert [(life["tenant"], life["session_id"], life["models"]) for life in lives] == [
            (caller.tenant, f"{caller.tenant}:{sid}", [model])]
    unscoped = [r for r in proxy.records(sid) if r.get("session_id") == sid]
    assert unscoped == []  # no caller's session is the bare id
    log = proxy.log.read_text()
    assert a.key not in log and b.key not in log  # the log never carries a credential


@pytest.mark.parametrize("carrier", CARRIERS)
def test_one_callers_spent_budget_does_not_refuse_the_other(proxy: Proxy, carrier: str):
    a, b = callers(proxy, carrier)
    sid = f"budget-0001-{carrier}"
    for text in ("prove it", "and the converse"):
        assert a.chat(sid, "deep", text).status_code == 200
    proxy.wait_for("A's two costs", lambda: a.costs(sid) == [5_000, 5_000])
    refused = a.chat(sid, "deep", "once more")
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["provider_specific_fields"]["spent_usd"] == pytest.approx(0.01)
    assert refused.headers["x-session-engine-decision"] == "refuse"

    # B's session of the same id has spent nothing: served, with the whole budget left before it.
    served = b.chat(sid, "deep", "prove it")
    assert served.status_code == 200, served.text
    assert decision(served) == ("initialize", "deep", "deep")
    assert served.headers["x-session-engine-budget-remaining-usd"] == f"{LIMIT_USD - 0.005:.6f}"
    assert_only_its_own(served, b, a, "")
    proxy.wait_for("B's cost", lambda: b.costs(sid) == [5_000])
    assert a.costs(sid) == [5_000, 5_000]  # B's call was not charged to A
    spent = {life["tenant"]: life["cost_micros"] for t in (a.tenant, b.tenant) for life in audit(proxy, t)
             if life["id"] == sid}
    assert spent == {a.tenant: 10_000, b.tenant: 5_000}
