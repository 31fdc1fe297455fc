"""The engine's promises about one log, checked the way an operator would check them.

One function, ``check_promises``, used by ``session-engine simulate --check``
and by the promise state machine in the tests, so that the main job and the
tests hold the engine to the same list:

- **replay**: ``replay(log)`` rebuilds exactly the state the live store serves;
- **verify**: ``audit --verify`` proves the log (chain, seq, every value domain);
- **audit** and **report**: their spend totals equal the spend the callers were
  acknowledged, and so does the sum of the log's own ``cost.added`` records;
- **cap**: no capped session's settled spend ever passed its cap (every
  ``cost.added`` record's running total, over the whole history on disk).

Every check reads the log through the engine's own readers (the ones behind
``replay``, ``audit``, ``report`` and ``audit --verify``), never as raw JSON:
a reader that refuses what the writer wrote is a broken promise too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.entry import Entry
from events import EngineError
from events import records as records_

__all__ = ["Promise", "check_promises", "format_promises"]


@dataclass(frozen=True, slots=True)
class Promise:
    """One promise and whether the log kept it; ``detail`` says what was compared."""

    name: str
    held: bool
    detail: str


def _usd(micros: int) -> str:
    return f"${micros / 1_000_000:,.6f}"


def _first_difference(live: Mapping[str, Entry], rebuilt: Mapping[str, Entry]) -> str:
    for sid in sorted(set(live) | set(rebuilt)):
        a, b = live.get(sid), rebuilt.get(sid)
        if a != b:
            return f"session {sid[:40]!r}: live {a} / replayed {b}"
    return ""


def check_promises(log: str | Path, live: Mapping[str, Entry], acknowledged_micros: int, *,
                   cap_micros: int | None = None, capped: Callable[[str], bool] | None = None) -> list[Promise]:
    """Check every promise on ``log`` against what the callers saw.

    ``live`` is the state the live store serves (every session id read through
    ``get_session``), ``acknowledged_micros`` the spend the callers were told
    was recorded; ``cap_micros`` the budget cap of the sessions ``capped``
    says are capped (every session when ``capped`` is None).
    """
    from engine.log.replay import read_log, replay
    from engine.log.verify import verify
    from engine.tools.audit import lives
    from engine.tools.report import read_digest

    out: list[Promise] = []

    def check(name: str, run: Callable[[], tuple[bool, str]]) -> None:
        try:
            held, detail = run()
        except (EngineError, OSError) as exc:  # a reader that refuses the log breaks the promise
            held, detail = False, f"{type(exc).__name__}: {exc}"
        out.append(Promise(name, held, detail))

    def replayed() -> tuple[bool, str]:
        rebuilt = replay(log)
        diff = _first_difference(live, rebuilt)
        return not diff, diff or f"{len(rebuilt):,} sessions, replay == live"

    def verified() -> tuple[bool, str]:
        report = verify(log)
        if report.records == 0 and not live:
            return True, "no records yet: nothing to prove"
        if report.status == "verified":
            return True, f"{report.records:,} records in {report.files} file(s), chain verified"
        problem = report.problem
        where = f" at seq {problem.seq}: {problem.field} {problem.rule}" if problem is not None else ""
        return False, f"{report.status}{where}"

    # One pass over the history for the log's own sum, the audit's lifetimes and the cap.
    seen: dict[str, Any] = {"cost": 0, "worst": 0, "over": 0, "worst_sid": "", "read": False}

    def watched(records: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for r in records:
            if r.get("event") == records_.COST_ADDED:
                seen["cost"] += r["micros"]
                if cap_micros is not None and (capped is None or capped(r["session_id"])):
                    total = r["session_cost_micros"]
                    seen["over"] += total > cap_micros
                    if total > seen["worst"]:
                        seen["worst"], seen["worst_sid"] = total, r["session_id"]
            yield r
        seen["read"] = True

    def audited() -> tuple[bool, str]:
        total = sum(life.cost_micros for life in lives(watched(read_log(log, history=True))))
        held = total == seen["cost"] == acknowledged_micros
        return held, f"audit {_usd(total)}, cost.added {_usd(seen['cost'])}, acknowledged {_usd(acknowledged_micros)}"

    def reported() -> tuple[bool, str]:
        digest = read_digest(log)
        by_model = sum(digest.model_spend.values())
        held = digest.spend_micros == acknowledged_micros == by_model
        return held, (f"report {_usd(digest.spend_micros)} (by model {_usd(by_model)}), "
                      f"acknowledged {_usd(acknowledged_micros)}")

    def within_cap() -> tuple[bool, str]:
        if cap_micros is None:
            return True, "no cap"
        if not seen["read"]:  # the audit's pass stopped early: an unread cost may be over the cap
            return False, "the history could not be read to its end (the audit's line says why)"
        detail = f"cap {_usd(cap_micros)}, costliest {_usd(seen['worst'])}"
        if seen["over"]:
            detail += f" ({seen['worst_sid'][:40]!r}; {seen['over']} settlements over the cap)"
        return not seen["over"], detail

    check("replay == live", replayed)
    check("audit --verify", verified)
    check("audit total == acknowledged", audited)
    check("report total == acknowledged", reported)
    check("no capped session over its cap", within_cap)  # after audited: its pass fills ``seen``
    return out


def format_promises(promises: list[Promise]) -> list[str]:
    """One line per promise, as ``simulate --check`` prints them."""
    return [f"{'held' if p.held else 'BROKEN'}  {p.name}: {p.detail}" for p in promises]
