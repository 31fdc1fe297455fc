"""``simulate --replicas N``: N router processes on one Redis started for the run give the counts one process gives."""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from engine.tools.simulate import SimulationConfig, run_simulation


def test_replicas_agree_with_one_process_for_the_same_seed(tmp_path: Path) -> None:
    settings = {"sessions": 80, "requests": 1_500, "concurrency": 2, "timeout_s": 30, "seed": 11,
                "workload": "seed"}  # the replicated run drives the seed workload
    single = run_simulation(SimulationConfig(**settings, log=tmp_path / "one.jsonl"),
                            out=Console(file=io.StringIO(), width=120))
    out = io.StringIO()
    replicated = run_simulation(SimulationConfig(**settings, replicas=2, log=tmp_path / "unused.jsonl"),
                                out=Console(file=out, width=160))
    varies = {"wall_s", "peak_threads", "expiries_by_clock"}  # timing, threads, which clock reaped first
    assert {k: v for k, v in asdict(replicated).items() if k not in varies} == \
        {k: v for k, v in asdict(single).items() if k not in varies}
    assert single.expiries > 0 and single.escalations > 0 and single.cache_pins > 0  # the run exercised them
    text = out.getvalue()
    assert "replay of the streams == state in Redis" in text and "NO" not in text
    assert not (tmp_path / "unused.jsonl").exists()  # the log is the streams
