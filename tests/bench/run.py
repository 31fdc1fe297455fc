"""`make bench`: run every workload, each in a fresh process, and write docs/performance.md and .json.

    .venv/bin/python tests/bench/run.py [--only throughput,latency] [--scale 0.1] [--no-write]

Each workload runs in its own interpreter so that memory and thread
readings start clean and one workload's garbage does not slow the next.
Every figure is a median of several repetitions, and every target that is
a ratio is measured side by side in the same process (see each workload).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT)]

#: name -> (module, function); run in this order.
WORKLOADS: dict[str, tuple[str, str]] = {
    "throughput": ("w_core", "throughput"),  # workloads 1 and 2
    "latency": ("w_core", "ask_latency"),  # 3
    "memory": ("w_scale", "memory"),  # 4
    "expiry": ("w_scale", "mass_expiry"),  # 5
    "durability": ("w_log", "durability"),  # 6
    "recovery": ("w_log", "recovery"),  # 7
    "asyncio": ("w_core", "asyncio_awaits"),  # 8
    "chain": ("w_chain", "chain"),  # 9
    "route": ("w_route", "route"),  # 10
    "tenancy": ("w_tenancy", "tenancy"),  # the per-tenant limits' cost (docs/identity.md)
    "profile": ("w_profile", "profile"),
    "report": ("w_report", "report"),
    "deadline": ("w_deadline", "route_latency"),  # the default Options.deadline_s
    "redis": ("w_redis", "redis"),
    "backtest": ("w_backtest", "backtest"),
}


def child(name: str, scale: float, out: Path) -> None:
    import importlib

    module, function = WORKLOADS[name]
    started = time.perf_counter()
    results = getattr(importlib.import_module(module), function)(scale)
    for result in results:
        result["seconds"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(results))


def run_one(name: str, scale: float) -> list[dict[str, Any]]:
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"session-engine-bench-{os.getpid()}-{name}.json"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--scale", str(scale), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stderr or proc.stdout or "no output").strip().splitlines()
        error = lines[-1] if lines else f"exit status {proc.returncode}"
        print(f"  {name}: FAILED after {elapsed:.0f} s: {error}", file=sys.stderr)
        return [{"id": name, "title": name, "error": error, "rows": []}]
    results = json.loads(out.read_text())
    out.unlink()
    print(f"  {name}: {elapsed:.0f} s", file=sys.stderr)
    return results


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 0
    versions = {}
    for package in ("pykka", "orjson", "structlog"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = "?"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": round(mem / 2**30, 1),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "packages": versions,
        "commit": commit,
    }


def fmt(value: Any, unit: str) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if unit in ("ms", "µs", "x", "s"):
        return f"{value:,.3f}" if abs(value) < 1 else f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def render(meta: dict[str, Any], results: list[dict[str, Any]], scale: float, total_s: float) -> str:
    notes = (HERE / "notes.md").read_text() if (HERE / "notes.md").exists() else ""
    out = ["# Performance", "",
           "Measured by `make bench` (tests/bench/run.py), which rewrites this file and "
           "[performance.json](performance.json). Every figure is the median of several repetitions, "
           "and every ratio is measured side by side in the same run, because these machines are "
           "shared and noisy: absolute numbers move from run to run, the ratios much less.", "",
           "## Machine", "",
           f"- Date: {meta['date']} (commit {meta['commit']})",
           f"- Python: {meta['python']}; pykka {meta['packages']['pykka']}, orjson {meta['packages']['orjson']}, "
           f"structlog {meta['packages']['structlog']}",
           f"- CPU: {meta['cpu']}, {meta['cores']} cores ({meta['affinity']} usable), "
           f"{meta['memory_gb']} GB RAM; {meta['platform']}",
           f"- Load average when the run started: {', '.join(f'{x:.2f}' for x in meta['load_average'] or [])}",
           f"- Whole run: {total_s:.0f} s" + ("" if scale == 1 else f" at --scale {scale} (reduced sizes)"), "",
           "## Targets", "", "| # | Target | Measured | Met |", "|---|---|---|---|"]
    for result in results:
        for row in result.get("rows", []):
            if row.get("target"):
                met = {True: "yes", False: "**no**", None: "-"}[row.get("met")]
                out.append(f"| {result['id']} | {row['metric']}: {row['target']} | "
                           f"{fmt(row['value'], row['unit'])} {row['unit']} | {met} |")
    out.append("")
    for result in results:
        out += [f"## {result['id']}. {result['title']}" if isinstance(result["id"], int)
                else f"## {result['title']}", ""]
        if result.get("error"):
            out += [f"Not measured: the workload failed ({result['error']}).", ""]
            continue
        out += [result.get("setup", "") + ".", "", "| Metric | Measured | Target |", "|---|---|---|"]
        for row in result["rows"]:
            target = row.get("target") or ""
            if target:
                target += " (met)" if row.get("met") else " (**missed**)"
            out.append(f"| {row['metric']} | {fmt(row['value'], row['unit'])} {row['unit']} | {target} |")
        out.append("")
        for key, label in (("caller_top", "Caller thread"), ("shard_top", "Shard threads")):
            if key in result:
                out += [f"{label}, by self time (µs per event under the profiler):", "",
                        "| Function | Calls | Self µs/event | Cumulative µs/event | Share of thread |",
                        "|---|---|---|---|---|"]
                for row in result[key]:
                    out.append(f"| `{row['function']}` | {row['calls']:,} | {row['self_us_per_event']:.2f} | "
                               f"{row['cum_us_per_event']:.2f} | {row['self_share']:.0%} |")
                out.append("")
    if notes:
        out += [notes.strip(), ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated workloads: " + ", ".join(WORKLOADS))
    parser.add_argument("--scale", type=float, default=1.0, help="size factor (1 = the documented sizes)")
    parser.add_argument("--no-write", action="store_true", help="print JSON instead of writing docs/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.scale, args.out)
        return
    names = args.only.split(",") if args.only else list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(unknown)}")
    meta = machine()
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for name in names:
        results += run_one(name, args.scale)
    total = time.perf_counter() - started
    doc = {"machine": meta, "scale": args.scale, "seconds": round(total, 1), "workloads": results}
    if args.no_write:
        print(json.dumps(doc, indent=2))
        return
    docs = ROOT / "docs"
    (docs / "performance.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (docs / "performance.md").write_text(render(meta, results, args.scale, total))
    print(f"wrote docs/performance.md and docs/performance.json ({total:.0f} s)", file=sys.stderr)
    missed = [f"{r['id']}: {row['metric']}" for r in results for row in r.get("rows", []) if row.get("met") is False]
    failed = [str(r["id"]) for r in results if r.get("error")]
    for line in missed:
        print(f"  target missed: {line}", file=sys.stderr)
    if failed:
        print(f"  workloads that failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
