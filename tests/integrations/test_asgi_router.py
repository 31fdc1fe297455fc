"""docs/examples/asgi_router.py end to end over HTTP (Starlette's TestClient, lifespan included)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from engine import Config, InvalidEvent
from engine.core.headers import DEPRECATED_ALIASES
from engine.policy import Options

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "asgi_router.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("asgi_router_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


router = _load()
SONNET, HAIKU, MINI, O3 = (router.MODELS[t] for t in (router.Tier.COMPLEX, router.Tier.MEDIUM,
                                                     router.Tier.SIMPLE, router.Tier.REASONING))


#: The app's configured callers: API key -> principal.
ALICE, BOB = "sk-alice-0001", "sk-bob-0002"
API_KEYS = {ALICE: "alice", BOB: "bob"}


def get(client: TestClient, path: str, key: str = ALICE) -> Any:
    return client.get(path, headers={"authorization": f"Bearer {key}"})


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Start the example app (its store included); every app is shut down afterwards."""
    clients: list[TestClient] = []

    def start(event_log: Path | None = None, **options: Any) -> TestClient:
        options.setdefault("estimator", router.estimate)
        options.setdefault("deadline_s", 5.0)  # a loaded CI box must not turn decisions into "unavailable"
        app = router.create_app(Config(enabled=True, tick_ms=0, event_log=str(event_log) if event_log else None),
                                options=Options(**options), api_keys=API_KEYS)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def chat(client: TestClient, text: str, *, session: str | None = "s1", tier: str | None = None,
         model: str = "auto", key: str = ALICE, **headers: str) -> Any:
    sent = {"authorization": f"Bearer {key}", **{k.replace("_", "-"): v for k, v in headers.items()}}
    if session is not None:
        sent["x-session-id"] = session
    if tier is not None:
        sent["x-router-tier"] = tier
    body = {"model": model, "messages": [{"role": "system", "content": "You help with code."},
                                         {"role": "user", "content": text}]}
    return client.post("/v1/chat/completions", json=body, headers=sent)


def served(response: Any) -> tuple[str, str]:
    assert response.status_code == 200, response.text
    return response.json()["model"], response.headers["x-session-engine-decision"]


def test_first_turn_pins_and_later_turns_keep_the_model(serve):
    client = serve()
    assert served(chat(client, "write a parser", tier="MEDIUM")) == (HAIKU, "initialize")
    assert served(chat(client, "now add error handling", tier="MEDIUM")) == (HAIKU, "retain")
    response = chat(client, "and a docstring", tier="MEDIUM")
    assert response.headers["x-session-engine-session-id"] == "s1"
    assert response.headers["x-session-engine-session-source"] == "header:x-session-id"
    assert response.headers["x-session-engine-model"] == HAIKU and response.headers["x-session-engine-tier"] == "MEDIUM"
    # The deprecated x-session-* names still carry the same values, for this release.
    assert all(response.headers[alias] == response.headers[name] for name, alias in DEPRECATED_ALIASES.items()
               if name in response.headers)
    assert (response.headers["x-session-id"], response.headers["x-session-decision"]) == ("s1", "retain")


def test_a_lower_tier_never_downgrades_and_a_higher_one_upgrades(serve):
    client = serve()
    assert served(chat(client, "design the storage layer", tier="COMPLEX")) == (SONNET, "initialize")
    assert served(chat(client, "rename a variable", tier="MEDIUM")) == (SONNET, "retain")
    assert served(chat(client, "prove the invariant holds", tier="REASONING")) == (O3, "upgrade")
    assert get(client, "/v1/sessions/s1").json()["model"] == O3


def test_a_simple_follow_up_uses_the_cheap_model_and_keeps_the_pin(serve):
    client = serve()
    served(chat(client, "design the storage layer", tier="COMPLEX"))
    assert served(chat(client, "thanks!")) == (MINI, "bypass")  # the toy classifier says SIMPLE
    assert get(client, "/v1/sessions/s1").json()["model"] == SONNET
    assert served(chat(client, "next: the cache", tier="MEDIUM")) == (SONNET, "retain")


def test_third_identical_request_escalates(serve):
    client = serve()
    kinds = [served(chat(client, "the test still fails", tier="MEDIUM")) for _ in range(3)]
    assert kinds == [(HAIKU, "initialize"), (HAIKU, "retain"), (SONNET, "escalate")]
    state = get(client, "/v1/sessions/s1").json()
    assert state["escalated"] is True and state["tier"] == "COMPLEX"


def test_strict_budget_refuses_with_422_and_a_json_error(serve):
    client = serve(max_cost_usd=0.0004, budget_mode="strict")
    first = chat(client, "write a parser", tier="MEDIUM")
    assert served(first) == (HAIKU, "initialize")
    refused = chat(client, "and another one", tier="MEDIUM")
    assert refused.status_code == 422 and refused.headers["x-should-retry"] == "false"
    error = refused.json()["error"]
    assert error["type"] == "budget_exceeded" and error["code"] == "session_budget_exceeded"
    assert error["spent_usd"] == pytest.approx(float(first.headers["x-session-engine-cost-usd"]))
    assert error["limit_usd"] == 0.0004 and error["estimate_usd"] > 0
    assert refused.headers["x-session-engine-decision"] == "refuse"
    assert client.app.state.upstream.calls == [HAIKU]  # the refused request never reached upstream


def test_sessions_survive_an_app_restart_with_the_durable_log(serve, tmp_path: Path):
    log = tmp_path / "sessions.jsonl"
    first = serve(event_log=log)
    served(chat(first, "design the storage layer", tier="COMPLEX"))
    served(chat(first, "rename a variable", tier="MEDIUM"))
    before = get(first, "/v1/sessions/s1").json()
    first.__exit__(None, None, None)  # shut the app down: its store closes and the log is flushed

    second = serve(event_log=log)
    assert get(second, "/v1/sessions/s1").json() == before
    assert served(chat(second, "and the tests", tier="MEDIUM")) == (SONNET, "retain")
    assert get(second, "/v1/sessions/s1").json()["request_count"] == before["request_count"] + 1


def test_without_a_header_the_session_is_a_fingerprint_scoped_by_the_caller(serve):
    client = serve()
    one = chat(client, "hi", session=None, tier="MEDIUM")
    again = chat(client, "hi", session=None, tier="MEDIUM")
    other = chat(client, "hi", session=None, tier="MEDIUM", key=BOB)
    assert one.headers["x-session-engine-session-source"] == "fingerprint"
    ids = [r.headers["x-session-engine-session-id"] for r in (one, again, other)]
    assert ids[0] == ids[1] != ids[2]
    decisions = [r.headers["x-session-engine-decision"] for r in (one, again)]
    assert decisions == ["initialize", "retain"]
    assert other.headers["x-session-engine-decision"] == "initialize"


def test_two_callers_with_the_same_session_id_get_two_sessions(serve):
    client = serve()
    assert served(chat(client, "design the storage layer", tier="COMPLEX")) == (SONNET, "initialize")
    # Bob names Alice's id and asks for a cheaper tier: he gets his own session, not her pin.
    assert served(chat(client, "rename a variable", tier="MEDIUM", key=BOB)) == (HAIKU, "initialize")
    assert get(client, "/v1/sessions/s1").json()["model"] == SONNET
    assert get(client, "/v1/sessions/s1", key=BOB).json()["model"] == HAIKU
    # A tenant header asserted by the client changes nothing: the tenant comes from the key.
    assert served(chat(client, "and tests", tier="MEDIUM", key=BOB, x_tenant="alice")) == (HAIKU, "retain")


def test_an_unknown_or_missing_api_key_is_refused_with_401(serve):
    client = serve()
    for key in ("sk-nobody", ""):
        response = chat(client, "hi", tier="MEDIUM", key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert get(client, "/v1/sessions/s1", key=key).status_code == 401
    assert client.app.state.upstream.calls == []
    assert client.app.state.store.get_stats().count == 0


def test_the_app_refuses_to_start_without_keys_or_with_a_weak_secret(monkeypatch):
    with pytest.raises(InvalidEvent) as err:
        router.create_app(Config(), api_keys={})
    assert err.value.field == "api_keys"
    monkeypatch.setenv("SESSION_ENGINE_SECRET", "short")
    with pytest.raises(InvalidEvent) as err:
        router.create_app(Config(), api_keys=API_KEYS)
    assert err.value.field == "secret"
    router.create_app(Config(), api_keys=API_KEYS, scope=False)  # a trusted single-tenant deployment


def test_an_invalid_explicit_session_id_gets_no_session(serve):
    client = serve()
    response = chat(client, "hello there", session="x" * 300, tier="MEDIUM")
    assert served(response) == (HAIKU, "bypass")
    assert "x-session-engine-session-id" not in response.headers and "x-session-id" not in response.headers


def test_metrics_endpoint_exposes_the_engine(serve):
    client = serve()
    for text in ("a", "a", "a"):
        chat(client, text, tier="MEDIUM")
    chat(client, "b", session="s2", tier="COMPLEX")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    assert samples[("session_engine_live_sessions", ())] == 2
    assert samples[("session_engine_decisions_total", (("kind", "initialize"),))] == 2
    assert samples[("session_engine_decisions_total", (("kind", "escalate"),))] == 1
    assert samples[("session_engine_escalations_total", (("reason", "strikes"),))] == 1
    assert samples[("session_engine_cost_usd_total", ())] > 0
