"""Tenant isolation: no caller can reach another caller's session (docs/identity.md, threat model).

Two API keys go through the real LiteLLM proxy hook (``async_pre_call_hook``
with LiteLLM's own ``UserAPIKeyAuth``); a flooding caller meets
``max_sessions_per_tenant``; the creation rate, the scope's representation
and the bad inputs are checked on the real store and its log.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm
import orjson
import pytest
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st
from litellm import Router
from litellm.caching.dual_cache import DualCache
from litellm.proxy._types import ProxyException, UserAPIKeyAuth
from typer.testing import CliRunner

from engine import Config, InvalidEvent, SessionStore, Tier, replay
from engine.cli import app
from engine.identity import SECRET_ENV, IdentityResolver, Scope, check_caller_id, scoped, split, tenant_of
from engine.integrations.litellm import DECISION_KEY, SessionEngineCallback
from engine.log.replay import read_log
from engine.log.verify import verify
from engine.metrics import Metrics
from engine.policy import Options
from engine.shell.capacity import SessionRefused
from events import SetSession

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydantic._internal._generate_schema")

MODELS = {Tier.SIMPLE: "cheap", Tier.MEDIUM: "mid", Tier.COMPLEX: "strong"}
SECRET = "tenancy-test-secret-7d1e9b"
KEY_A, KEY_B = UserAPIKeyAuth(api_key="sk-caller-a"), UserAPIKeyAuth(api_key="sk-caller-b")
SID = "conversation-0001"


@pytest.fixture
def make_hook(tmp_path: Path) -> Iterator[Callable[..., SessionEngineCallback]]:
    """Hooks with their own store and log; closed afterwards."""
    hooks: list[SessionEngineCallback] = []

    def make(options: Options | None = None, observer: Any = None, **config: Any) -> SessionEngineCallback:
        settings = {"enabled": True, "tick_ms": 0, "event_log": str(tmp_path / f"audit{len(hooks)}.jsonl"), **config}
        hook = SessionEngineCallback.create(MODELS, Config(**settings), options or Options(deadline_s=5.0),
                                            identity=IdentityResolver(secret=SECRET), observer=observer,
                                            secret=SECRET)
        hooks.append(hook)
        return hook

    yield make
    for hook in hooks:
        litellm.logging_callback_manager.remove_callback_from_all_lists(hook)
        hook.close()


def proxy_request(model: str, carrier: str, text: str = "fix the failing test") -> dict[str, Any]:
    """A proxy request body that names the session ``SID`` through one carrier."""
    messages = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": text}]
    data: dict[str, Any] = {"model": model, "messages": messages, "metadata": {},
                            "proxy_server_request": {"headers": {}}}
    if carrier == "litellm_session_id":
        data["litellm_session_id"] = SID
    elif carrier == "metadata.session_id":
        data["metadata"]["session_id"] = SID
    elif carrier == "x-session-id":
        data["proxy_server_request"]["headers"]["x-session-id"] = SID
    elif carrier in ("user", "prompt_cache_key"):
        data[carrier] = SID
    elif carrier == "metadata.user_id":  # Anthropic Messages, as Claude Code sends it
        data["metadata"]["user_id"] = orjson.dumps({"session_id": SID}).decode()
    else:
        assert carrier == "fingerprint"  # no id at all: the same opening
        data["messages"][1]["content"] = "hi"
    return data


async def call(hook: SessionEngineCallback, key: UserAPIKeyAuth, model: str, carrier: str,
               text: str = "fix the failing test") -> dict[str, Any]:
    data = await hook.async_pre_call_hook(key, DualCache(), proxy_request(model, carrier, text), "acompletion")
    return data["metadata"][DECISION_KEY]


CARRIERS = ["litellm_session_id", "metadata.session_id", "x-session-id", "user", "prompt_cache_key",
            "metadata.user_id", "fingerprint"]


@pytest.mark.parametrize("carrier", CARRIERS)
def test_two_api_keys_with_the_same_id_get_two_sessions_pins_and_budgets(make_hook, carrier):
    hook = make_hook(Options(deadline_s=5.0, max_cost_usd=0.01, budget_mode="strict"))
    store = hook.policy.store.store

    async def run() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], ProxyException]:
        a = await call(hook, KEY_A, "strong", carrier)  # A pins strong
        b = await call(hook, KEY_B, "mid", carrier)  # B names the same id, asks for mid
        await hook.policy.record_cost(a["session_id"], 0.02)  # A spends its budget
        with pytest.raises(ProxyException) as refused:
            await call(hook, KEY_A, "strong", carrier, "and again")
        b_again = await call(hook, KEY_B, "mid", carrier, "and again")
        return a, b, b_again, refused.value

    a, b, b_again, refused = asyncio.run(run())
    assert a["source"] == b["source"] != "none"
    assert (a["kind"], a["model"]) == ("initialize", "strong")
    assert (b["kind"], b["model"]) == ("initialize", "mid")  # not A's pinned "strong" (a retained pin)
    tenant_a, tenant_b = hook.proxy_tenant(KEY_A), hook.proxy_tenant(KEY_B)
    assert split(a["session_id"])[0] == tenant_a and split(b["session_id"])[0] == tenant_b != tenant_a
    if carrier != "fingerprint":
        assert split(a["session_id"])[1] == split(b["session_id"])[1] == SID
    assert store.get_stats().count == 2
    assert store.get_session(a["session_id"]).model == "strong"
    assert store.get_session(b["session_id"]).model == "mid"
    # Two budgets: A's spend refuses A, and B is served on its own session, which spent nothing.
    assert refused.code == "422"  # LiteLLM's own budget error (engine.integrations.litellm.budget_http_error)
    assert (b_again["kind"], b_again["model"], b_again["session_id"]) == ("retain", "mid", b["session_id"])
    assert store.get_session(b["session_id"]).session_cost_micros == 0
    # Each caller's decision names only its own session (what the response headers are made from).
    assert tenant_a not in orjson.dumps(b).decode() and tenant_b not in orjson.dumps(a).decode()


def test_team_scope_shares_a_session_within_a_team_and_not_across(make_hook):
    hook = SessionEngineCallback.create(MODELS, Config(enabled=True, tick_ms=0), Options(deadline_s=5.0),
                                        scope="team", secret=SECRET)
    try:
        one = UserAPIKeyAuth(api_key="sk-1", team_id="team-red")
        two = UserAPIKeyAuth(api_key="sk-2", team_id="team-red")
        other = UserAPIKeyAuth(api_key="sk-3", team_id="team-blue")

        async def run() -> list[dict[str, Any]]:
            return [await call(hook, key, model, "x-session-id")
                    for key, model in ((one, "strong"), (two, "mid"), (other, "mid"))]

        first, same_team, other_team = asyncio.run(run())
        assert first["session_id"] == same_team["session_id"] and same_team["kind"] == "retain"
        assert other_team["session_id"] != first["session_id"] and other_team["kind"] == "initialize"
    finally:
        hook.close()


def test_the_sdk_path_scopes_by_the_applications_tenant_and_records_cost_there(make_hook):
    hook = make_hook()
    litellm.callbacks.append(hook)
    deployments = [{"model_name": group, "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "k",
                                                             "mock_response": f"from {group}"}}
                   for group in ("cheap", "mid", "strong")]
    messages = [{"role": "user", "content": "plan the migration"}]
    store = hook.policy.store.store

    acme, globex = (scoped(hook.tenant("app:" + name), SID) for name in ("acme", "globex"))

    def costs() -> list[int]:
        return [store.get_session(sid).session_cost_micros for sid in (acme, globex)]

    async def run() -> None:
        router = Router(model_list=deployments)
        for tenant, model in (("acme", "strong"), ("globex", "mid")):
            await hook.acompletion(router, model=model, messages=messages,
                                   metadata={"session_id": SID, "tenant": tenant})
        for _ in range(1_000):  # LiteLLM logs success after the call returned: a bounded poll
            if all(costs()):
                break
            await asyncio.sleep(0.005)

    asyncio.run(run())
    assert store.get_session(acme).model == "strong" and store.get_session(globex).model == "mid"
    assert all(cost > 0 for cost in costs())  # each call's cost went to its own caller's session
    assert store.get_session(SID) is None  # nothing landed in the unscoped ("") tenant
    # The same application name through the proxy's key namespace is another tenant.
    assert hook.tenant("app:acme") != hook.proxy_tenant(UserAPIKeyAuth(api_key="acme"))


def test_a_flooding_caller_evicts_only_its_own_sessions(make_hook):
    metrics = Metrics()
    hook = make_hook(observer=metrics, max_sessions_per_tenant=100, max_creations_per_tenant_per_minute=None)
    store = hook.policy.store.store

    async def open_session(key: UserAPIKeyAuth, sid: str) -> str:
        data = proxy_request("mid", "litellm_session_id")
        data["litellm_session_id"] = sid
        await hook.async_pre_call_hook(key, DualCache(), data, "acompletion")
        return data["metadata"][DECISION_KEY]["session_id"]

    async def run() -> list[str]:
        mine = [await open_session(KEY_A, f"a-{i}") for i in range(20)]  # A's sessions
        for start in range(0, 10_000, 250):  # B floods new ids, 250 requests in flight at a time
            await asyncio.gather(*(open_session(KEY_B, f"flood-{i}") for i in range(start, start + 250)))
        return mine

    a_sessions = asyncio.run(run())
    tenant_a, tenant_b = hook.proxy_tenant(KEY_A), hook.proxy_tenant(KEY_B)
    expected = len(a_sessions) + 100
    deadline = time.monotonic() + 30  # evictions are told to their shards: wait for them, bounded
    while store.get_stats().count > expected and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert store.get_stats().count == expected  # memory bounded: B holds 100, A all of its own
    assert all(store.get_session(sid) is not None for sid in a_sessions)
    assert store._rt.capacity.tenant_sessions(tenant_b) == 100
    assert len(store._rt.capacity) == expected  # the keeper's own bookkeeping is bounded too
    assert store.get_session(scoped(tenant_b, "flood-0")) is None  # B's oldest went first
    hook.close()  # the log is complete and on disk
    evicted = [r for r in read_log(Path(hook._owned.config.event_log)) if r["event"] == "session.evicted"]
    assert len(evicted) == 9_900
    assert {(tenant_of(r["session_id"]), r["reason"]) for r in evicted} == {(tenant_b, "tenant_limit")}
    assert tenant_a not in {tenant_of(r["session_id"]) for r in evicted}
    assert metrics.value("session_engine_tenant_evictions_total", {"tenant": tenant_b}) == 9_900
    assert metrics.value("session_engine_tenant_evictions_total", {"tenant": tenant_a}) == 0


def test_a_caller_past_its_creation_rate_is_refused_and_logged(make_store, log_path):
    scope = Scope(SECRET)
    a, b = scope.tenant("key:a"), scope.tenant("key:b")
    metrics = Metrics()
    with freeze_time("2026-03-01 12:00:00") as clock:
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=str(log_path),
                                    max_creations_per_tenant_per_minute=5), observer=metrics)
        try:
            for i in range(5):
                store.set_session(scoped(a, f"s{i}"), "m")
            with pytest.raises(SessionRefused, match="max_creations_per_tenant_per_minute"):
                store.set_session(scoped(a, "s5"), "m")
            store.tell(SetSession(scoped(a, "s6"), "m"))  # told: refused all the same, and logged
            store.set_session(scoped(a, "s0"), "m2")  # an existing session is not a creation
            store.set_session(scoped(b, "s0"), "m")  # another caller is not limited by A
            store.set_session("unscoped", "m")  # nor is the "" tenant
            assert store.get_session(scoped(a, "s5")) is None and store.get_session(scoped(a, "s6")) is None
            clock.tick(timedelta(seconds=12))  # one minute / 5: one more creation
            store.set_session(scoped(a, "s7"), "m")
            with pytest.raises(SessionRefused):
                store.set_session(scoped(a, "s8"), "m")
            assert store.get_stats().count == 8
        finally:
            store.close()
    refused = [r for r in read_log(log_path) if r["event"] == "session.refused"]
    assert [(r["session_id"], r["reason"], r["limit"]) for r in refused] == [
        (scoped(a, s), "tenant_rate", 5) for s in ("s5", "s6", "s8")]
    assert metrics.value("session_engine_tenant_refusals_total", {"tenant": a}) == 3


def test_scoped_sessions_survive_a_restart_for_their_caller_only(make_hook, tmp_path: Path):
    first = make_hook()
    log = first._owned.config.event_log

    async def route(hook: SessionEngineCallback, key: UserAPIKeyAuth, model: str) -> dict[str, Any]:
        return await call(hook, key, model, "x-session-id")

    assert asyncio.run(route(first, KEY_A, "strong"))["kind"] == "initialize"
    first.close()
    again = SessionEngineCallback.create(MODELS, Config(enabled=True, tick_ms=0, event_log=log),
                                         Options(deadline_s=5.0), secret=SECRET)  # a new process, same secret
    try:
        assert (asyncio.run(route(again, KEY_A, "mid"))["kind"], "strong") == ("retain", "strong")
        assert asyncio.run(route(again, KEY_B, "mid"))["kind"] == "initialize"
    finally:
        again.close()


# -- the representation ------------------------------------------------------------------------

ids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=64).filter(
    lambda s: not tenant_of(s))
callers = st.text(min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(caller_1=callers, caller_2=callers, id_1=ids, id_2=ids)
def test_distinct_callers_never_name_the_same_session_and_scoping_is_stable(caller_1, caller_2, id_1, id_2):
    replica_1, replica_2 = Scope(SECRET), Scope(SECRET)  # two processes (restart, or two replicas)
    t1, t2 = replica_1.tenant(caller_1), replica_2.tenant(caller_2)
    one, two = scoped(t1, id_1), scoped(t2, id_2)
    assert (one == two) == (caller_1 == caller_2 and id_1 == id_2)
    assert scoped(replica_2.tenant(caller_1), id_1) == one  # stable across processes
    assert split(one) == (t1, id_1) and tenant_of(one) == t1
    assert Scope(SECRET + "x").tenant(caller_1) != t1  # another operator's secret: another tenant


def test_the_tenant_is_an_hmac_never_the_raw_key(make_hook):
    hook = make_hook()
    asyncio.run(call(hook, KEY_A, "strong", "x-session-id"))
    hook.close()  # the log is complete and on disk
    text = Path(hook._owned.config.event_log).read_text()
    assert KEY_A.api_key not in text and "sk-caller-a" not in text
    assert hook.proxy_tenant(KEY_A) in text


@pytest.mark.parametrize(("tenant", "session_id", "field"), [
    ("0123456789abcdef01234567:", "s", "tenant"),  # a separator in the tenant
    ("tenant:with:separators", "s", "tenant"),
    ("0123456789abcdef0123456\n", "s", "tenant"),  # control character
    ("0123456789abcdef01234567" * 3, "s", "tenant"),  # excessive length
    ("0123456789abcdef01234567", "a\x00b", "session_id"),
    ("0123456789abcdef01234567", "a\udcffb", "session_id"),  # a lone surrogate (a JSON body's escape)
    ("0123456789abcdef01234567", "x" * 232, "session_id"),  # too long once scoped
    ("0123456789abcdef01234567", "fedcba9876543210fedcba98:s", "session_id"),  # a scope of its own
    ("", "fedcba9876543210fedcba98:s", "session_id"),  # names a tenant's session while unscoped
])
def test_bad_tenants_and_ids_get_a_clear_error(tenant, session_id, field):
    with pytest.raises(InvalidEvent) as err:
        scoped(tenant, session_id)
    assert err.value.field == field
    assert not [value for value in (tenant, session_id) if len(value) > 3 and value in str(err.value)]  # not echoed


@pytest.mark.parametrize("bad", ["a\nb", "x" * 300, "fedcba9876543210fedcba98:conversation-0001", "\x7f",
                                 "lone \ud800"])
def test_a_bad_id_through_the_hook_writes_nothing(make_hook, bad):
    hook = make_hook()
    data = proxy_request("mid", "metadata.session_id")
    data["metadata"]["session_id"] = bad

    async def run() -> dict[str, Any]:
        return await hook.async_pre_call_hook(KEY_A, DualCache(), data, "acompletion")

    decision = asyncio.run(run())["metadata"][DECISION_KEY]
    assert (decision["session_id"], decision["kind"], decision["source"]) == (
        "", "bypass", "invalid:metadata.session_id")
    assert hook.policy.store.store.get_stats().count == 0
    hook.close()
    log = Path(hook._owned.config.event_log)
    assert not log.exists() or list(read_log(log)) == []
    with pytest.raises(InvalidEvent):
        check_caller_id(bad)


def test_a_missing_or_weak_secret_is_refused_unless_scoping_is_off(monkeypatch):
    monkeypatch.delenv(SECRET_ENV, raising=False)
    for secret in (None, "", "short", "a" * 64):
        with pytest.raises(InvalidEvent) as err:
            SessionEngineCallback.create(MODELS, Config(enabled=True, tick_ms=0), secret=secret)
        assert err.value.field == "secret"
    with pytest.raises(InvalidEvent) as err:
        SessionEngineCallback.create(MODELS, Config(enabled=True, tick_ms=0), scope="tenant")
    assert err.value.field == "scope"
    # The opt-out, for a trusted single-tenant deployment: callers then share ids, as documented.
    hook = SessionEngineCallback.create(MODELS, Config(enabled=True, tick_ms=0), Options(deadline_s=5.0),
                                        scope="off")
    try:
        async def run() -> list[dict[str, Any]]:
            return [await call(hook, KEY_A, "strong", "x-session-id"), await call(hook, KEY_B, "mid", "x-session-id")]

        a, b = asyncio.run(run())
        assert a["session_id"] == b["session_id"] == SID and b["kind"] == "retain"
    finally:
        hook.close()


def test_audit_shows_tenant_and_id_apart_and_filters_by_tenant(make_store, log_path):
    scope = Scope(SECRET)
    a, b = scope.tenant("key:a"), scope.tenant("key:b")
    with freeze_time("2026-03-01 12:00:00"):
        store = make_store(event_log=str(log_path))
        store.set_session(scoped(a, SID), "strong", "COMPLEX")
        store.set_session(scoped(b, SID), "mid", "MEDIUM")
        store.set_session("plain", "cheap")
        store.close()
    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(log_path), "--tenant", a, "--json"])
    assert result.exit_code == 0, result.output
    lives = orjson.loads(result.stdout)
    assert [(life["tenant"], life["id"], life["models"]) for life in lives] == [(a, SID, ["strong"])]
    table = runner.invoke(app, ["audit", str(log_path)]).stdout.splitlines()
    assert table[0].split()[-2:] == ["TENANT", "SESSION"]
    assert {tuple(line.split()[-2:]) for line in table[1:-1]} == {(a, SID), (b, SID), ("-", "plain")}
    unscoped = orjson.loads(runner.invoke(app, ["audit", str(log_path), "--tenant", "", "--json"]).stdout)
    assert [life["session_id"] for life in unscoped] == ["plain"]
    timeline = runner.invoke(app, ["audit", str(log_path), "--tenant", b, "--session", SID])
    assert timeline.exit_code == 0 and "pinned to model 'mid'" in timeline.stdout
    bad = runner.invoke(app, ["audit", str(log_path), "--tenant", "acme"])
    assert bad.exit_code == 2 and "tenant must be 24 lowercase hex" in bad.stderr


def test_a_log_with_tenant_limit_evictions_replays_reopens_and_verifies(log_path):
    """The writer and the reader agree on session.evicted's reasons: a store past max_sessions_per_tenant logs
    reason tenant_limit, and the engine's own readers (replay, reopening the store, audit --verify) take it."""
    tenant = "0123456789abcdef01234567"
    first, second = f"{tenant}:a", f"{tenant}:b"
    config = Config(enabled=True, tick_ms=0, event_log=str(log_path), max_sessions_per_tenant=1)
    store = SessionStore(config)
    try:
        store.set_session(first, "m")
        store.set_session(second, "m")  # past the tenant's limit: its least recently used is evicted
        assert store.get_session(first) is None  # the eviction was queued ahead of this ask
    finally:
        store.close()
    assert [(r["session_id"], r["reason"]) for r in read_log(log_path) if r["event"] == "session.evicted"] == [
        (first, "tenant_limit")]
    assert set(replay(log_path)) == {second}
    again = SessionStore(config)
    try:
        assert again.get_session(second) is not None and again.get_session(first) is None
    finally:
        again.close()
    report = verify(log_path)
    assert report.status in ("verified", "unchained"), report


def test_the_keeper_evicts_a_tenants_own_least_recently_used_and_respects_max_sessions():
    from engine.shell.capacity import Capacity

    a, b = (f"{t}:" for t in (Scope(SECRET).tenant("a"), Scope(SECRET).tenant("b")))
    keeper = Capacity(max_sessions=5, max_per_tenant=2)
    assert keeper.note([(a + "1", 1), (b + "1", 2), (a + "2", 3), ("plain", 4)], ()) == []
    assert keeper.note([(a + "1", 5), (a + "3", 6)], ()) == [(a + "2", 3, "tenant_limit")]  # a1 was used again
    assert keeper.note([(b + "2", 7), ("other", 8)], ()) == [(b + "1", 2, "capacity")]  # store-wide: oldest of all
    assert keeper.tenant_sessions(tenant_of(b + "x")) == 1 and len(keeper) == 5
    keeper.note((), [a + "1", a + "3"])
    assert keeper.tenant_sessions(tenant_of(a + "x")) == 0 and len(keeper) == 3


def test_reopening_a_log_with_a_lower_tenant_limit_evicts_that_tenants_oldest(make_store, log_path):
    tenant = Scope(SECRET).tenant("key:a")
    with freeze_time("2026-03-01 12:00:00") as clock:
        store = make_store(event_log=str(log_path))
        for i in range(4):
            store.set_session(scoped(tenant, f"s{i}"), "m")
            store.set_session(f"plain-{i}", "m")
            clock.tick(timedelta(seconds=1))
        store.close()
        again = make_store(event_log=str(log_path), max_sessions_per_tenant=2)
        assert [again.get_session(scoped(tenant, f"s{i}")) is not None for i in range(4)] == [False, False, True, True]
        assert all(again.get_session(f"plain-{i}") is not None for i in range(4))  # the "" tenant is not limited
        again.close()
    evicted = [(r["session_id"], r["reason"]) for r in read_log(log_path) if r["event"] == "session.evicted"]
    assert evicted == [(scoped(tenant, "s0"), "tenant_limit"), (scoped(tenant, "s1"), "tenant_limit")]
