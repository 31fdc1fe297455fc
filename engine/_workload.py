"""The simulated router workload: conversations, their requests, and what a router does with each.

``Workload`` generates the request sequence from a seed (main thread only);
``Router.route`` is what an LLM router does with the session store for one
request. docs/simulate.md gives the model in prose; the shares and prices
are the constants below.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from engine._entry import MessageInfo
from engine._helpers import derive_session_id, hash_request_content, provider_from_model, should_cache_sticky
from engine.store import SessionStore
from events import Cost, Tier

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
_FILLER = ("lorem ipsum dolor sit amet,\tconsectetur adipiscing elit\n" * 1200)


class Conversation:
    """One conversation as the client and the router see it.

    The plan fields are written only by the generator (main thread); the router
    fields only by the worker that holds the conversation during a chunk.
    """

    __slots__ = ("agent", "explicit", "history", "index", "long_context", "model", "pending", "reply_bytes",
                 "retries_left", "session_id", "started", "strikes", "tier", "turn", "user_bytes")

    def __init__(self, index: int, seed: int, rng: random.Random) -> None:
        self.index = index
        self.session_id = derive_session_id(f"seed {seed} conversation {index}: hello, I need help with")
        # Plan side.
        self.tier = rng.choices(TIERS, TIER_WEIGHTS)[0]
        self.model = rng.choice(CATALOGUE[self.tier])[0]
        self.explicit = rng.random() < P_EXPLICIT
        self.long_context = rng.random() < P_LONG_CONTEXT
        self.agent = rng.random() < P_AGENT
        self.turn = 0
        self.retries_left = 0
        self.user_bytes = 0
        # Router side.
        self.history: list[MessageInfo] = []
        if self.long_context:
            self.history.append(MessageInfo("system", _FILLER[: rng.randint(12_000, 48_000)]))
        self.started = False
        self.strikes = 0
        self.reply_bytes = 0
        self.pending = False


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


class Workload:
    """Generates the request sequence chunk by chunk from one seeded RNG (main thread only)."""

    def __init__(self, sessions: int, requests: int, seed: int) -> None:
        self._requests = requests
        self._seed = seed
        self._rng = random.Random(seed)
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
            switch = False
            if conv.retries_left:
                conv.retries_left -= 1
                repeat = True
            else:
                repeat = False
                conv.turn += 1
                conv.user_bytes = rng.randint(80, 2_400)
                roll = rng.random()
                if roll < P_STUCK:
                    conv.retries_left = 2
                elif roll < P_STUCK + P_RETRY:
                    conv.retries_left = 1
                if conv.turn > 1 and rng.random() < P_EXPLICIT_SWITCH:
                    conv.tier = rng.choice(TIERS)
                    conv.model = rng.choice(CATALOGUE[conv.tier])[0]
                    conv.explicit = switch = True
            out.append(Request(conv, self._next, conv.turn, repeat, conv.user_bytes, rng.randint(40, 1_200),
                               conv.model, conv.tier, conv.explicit, switch))
            self._next += 1
        return out


def _model_for(tier: Tier, current: str) -> str:
    """The router's model for a tier: keep the provider of the current model where it offers one."""
    models = [m for m, _, _ in CATALOGUE[tier]]
    provider = provider_from_model(current)
    return next((m for m in models if provider_from_model(m) == provider), models[0])


class Router:
    """What a router does with the session store on every request; one instance per worker."""

    def __init__(self, store: SessionStore, set_time: Callable[[int], None], start_ms: int, step_ms: float) -> None:
        self.store = store
        self.set_time = set_time
        self.start_ms = start_ms
        self.step_ms = step_ms
        self.strikes = 0
        self.resumed = 0

    def route(self, req: Request) -> None:
        store = self.store
        conv = req.conversation
        sid = conv.session_id
        # Request i happens at start + i * step, whichever worker routes it and whenever.
        self.set_time(self.start_ms + int(req.number * self.step_ms))
        if not req.repeat:
            # The client sends the whole history: last reply, then the new user message.
            if conv.pending:
                conv.history.append(MessageInfo("assistant", _FILLER[: conv.reply_bytes]))
            conv.history.append(MessageInfo("user", f"[{conv.index}:{req.turn}] " + _FILLER[: req.user_bytes]))
            if len(conv.history) > CONTEXT_MESSAGES + 1:
                keep = conv.history[:1] if conv.history[0].role == "system" else []
                conv.history = keep + conv.history[-CONTEXT_MESSAGES:]
        entry = store.get_session(sid)
        if entry is None or req.switch:
            if entry is None:
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
        conv.reply_bytes = req.output_tokens * 3
        conv.pending = True
