"""The simulated router workload: conversations, their requests, and what a router does with each.

``Workload`` generates the request sequence from a seed (main thread only).
``PolicyRouter.route`` is what an LLM router embedding ``engine.policy`` does
for one request (the default workload: the routing turn, budgets, deployments,
tools); ``Router.route`` drives the store's seed API directly (``--workload
seed``). docs/simulate.md gives the model in prose; the shares and prices are
the constants below.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from engine.core.entry import MessageInfo
from engine.core.providers import provider_from_model
from engine.core.requests import derive_session_id, hash_request_content, should_cache_sticky
from engine.policy import BudgetExceeded, Kind, Options, Policy
from engine.policy import Request as PolicyRequest
from engine.store import SessionStore
from events import Cost, Tier, tier_above

__all__ = [
    "Conversation", "OUTAGE", "OUTAGE_DEPLOYMENT", "PRICES", "PolicyRouter", "Request", "Router", "STALLS", "Workload",
    "history", "model_table", "policy_options",
]

#: Popularity of the conversation of rank r is proportional to 1 / (r + 1) ** ZIPF_S.
ZIPF_S = 1.1

#: (model, input USD per million tokens, output USD per million tokens), by tier.
CATALOGUE: dict[Tier, tuple[tuple[str, float, float], ...]] = {
    Tier.SIMPLE: (("openai/gpt-4o-mini", 0.15, 0.60), ("google/gemini-2.0-flash", 0.10, 0.40)),
    Tier.MEDIUM: (("anthropic/claude-sonnet-4.5", 3.00, 15.00), ("openai/gpt-4.1", 2.00, 8.00)),
    Tier.COMPLEX: (("anthropic/claude-opus-4.1", 15.00, 75.00), ("vllm/llama-3.3-70b", 0.60, 0.60)),
    Tier.REASONING: (("openai/o3", 2.00, 8.00), ("deepseek/deepseek-reasoner", 0.55, 2.19)),
}
PRICES = {model: (p_in, p_out) for models in CATALOGUE.values() for model, p_in, p_out in models}
TIER_OF = {model: tier for tier, models in CATALOGUE.items() for model, _, _ in models}
TIERS = (Tier.SIMPLE, Tier.MEDIUM, Tier.COMPLEX, Tier.REASONING)
#: Share of new conversations the complexity router starts at each tier.
TIER_WEIGHTS = (0.45, 0.33, 0.16, 0.06)
#: A new conversation's user picked the model explicitly (the router must never escalate it).
P_EXPLICIT = 0.08
#: A later turn where the user switches model explicitly.
P_EXPLICIT_SWITCH = 0.004
#: A conversation opens with a long document or system prompt (pins the provider cache at once).
P_LONG_CONTEXT = 0.12
#: An agent conversation: its requests carry tool names, which are part of the request hash.
P_AGENT = 0.25
#: After a turn, the same request is sent twice more (third identical request: escalation) ...
P_STUCK = 0.03
#: ... or once more (one strike, no escalation).
P_RETRY = 0.04
#: The router keeps this many recent messages of the history (plus the system prompt).
CONTEXT_MESSAGES = 40
#: Cached input tokens cost this share of the list price while the provider cache is pinned.
CACHED_PRICE = 0.1
AGENT_TOOLS = ("read_file", "run_tests", "search")
#: Policy workload: a later turn the complexity router rates SIMPLE (a "thanks"; served by the cheap model) ...
P_ROUTE_SIMPLE = 0.08
#: ... or one tier above the conversation's (a harder question: the pin moves up).
P_ROUTE_UP = 0.03
#: Policy workload: an agent turn is an agent loop, one request per tool call answered. What the agent
#: does in a turn, by share: the stalls (``STALLS``) and the progress that simpler detectors take for
#: one (docs/simulate.md, docs/policy.md "Stalls"). Each is a list of (tool, arguments, result, errored).
AGENT_SCENARIOS = (("progress", 0.52), ("fix", 0.10), ("poll", 0.07), ("double", 0.08), ("loop", 0.08),
                   ("error_loop", 0.06), ("retry_lookup", 0.06), ("flaky_retry", 0.03))
#: The scenarios that are stalls, and from which of their steps (1-based) the stall shows: the third
#: repeat of the same call and result, the third error in a row, the third try of a call a lookup broke.
STALLS = {"loop": 3, "error_loop": 3, "retry_lookup": 4, "flaky_retry": 4}
#: Every provider serves from two deployments (LiteLLM deployment keys); one of them has an outage.
REGIONS = ("east", "west")
OUTAGE_DEPLOYMENT = "anthropic:east"
#: The outage covers this share of the run's requests (by request number, so it is the same for a seed).
OUTAGE = (0.35, 0.55)
#: A request's output limit (``max_tokens``): the most a response may return, and what the estimator prices.
MAX_OUTPUT_TOKENS = 1_200
_TOOL_DEFS = tuple({"type": "function", "function": {"name": name}} for name in AGENT_TOOLS)
_FILLER = ("lorem ipsum dolor sit amet,\tconsectetur adipiscing elit\n" * 1200)


class Conversation:
    """One conversation as the client and the router see it.

    The plan fields are written only by the generator (main thread); the router
    fields only by the worker that holds the conversation during a chunk.
    """

    __slots__ = ("agent", "anthropic", "explicit", "history", "index", "long_context", "model", "pending",
                 "reply_bytes", "retries_left", "seed", "session_id", "started", "steps", "strikes", "stuck", "tier",
                 "turn", "user_bytes")

    def __init__(self, index: int, seed: int, rng: random.Random) -> None:
        self.index = index
        self.seed = seed
        self.session_id = derive_session_id(f"seed {seed} conversation {index}: hello, I need help with")
        # Plan side.
        self.tier = rng.choices(TIERS, TIER_WEIGHTS)[0]
        self.model = rng.choice(CATALOGUE[self.tier])[0]
        self.explicit = rng.random() < P_EXPLICIT
        self.long_context = rng.random() < P_LONG_CONTEXT
        self.agent = rng.random() < P_AGENT
        self.turn = 0
        self.retries_left = 0
        self.stuck = False
        self.user_bytes = 0
        #: Policy workload: the agent steps of the current turn still to send, and the message shape
        #: (every other agent conversation speaks Anthropic Messages, the rest chat completions).
        self.steps: list[Step] = []
        self.anthropic = index % 2 == 1
        # Router side.
        self.history: list[MessageInfo] = []
        if self.long_context:
            self.history.append(MessageInfo("system", _FILLER[: rng.randint(12_000, 48_000)]))
        self.started = False
        self.strikes = 0
        self.reply_bytes = 0
        self.pending = False


@dataclass(frozen=True, slots=True)
class Step:
    """One tool call of an agent loop and its result; ``stalled``: the agent is stuck by this call."""

    scenario: str
    number: int
    tool: str
    arguments: str
    result: str
    error: bool
    stalled: bool


def agent_steps(scenario: str, conv: int, turn: int, rng: random.Random) -> list[Step]:
    """The tool calls an agent makes in one turn of ``scenario`` (docs/simulate.md)."""
    tag = f"{conv}_{turn}"
    calls: list[tuple[str, dict[str, Any], str, bool]]
    if scenario == "progress":  # looks around and changes things: every call new
        kinds = (("read_file", "path", "src/m{}.py", "contents of m{}"), ("search", "q", "symbol {}", "3 hits for {}"),
                 ("edit_file", "path", "src/m{}.py", "edited m{}"))
        calls = []
        for i in range(rng.randint(2, 4)):
            tool, key, arg, result = kinds[(i + turn) % 3]
            calls.append((tool, {key: arg.format(f"{tag}_{i}")}, result.format(f"{tag}_{i}"), False))
    elif scenario == "fix":  # edit, test, edit, test: the same test run, fewer failures each time
        calls = []
        for i, failed in enumerate((3, 1, 0)):
            calls.append(("edit_file", {"path": f"src/fix{tag}.py", "patch": i}, "edited", False))
            calls.append(("run_tests", {"suite": "unit"}, f"{failed} failed, {40 - failed} passed" if failed
                          else "40 passed", failed > 0))
    elif scenario == "poll":  # waits for a build: the same call, a new answer each time
        calls = [("start_build", {"target": tag}, f"build {tag} queued", False)]
        calls += [("build_status", {"build": tag}, text, False) for text in ("running 20%", "running 70%", "succeeded")]
    elif scenario == "double":  # reads a file twice (one retry), then moves on
        calls = [("read_file", {"path": f"src/d{tag}.py"}, f"contents of d{tag}", False)] * 2
        calls += [("edit_file", {"path": f"src/d{tag}.py"}, "edited", False), ("search", {"q": tag}, "1 hit", False)]
    elif scenario == "loop":  # reads the same file over and over
        calls = [("read_file", {"path": f"src/l{tag}.py"}, f"contents of l{tag}", False)] * 4
    elif scenario == "error_loop":  # tries command after command, every one fails
        calls = [("run_cmd", {"cmd": cmd}, f"Error: exit 2 ({cmd})", True) for cmd in ("make", "make -j1", "make all")]
    elif scenario == "retry_lookup":  # the same failing call, one lookup in between, then the same call again
        fail = ("run_tests", {"suite": "all"}, "Error: exit 1 (test_io failed)", True)
        calls = [fail, fail, ("search", {"q": "test_io"}, "tests/test_io.py:12", False), fail]
    else:  # flaky_retry: as retry_lookup, but each error names another request id
        calls = [("fetch", {"url": f"https://api/{tag}"}, f"Error: timeout (request {tag}-{k})", True) for k in (1, 2)]
        calls += [("search", {"q": "timeout"}, "docs/net.md:3", False),
                  ("fetch", {"url": f"https://api/{tag}"}, f"Error: timeout (request {tag}-3)", True)]
    since = STALLS.get(scenario, 0)
    return [Step(scenario, n, tool, orjson.dumps(args, option=orjson.OPT_SORT_KEYS).decode(), result, error,
                 bool(since) and n >= since)
            for n, (tool, args, result, error) in enumerate(calls, 1)]


@dataclass(frozen=True, slots=True)
class Request:
    """One request of the plan: everything random about it is decided here, from the seed."""

    conversation: Conversation
    number: int
    turn: int
    repeat: bool
    user_bytes: int
    output_tokens: int
    model: str
    tier: Tier
    explicit: bool
    switch: bool
    #: Policy workload: the tier the complexity router gives this request, and the agent's tool call
    #: this request answers (None: a user turn or a repeat).
    route_tier: Tier | None = None
    step: Step | None = None
    #: Ground truth for the stall detector's measure: the request is a stall (the third identical
    #: request in a row, or a stalled agent step).
    stalled: bool = False


class Workload:
    """Generates the request sequence chunk by chunk from one seeded RNG (main thread only)."""

    def __init__(self, sessions: int, requests: int, seed: int, agent_loops: bool = False) -> None:
        #: Policy workload: agent turns are agent loops (one request per tool call); the seed workload's
        #: sequence for a seed stays what it was without.
        self._loops = agent_loops
        self._requests = requests
        self._seed = seed
        self._rng = random.Random(seed)
        # The policy workload's per-request draws, from their own stream: the seed workload's sequence
        # stays what it was for a given seed.
        self._route_rng = random.Random(seed * 7919 + 1)
        # Popularity ranks are shuffled over conversation numbers, so the busiest are not 0, 1, 2...
        ranks = list(range(sessions))
        self._rng.shuffle(ranks)
        self._by_rank = ranks
        self._cum = list(itertools.accumulate(1.0 / (r + 1) ** ZIPF_S for r in range(sessions)))
        self.conversations: dict[int, Conversation] = {}
        self._next = 0

    def _pick(self) -> Conversation:
        rng = self._rng
        rank = bisect.bisect_right(self._cum, rng.random() * self._cum[-1])
        index = self._by_rank[min(rank, len(self._by_rank) - 1)]
        conv = self.conversations.get(index)
        if conv is None:
            conv = self.conversations[index] = Conversation(index, self._seed, rng)
        return conv

    def chunk(self, size: int) -> list[Request]:
        rng = self._rng
        out = []
        for _ in range(min(size, self._requests - self._next)):
            conv = self._pick()
            switch = stalled = False
            step = None
            if conv.retries_left:
                conv.retries_left -= 1
                repeat = True
                stalled = conv.stuck and not conv.retries_left  # the third identical request
            elif conv.steps:
                repeat = False
                step = conv.steps.pop(0)
                stalled = step.stalled
            else:
                repeat = False
                conv.turn += 1
                conv.user_bytes = rng.randint(80, 2_400)
                roll = rng.random()
                conv.stuck = roll < P_STUCK
                if roll < P_STUCK:
                    conv.retries_left = 2
                elif roll < P_STUCK + P_RETRY:
                    conv.retries_left = 1
                if conv.turn > 1 and rng.random() < P_EXPLICIT_SWITCH:
                    conv.tier = rng.choice(TIERS)
                    conv.model = rng.choice(CATALOGUE[conv.tier])[0]
                    conv.explicit = switch = True
                if self._loops and conv.agent:
                    conv.steps = agent_steps(self._scenario(), conv.index, conv.turn, self._route_rng)
            roll = self._route_rng.random()
            route_tier = conv.tier
            if not repeat and step is None and conv.turn > 1 and roll < P_ROUTE_SIMPLE:
                route_tier = Tier.SIMPLE
            elif not repeat and step is None and conv.turn > 1 and roll < P_ROUTE_SIMPLE + P_ROUTE_UP:
                route_tier = tier_above(conv.tier)
            out.append(Request(conv, self._next, conv.turn, repeat, conv.user_bytes, rng.randint(40, MAX_OUTPUT_TOKENS),
                               conv.model, conv.tier, conv.explicit, switch, route_tier, step, stalled))
            self._next += 1
        return out

    def _scenario(self) -> str:
        roll = self._route_rng.random()
        for name, share in AGENT_SCENARIOS:
            roll -= share
            if roll < 0:
                return name
        return AGENT_SCENARIOS[0][0]


def _model_for(tier: Tier, current: str) -> str:
    """The router's model for a tier: keep the provider of the current model where it offers one."""
    models = [m for m, _, _ in CATALOGUE[tier]]
    provider = provider_from_model(current)
    return next((m for m in models if provider_from_model(m) == provider), models[0])


class _Worker:
    """A simulated router worker: request ``i`` happens at ``start + i * step``, whichever worker routes it."""

    def __init__(self, set_time: Callable[[int], None], start_ms: int, step_ms: float) -> None:
        self.set_time = set_time
        self.start_ms = start_ms
        self.step_ms = step_ms
        self.resumed = 0
        #: Spend this worker reported to the engine (micro-USD): what ``simulate --check`` holds the log to.
        self.sent_micros = 0

    def _at(self, req: Request) -> None:
        """Set the simulated clock to the request's time, and the conversation's history to what the client
        sends with it (a repeat sends the same again)."""
        self.set_time(self.start_ms + int(req.number * self.step_ms))
        if not req.repeat:
            history(req.conversation, req)


class Router(_Worker):
    """What a router does with the session store on every request; one instance per worker."""

    def __init__(self, store: SessionStore, set_time: Callable[[int], None], start_ms: int, step_ms: float) -> None:
        super().__init__(set_time, start_ms, step_ms)
        self.store = store
        self.strikes = 0

    def route(self, req: Request) -> None:
        store = self.store
        conv = req.conversation
        sid = conv.session_id
        self._at(req)
        entry = store.get_session(sid)
        if entry is None or not entry.model or req.switch:  # a ledger-only entry (budget window) pins nothing
            if entry is None or not entry.model:
                if conv.started:
                    self.resumed += 1  # the session expired (or was evicted) while the user was away
                conv.strikes = 0
            model, tier = req.model, req.tier
            store.set_session(sid, model, tier, user_explicit=req.explicit)
        else:
            model, tier = entry.model, entry.tier or req.tier
            if TIER_OF.get(model) != tier:
                model = _model_for(tier, model)  # the session was escalated: route to its new tier
            store.set_session(sid, model, tier)
        conv.started = True
        tools = AGENT_TOOLS if conv.agent else None
        strikes = store.record_request_hash(sid, hash_request_content(conv.history[-1].content, tools))
        if strikes > conv.strikes:
            self.strikes += strikes - conv.strikes
        conv.strikes = strikes
        input_tokens = sum(len(m.content) for m in conv.history) // 3
        cached = 0
        if entry is not None and entry.cache_sticky:
            cached = input_tokens * 3 // 4  # the pinned provider still holds most of the prefix
        elif should_cache_sticky(conv.history):
            store.set_cache_sticky(sid, provider_from_model(model))
        p_in, p_out = PRICES[model]
        micros = int((input_tokens - cached) * p_in + cached * p_in * CACHED_PRICE + req.output_tokens * p_out)
        # Cost arrives after the response, from a success callback: fire and forget.
        store.tell(Cost(sid, micros))
        self.sent_micros += micros
        conv.reply_bytes = req.output_tokens * 3
        conv.pending = True


# -- the policy workload ---------------------------------------------------------------------------
def model_table() -> dict[Tier, list[str]]:
    """The policy's tier table: the catalogue's models of each tier, in order of preference."""
    return {tier: [m for m, _, _ in models] for tier, models in CATALOGUE.items()}


def _input_tokens(messages: Any) -> int:
    return sum(len(_text(m)) for m in messages) // 3


def _text(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else message.content
    return content if isinstance(content, str) else ""


def estimate_usd(model: str, request: PolicyRequest) -> float:
    """The router's estimator: list price of the request's input (no cache discount) and of the most output it
    may return (``max_tokens``). An upper bound on what the response costs, so the budget cap is a guarantee:
    no session's settled spend passes it (``simulate --check`` holds the run to that)."""
    p_in, p_out = PRICES.get(model, (0.0, 0.0))
    return (_input_tokens(request.messages) * p_in + request.max_tokens * p_out) / 1_000_000


def deployments(model: str, number: int, total: int) -> tuple[str, ...]:
    """The deployment keys able to serve ``model`` for request ``number``: one is down during the outage."""
    provider = provider_from_model(model)
    keys = tuple(f"{provider}:{region}" for region in REGIONS)
    if OUTAGE[0] * total <= number < OUTAGE[1] * total:
        keys = tuple(k for k in keys if k != OUTAGE_DEPLOYMENT)
    return keys


def policy_options(max_cost_usd: float | None, deadline_s: float) -> Options:
    return Options(max_cost_usd=max_cost_usd, estimator=estimate_usd, deadline_s=deadline_s)


class PolicyRouter(_Worker):
    """What a router embedding ``engine.policy`` does on every request; one instance per worker.

    The router's own choice is the conversation's tier (sometimes SIMPLE, sometimes one above);
    the policy's routing turn decides, under the per-session budget; the response's cost (its
    tokens at the served model's price, cached input at a tenth) settles the reservation.
    """

    def __init__(self, policy: Policy, set_time: Callable[[int], None], start_ms: int, step_ms: float,
                 total: int) -> None:
        super().__init__(set_time, start_ms, step_ms)
        self.policy = policy
        self.total = total
        self.refused = 0
        self.restarted = 0

    def route(self, req: Request) -> None:
        conv = req.conversation
        self._at(req)
        tier = req.route_tier or req.tier
        model = req.model if req.explicit or tier is req.tier else _model_for(tier, req.model)
        # The user names the model when the chat starts and when they switch; the explicit pin then holds.
        explicit = req.switch or (req.explicit and not conv.started)
        request = PolicyRequest(model=model, tier=tier, session_id=conv.session_id, messages=tuple(conv.history),
                                tools=_TOOL_DEFS if conv.agent else (), user_explicit=explicit,
                                candidates=deployments(model, req.number, self.total), source="simulate",
                                max_tokens=MAX_OUTPUT_TOKENS)
        try:
            decision = self.policy.route(request)
        except BudgetExceeded:
            # An HTTP 429: the user opens a new chat (a new session, a fresh budget) and goes on there.
            self.refused += 1
            self.restarted += 1
            conv.session_id = derive_session_id(
                f"seed {conv.seed} conversation {conv.index} after turn {req.turn}: hello again")
            conv.history = conv.history[:1] if conv.history and _role(conv.history[0]) == "system" else []
            conv.pending = conv.started = False
            return
        if decision.kind is Kind.INITIALIZE and conv.started and not req.switch and conv.turn > 1:
            self.resumed += 1  # the session had expired (or was evicted) while the user was away
        conv.started = True
        served = decision.model
        input_tokens = _input_tokens(conv.history)
        cached = input_tokens * 3 // 4 if conv.long_context and req.turn > 1 else 0
        p_in, p_out = PRICES.get(served, (0.0, 0.0))
        micros = int((input_tokens - cached) * p_in + cached * p_in * CACHED_PRICE + req.output_tokens * p_out)
        self.policy.record_response(conv.session_id, micros=micros, deployment=decision.deployment,
                                    decision=decision, prompt_tokens=input_tokens,
                                    completion_tokens=req.output_tokens)
        self.sent_micros += micros
        conv.reply_bytes = req.output_tokens * 3
        conv.pending = True


def history(conv: Conversation, req: Request) -> None:
    """The conversation as the client sends it with ``req`` (not a repeat): the last reply, then the new
    user message, or, for an agent step (the policy workload), the assistant's tool call and its result."""
    step = req.step
    if step is not None:
        call_id = f"c{conv.index}-{req.turn}-{step.number}"
        if conv.anthropic:
            conv.history.append({"role": "assistant", "content": [
                {"type": "tool_use", "id": call_id, "name": step.tool, "input": orjson.loads(step.arguments)}]})
            conv.history.append({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": call_id, "content": step.result, "is_error": step.error}]})
        else:
            call = {"id": call_id, "type": "function", "function": {"name": step.tool, "arguments": step.arguments}}
            conv.history.append({"role": "assistant", "content": "", "tool_calls": [call]})
            conv.history.append({"role": "tool", "tool_call_id": call_id, "content": step.result})
    else:
        if conv.pending:
            conv.history.append(MessageInfo("assistant", _FILLER[: conv.reply_bytes]))
        conv.history.append(MessageInfo("user", f"[{conv.index}:{req.turn}] " + _FILLER[: req.user_bytes]))
    if len(conv.history) > CONTEXT_MESSAGES + 1:
        keep = conv.history[:1] if _role(conv.history[0]) == "system" else []
        conv.history = keep + conv.history[-CONTEXT_MESSAGES:]


def _role(message: Any) -> str:
    return message.get("role") if isinstance(message, dict) else message.role
