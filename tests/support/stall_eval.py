"""The stall detector measured on the simulate workload: false escalations and missed stalls of
session-engine's "window" detector, LiteLLM 1.110's own rule and the seed's cumulative strikes, side by
side (docs/policy.md "Stalls" holds the table this prints).

    .venv/bin/python -m tests.support.stall_eval [--requests N] [--sessions N] [--seed N]

The requests are those of ``session-engine simulate`` (the policy workload, engine/tools/workload.py: agent
loops with labelled stalls and labelled progress, plain repeats), each with the whole conversation the
router sees. Every detector reads each request on its own (no latch, no expiry, no budget): a *false
escalation* is a request the detector calls a stall while the workload says the agent makes progress;
a *missed stall* is a stall (one agent turn stuck, or three identical requests in a row) the detector
never calls on any of its stalled requests.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.core.entry import MessageInfo
from engine.core.rules import HASH_WINDOW, count_strikes, stall_reason
from engine.policy import STALL_ERRORS, request_hash, stall_reading, tool_error_run
from engine.tools.workload import STALLS, Conversation, Workload, history
from events import Route, RouteRules

DETECTORS = ("session-engine (window)", "LiteLLM 1.110", "before (cumulative strikes)")


@dataclass
class Figures:
    requests: int = 0
    stall_requests: int = 0
    episodes: int = 0
    fired: Counter[str] = field(default_factory=Counter)
    false: Counter[str] = field(default_factory=Counter)
    #: False escalations by what the agent was doing.
    false_by: dict[str, Counter[str]] = field(default_factory=dict)
    missed: Counter[str] = field(default_factory=Counter)
    missed_by: dict[str, Counter[str]] = field(default_factory=dict)


def _dicts(messages: list[Any]) -> list[dict[str, Any]]:
    return [{"role": m.role, "content": m.content} if isinstance(m, MessageInfo) else m for m in messages]


def litellm_rule() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch a price map
    from litellm.router_strategy.complexity_router.stall_detector import detect_stalled_task

    return detect_stalled_task


def measure(requests: int = 60_000, sessions: int = 2_000, seed: int = 7, strike_limit: int = 2,
            window: int = 6) -> Figures:
    """Each detector's verdict on every request of the simulate workload, against its labels."""
    litellm = litellm_rule()
    rules = RouteRules(stall_window=window)
    workload = Workload(sessions, requests, seed, agent_loops=True)
    ours: dict[int, tuple[str, ...]] = {}
    before: dict[int, tuple[tuple[str, ...], int]] = {}
    episodes: dict[tuple[int, int, str], dict[str, bool]] = {}
    f = Figures()
    f.false_by = {name: Counter() for name in DETECTORS}
    f.missed_by = {name: Counter() for name in DETECTORS}
    done = 0
    while done < requests:
        chunk = workload.chunk(2_000)
        done += len(chunk)
        for req in chunk:
            conv: Conversation = req.conversation
            if not req.repeat:
                history(conv, req)
            conv.pending = True
            conv.reply_bytes = req.output_tokens * 3
            messages = conv.history
            # session-engine: the request's tool window and the session's last hashes.
            h, repeats, errors = stall_reading(messages, window)
            route = Route(conv.session_id, req.model, req.tier, rules, request_hash=h, tool_repeats=repeats,
                          tool_errors=errors)
            recent = ours.get(conv.index, ())
            verdicts = {DETECTORS[0]: bool(stall_reason(route, recent, strike_limit))}
            ours[conv.index] = (*recent, h)[-HASH_WINDOW:]
            # LiteLLM: its detector with its defaults (6 calls, 3 repeats), on the same messages.
            verdicts[DETECTORS[1]] = litellm(_dicts(messages), window=6, repeat_threshold=strike_limit + 1)
            # Before: names-only hash, cumulative strikes, escalation once they reach the limit.
            old_recent, strikes = before.get(conv.index, ((), 0))
            stall = tool_error_run(messages) >= STALL_ERRORS
            new_recent, new_strikes = count_strikes(old_recent, strikes, request_hash(messages), stall)
            before[conv.index] = (new_recent, new_strikes)
            verdicts[DETECTORS[2]] = new_strikes > strikes and new_strikes >= strike_limit
            what = req.step.scenario if req.step is not None else "repeat" if req.repeat else "user turn"
            f.requests += 1
            if req.stalled:
                f.stall_requests += 1
                key = (conv.index, req.turn, what)
                seen = episodes.setdefault(key, dict.fromkeys(DETECTORS, False))
                for name, fired in verdicts.items():
                    seen[name] = seen[name] or fired
            for name, fired in verdicts.items():
                if fired:
                    f.fired[name] += 1
                    if not req.stalled:
                        f.false[name] += 1
                        f.false_by[name][what] += 1
    f.episodes = len(episodes)
    for (_, _, what), seen in episodes.items():
        for name, caught in seen.items():
            if not caught:
                f.missed[name] += 1
                f.missed_by[name][what] += 1
    return f


def table(f: Figures) -> str:
    lines = ["| detector | false escalations (requests) | missed stalls | stalls caught |",
             "|---|---|---|---|"]
    for name in DETECTORS:
        by = ", ".join(f"{what} {n}" for what, n in f.false_by[name].most_common()) or "none"
        missed = ", ".join(f"{what} {n}" for what, n in f.missed_by[name].most_common()) or "none"
        lines.append(f"| {name} | {f.false[name]:,} ({by}) | {f.missed[name]:,} ({missed}) | "
                     f"{f.episodes - f.missed[name]:,} of {f.episodes:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--strike-limit", type=int, default=2)
    parser.add_argument("--window", type=int, default=6)
    parser.add_argument("--sweep", action="store_true", help="session-engine's detector over other limits and windows")
    args = parser.parse_args()
    if args.sweep:
        print("| strike limit | window | false escalations | missed stalls |\n|---|---|---|---|")
        for limit in (1, 2, 3):
            for window in (3, 4, 6, 8):
                f = measure(args.requests, args.sessions, args.seed, limit, window)
                ours = DETECTORS[0]
                print(f"| {limit} | {window} | {f.false[ours]:,} | {f.missed[ours]:,} of {f.episodes:,} |")
        return
    f = measure(args.requests, args.sessions, args.seed, args.strike_limit, args.window)
    print(f"{f.requests:,} requests of the simulate workload (seed {args.seed}, {args.sessions:,} sessions), "
          f"{f.stall_requests:,} of them stalled, in {f.episodes:,} stalls; strike limit {args.strike_limit}, "
          f"window {args.window}; stalls by kind: {dict(STALLS)}\n")
    print(table(f))


if __name__ == "__main__":
    main()
