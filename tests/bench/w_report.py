"""Workload: `session-engine report` on the 1M-record log, side by side with `replay` of the same log."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from common import median
from w_log import _row, synthetic_log

from engine import replay


def report(scale: float) -> list[dict[str, Any]]:
    """Both passes of the report (digest, then the costliest timelines) and the page, against engine.replay."""
    from engine.tools.report import MAX_BUCKETS, read_digest
    from engine.tools.report_html import render_html

    n = max(20_000, int(1_000_000 * scale))
    sessions = max(1_000, n // 20)
    reps = 3 if scale >= 1 else 1
    out: dict[str, list[float]] = {"replay": [], "digest": [], "render": []}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "audit.jsonl"
        synthetic_log(log, n, sessions)
        size_mb = log.stat().st_size / 1e6
        page_mb = 0.0
        for _ in range(reps):  # interleaved, so that both see the same machine load
            started = time.perf_counter()
            replay(log)
            out["replay"].append(time.perf_counter() - started)
            started = time.perf_counter()
            d = read_digest(log, top=10)
            out["digest"].append(time.perf_counter() - started)
            started = time.perf_counter()
            page_mb = len(render_html(d, source=str(log)).encode()) / 1e6
            out["render"].append(time.perf_counter() - started)
    replay_rate, report_rate = n / median(out["replay"]), n / median(out["digest"])
    return [{
        "id": "report", "title": "Visual report (session-engine report)",
        "setup": f"the recovery workload's synthetic log of {n:,} records ({size_mb:.0f} MB, {sessions:,} session "
                 f"ids); engine.replay(path), then the report's two streamed passes (engine.tools.report.read_digest: "
                 f"aggregates and top-10 lifetimes, then their timelines) and the HTML page with plotly.js inlined; "
                 f"{reps} repetitions, interleaved",
        "rows": [
            _row("report, both passes", report_rate, "records/s"),
            _row("report speed / replay speed (same log, same run)", report_rate / replay_rate, "x"),
            _row("replay", replay_rate, "records/s"),
            _row("report, both passes: time", median(out["digest"]), "s"),
            _row("render the page", median(out["render"]), "s"),
            _row("page size", page_mb, "MB"),
            _row("time buckets (bounded)", len(d.buckets), "buckets", f"≤ {MAX_BUCKETS}",
                 len(d.buckets) <= MAX_BUCKETS),
        ],
        "raw": {k: [round(x, 4) for x in v] for k, v in out.items()},
    }]
