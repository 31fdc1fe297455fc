"""The engine's promises, held where its features meet: a hypothesis state machine over the public API.

Every rule of the engine a router reaches is a step: sessions set, touched,
hashed into strikes and escalated; raw costs; requests routed under a budget
cap with reservations, settled (never above their estimate) or released;
explicit pins and deployments; cache pins; clears; capacity, per-tenant and
creation-rate limits; time moving past every deadline (idle timeout, cache TTL,
reservation TTL, budget window) with and without a clock pass; a log small
enough to rotate into segments every few steps; and restarts (close, reopen).

After every step the promises of ``engine.tools.promises`` (what
``session-engine simulate --check`` prints) must hold on the log, read by the
engine's own readers: live state == ``replay(log)``; ``audit --verify``
passes; the audit's and the report's spend equal the spend the callers were
acknowledged; no capped session's settled spend passed its cap. A restart must
serve exactly the state the closed store served.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine import BudgetExceeded, Config, Entry, InvalidEvent, SessionRefused, SessionStore
from engine.log.replay import read_log
from engine.policy import Options, Policy, Request, RouteDecision
from engine.tools.promises import check_promises
from events import SetDeployment, Tier

TENANT = "0123456789abcdef01234567"
OTHER = "89abcdef0123456789abcdef"
#: Sessions the store's own API drives (raw costs included: no cap applies to them).
RAW = ["a", "b", f"{TENANT}:t1", f"{TENANT}:t2", f"{TENANT}:t3", f"{OTHER}:o1"]
#: Sessions only routed requests charge: each is under the policy's budget cap.
ROUTED = ["r1", "r2", f"{TENANT}:r3", f"{OTHER}:r4"]
SIDS = RAW + ROUTED
#: The sessions ``burst`` opens (uncapped, like RAW).
BURSTS: list[str] = [f"{t}:burst{i}" for t in (TENANT, OTHER) for i in range(8)]
MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "anthropic/claude-sonnet", Tier.COMPLEX: "openai/gpt-4o",
          Tier.REASONING: "openai/o1"}
#: USD a request costs at most with each model: the estimator, an upper bound of every settled cost.
PRICES = {"openai/gpt-4o-mini": 0.0004, "anthropic/claude-sonnet": 0.003, "openai/gpt-4o": 0.005,
          "openai/o1": 0.02, "vllm/llama": 0.001}
CAP_USD = 0.05
TTL_MS = 300_000  # the providers' prefix-cache TTL (cache_ttl_for_provider)
TIMEOUT_MS = 2 * TTL_MS
RESERVATION_TTL_MS = 30_000
BUDGET_WINDOW_MS = 2 * TIMEOUT_MS
#: Clock moves: none, small, past the reservation TTL, past a cache pin's TTL, past the idle timeout, past the
#: budget window (a ledger outlives its session's idle expiry until then).
GAPS_MS = [0, 1, 1_000, RESERVATION_TTL_MS + 1, TTL_MS + 1, TIMEOUT_MS + 1, BUDGET_WINDOW_MS + 1]
DEPLOYMENTS = ["openai:east", "openai:west", "anthropic:east", "azure:eu", "openrouter"]
#: A routed request's deployment candidates: none, a provider's two, one of them gone, other keys.
CANDIDATES = [(), ("openai:east", "openai:west"), ("openai:west",), ("azure:eu", "openrouter")]
TEXTS = ["fix the bug", "fix the bug", "thanks", "LITELLM ESCALATE now"]


def estimate(model: str, request: Request) -> float:
    return PRICES.get(model, 0.001)


class Promises(RuleBasedStateMachine):
    """One store, its policy and a frozen clock; what the callers were acknowledged, kept beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="promises-"))
        self.frozen = freeze_time("2026-03-01 12:00:00", ignore=["hypothesis"])
        self.clock = self.frozen.start()
        self.store: SessionStore | None = None
        self.acknowledged = 0
        #: Routed requests not yet settled or released.
        self.open: list[RouteDecision] = []
        #: The session of the last routed request ("" before the first).
        self.last = ""
        self.last_request: Request | None = None

    # -- set-up -------------------------------------------------------------------------------
    @initialize(directory=st.booleans(), max_sessions=st.sampled_from([None, 4, 7]),
                per_tenant=st.sampled_from([1, 2, 10_000]), rate=st.sampled_from([2, 3]),
                mode=st.sampled_from(["graceful", "strict"]), chain=st.sampled_from(["batch", "record"]))
    def open_store(self, directory: bool, max_sessions: int | None, per_tenant: int, rate: int, mode: str,
                   chain: str) -> None:
        self.config = Config(
            enabled=True, tick_ms=0, timeout_ms=TIMEOUT_MS, auto_escalate=True, shards=2, fsync="never",
            event_log=self.dir / ("log" if directory else "audit.jsonl"), segment_bytes=4096,
            audit_chain=chain, max_sessions=max_sessions, max_sessions_per_tenant=per_tenant,
            max_creations_per_tenant_per_minute=rate, budget_window_ms=BUDGET_WINDOW_MS)
        if directory:
            (self.dir / "log").mkdir()
        self.options = Options(max_cost_usd=CAP_USD, budget_mode=mode, estimator=estimate, deadline_s=10.0,
                               reservation_ttl_ms=RESERVATION_TTL_MS)
        self._start()

    def _start(self) -> None:
        self.store = SessionStore(self.config)
        self.policy = Policy(self.store, MODELS, self.options)

    def teardown(self) -> None:
        if self.store is not None:
            self.store.close()
            for record in read_log(self.config.event_log, history=True):
                SEEN.add(feature(record))
        self.frozen.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A store call; a creation the tenant's rate refuses is an answer, not a failure."""
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except SessionRefused:
            return None

    # -- the store's API ----------------------------------------------------------------------
    @rule(sid=st.sampled_from(SIDS), model=st.sampled_from(sorted(PRICES)),
          tier=st.sampled_from([None, *Tier]), explicit=st.booleans())
    def set_session(self, sid: str, model: str, tier: Tier | None, explicit: bool) -> None:
        self._call("set_session", sid, model, tier, user_explicit=explicit)

    @rule(sid=st.sampled_from(SIDS))
    def touch(self, sid: str) -> None:
        self._call("touch_session", sid)

    @rule(sid=st.sampled_from(SIDS), h=st.sampled_from(["h1", "h1", "h2"]))
    def hash(self, sid: str, h: str) -> None:
        self._call("record_request_hash", sid, h)

    @rule(sid=st.sampled_from(SIDS))
    def escalate(self, sid: str) -> None:
        self._call("escalate_session", sid)

    @rule(sid=st.sampled_from(RAW), micros=st.sampled_from([0, 1, 2_500, 10_000, 3_000_000]))
    def cost(self, sid: str, micros: int) -> None:
        try:
            self.store.add_session_cost(sid, micros)  # type: ignore[union-attr]
        except SessionRefused:
            return
        self.acknowledged += micros

    @rule(sid=st.sampled_from(SIDS), provider=st.sampled_from(["openai", "anthropic", "vllm", "other"]))
    def cache_sticky(self, sid: str, provider: str) -> None:
        self._call("set_cache_sticky", sid, provider)

    @rule(tenant=st.sampled_from([TENANT, OTHER]), first=st.integers(0, 1_000))
    def burst(self, tenant: str, first: int) -> None:
        """A tenant opens four new sessions at once (its creation rate, its session limit)."""
        for i in range(first, first + 4):
            self._call("set_session", f"{tenant}:burst{i % 8}", "openai/gpt-4o-mini")

    @rule(sid=st.sampled_from(SIDS), provider=st.sampled_from(["openai", "anthropic"]))
    def pin_left_idle(self, sid: str, provider: str) -> None:
        """A cache pin whose session stays idle past the provider's TTL (not past the idle timeout)."""
        self._call("set_session", sid, "openai/gpt-4o")
        self._call("set_cache_sticky", sid, provider)
        self.clock.tick(timedelta(milliseconds=TTL_MS + 1))
        self._call("is_cache_sticky", sid)

    @rule(sid=st.sampled_from(SIDS), deployment=st.sampled_from(DEPLOYMENTS))
    def deployment(self, sid: str, deployment: str) -> None:
        self._call("ask", SetDeployment(sid, deployment))

    @rule(sid=st.sampled_from(SIDS))
    def clear(self, sid: str) -> None:
        self.store.clear_session(sid)  # type: ignore[union-attr]

    @rule()
    def clear_all(self) -> None:
        self.store.clear_all()  # type: ignore[union-attr]

    @rule(sid=st.sampled_from(SIDS), text=st.sampled_from(["x", "\ud800", "a\x00b", "y" * 300]))
    def bad_input(self, sid: str, text: str) -> None:
        """Bad input is refused, naming the field, and changes nothing (the invariants check that)."""
        with pytest.raises(InvalidEvent):
            self.store.set_session(sid if text == "x" else text, text if text != "x" else "m" * 300)  # type: ignore

    # -- routed requests under the cap --------------------------------------------------------
    @rule(sid=st.sampled_from(ROUTED), tier=st.sampled_from([None, *Tier]), explicit=st.booleans(),
          text=st.sampled_from(TEXTS), candidates=st.sampled_from(CANDIDATES))
    def route(self, sid: str, tier: Tier | None, explicit: bool, text: str, candidates: tuple[str, ...]) -> None:
        self._route(sid, tier, explicit, text, candidates)

    @precondition(lambda self: self.last)
    @rule(tier=st.sampled_from([Tier.SIMPLE, Tier.COMPLEX, Tier.REASONING]), text=st.sampled_from(TEXTS),
          candidates=st.sampled_from(CANDIDATES))
    def follow_up(self, tier: Tier, text: str, candidates: tuple[str, ...]) -> None:
        """The next turn of the last routed session: a SIMPLE follow-up, a harder question, the same request."""
        self._route(self.last, tier, False, text, candidates)

    @precondition(lambda self: self.last_request is not None)
    @rule()
    def retry(self) -> None:
        """The same request again (an agent stuck in a loop: the third in a row escalates)."""
        self._send(self.last_request)  # type: ignore[arg-type]

    def _route(self, sid: str, tier: Tier | None, explicit: bool, text: str, candidates: tuple[str, ...]) -> None:
        self.last = sid
        model = MODELS[tier] if tier is not None else "vllm/llama"
        self._send(Request(model=model, tier=tier, session_id=sid, messages=[{"role": "user", "content": text}],
                           user_explicit=explicit, candidates=candidates))

    def _send(self, request: Request) -> None:
        self.last_request = request
        try:
            decision = self.policy.route(request)  # type: ignore[union-attr]
        except BudgetExceeded:
            return
        except SessionRefused:
            return
        assert decision.kind.value != "unavailable", decision.reason
        self.open.append(decision)

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 100), share=st.sampled_from([0.0, 0.5, 1.0]))
    def settle(self, index: int, share: float) -> None:
        """The response's cost, never above the decision's estimate (the estimator is an upper bound)."""
        decision = self.open.pop(index % len(self.open))
        micros = int(round(decision.estimate_usd * 1_000_000) * share)
        self.policy.record_response(decision.session_id, micros=micros, deployment=decision.deployment,
                                    decision=decision)
        self.acknowledged += micros

    @precondition(lambda self: self.open)
    @rule(index=st.integers(0, 100))
    def release(self, index: int) -> None:
        self.policy.release(self.open.pop(index % len(self.open)))

    # -- time and restarts --------------------------------------------------------------------
    @rule(gap=st.sampled_from(GAPS_MS), tick=st.booleans())
    def time_passes(self, gap: int, tick: bool) -> None:
        self.clock.tick(timedelta(milliseconds=gap))
        if tick:
            self.store.tick()  # type: ignore[union-attr]

    @rule()
    def restart(self) -> None:
        before = self.live()
        self.store.close()  # type: ignore[union-attr]
        self._start()
        assert self.live() == before
        SEEN.add("restart")

    # -- the promises -------------------------------------------------------------------------
    def live(self) -> dict[str, Entry]:
        store = self.store
        assert store is not None
        store.get_stats()  # every shard has applied what this thread told it
        return {sid: entry for sid in [*SIDS, *BURSTS] if (entry := store.get_session(sid)) is not None}

    @invariant()
    def promises_hold(self) -> None:
        if self.store is None:
            return
        live = self.live()
        broken = [p for p in check_promises(self.config.event_log, live, self.acknowledged,  # type: ignore
                                            cap_micros=round(CAP_USD * 1_000_000), capped=ROUTED.__contains__)
                  if not p.held]
        assert not broken, broken


def feature(record: dict[str, Any]) -> str:
    """What a record shows the machine reached: its name, with its reason, cause or kind where it has one."""
    name = record["event"]
    detail = record.get("kind") or record.get("cause") or (record.get("reason") if name != "session.escalated" else "")
    return f"{name}:{detail}" if detail else name


#: What the machine must reach in a run: every record the engine writes for these rules, every reason an
#: eviction, clear or expiry has, the ledger's continuation, every decision kind a policy makes here, restarts.
FEATURES = frozenset({
    "session.created", "session.created:cost", "session.created:budget_ledger", "session.updated",
    "session.touched", "hash.recorded", "session.escalated", "cost.added", "sticky.pinned", "sticky.expired",
    "deployment.set", "deployment.group_set", "decision.made:initialize", "decision.made:retain",
    "decision.made:upgrade", "decision.made:bypass", "decision.made:escalate", "decision.made:switch",
    "decision.made:refuse", "budget.reserved", "budget.released", "budget.lapsed", "session.expired:idle",
    "session.evicted:capacity", "session.evicted:tenant_limit", "session.cleared:cleared",
    "session.cleared:clear_all", "session.refused:tenant_rate", "input.rejected", "log.snapshot", "restart",
})
SEEN: set[str] = set()


def test_the_engine_keeps_its_promises_on_the_memory_backend() -> None:
    SEEN.clear()
    run_state_machine_as_test(Promises, settings=settings(
        max_examples=120, stateful_step_count=50, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow]))
    assert not FEATURES - SEEN, f"the machine never reached {sorted(FEATURES - SEEN)}"
