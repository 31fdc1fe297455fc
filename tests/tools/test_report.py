"""`session-engine report`: the digest matches the log, the page renders in a real browser, errors are one line.

The log comes from the engine itself: a store plus the routing policy, under a
frozen clock, with decisions of several kinds, spend, a budget that refuses and
downgrades, three-strike escalations, an idle expiry and a session id reused.
The browser test opens the page in Debian's headless ``chromium`` with name
resolution disabled (so nothing can come from a CDN); it skips, saying why,
only where chromium is missing (``.ci/run`` installs it when it runs as root).
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from freezegun import freeze_time
from typer.testing import CliRunner

from engine import Config, SessionStore, Tier
from engine.cli import app
from engine.log.replay import read_log as stream_log
from engine.policy import BudgetExceeded, Options, Policy, Request
from engine.tools import report
from engine.tools.audit import lives
from tests.conftest import read_log

T0 = datetime(2025, 3, 1, 9, 0, 0, tzinfo=UTC)
MODELS = {Tier.SIMPLE: "openai/gpt-4o-mini", Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "anthropic/claude-sonnet",
          Tier.REASONING: "anthropic/claude-opus"}
TOP = 4


def session_engine() -> list[str]:
    script = Path(sys.executable).with_name("session-engine")
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine"]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The command in this process (fast: plotly is imported once); see ``run_script`` for the console script."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def run_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*session_engine(), *map(str, args)], capture_output=True, text=True, timeout=300)


def write_policy_log(path: Path) -> None:
    """Three hours of routing: 12 sessions, decisions of most kinds, spend, refusals, escalations, an expiry."""
    rng = random.Random(13)
    with freeze_time(T0) as clock:
        store = SessionStore(Config(enabled=True, tick_ms=0, event_log=str(path), timeout_ms=1_800_000))
        policy = Policy(store, MODELS, Options(max_cost_usd=0.15, deadline_s=5.0))
        tiers = (Tier.SIMPLE, Tier.MEDIUM, Tier.MEDIUM, Tier.COMPLEX)
        for step in range(240):
            clock.tick(timedelta(seconds=45))
            sid = f"conv-{rng.randrange(12)}"
            tier = tiers[rng.randrange(4)]
            # Every 9th request repeats the previous one three times: the third escalates.
            texts = ["stuck on the same bug"] * 3 if step % 9 == 0 else [f"question {step}"]
            for text in texts:
                request = Request(MODELS[tier], tier, sid, [{"role": "user", "content": text}], estimate_usd=0.02,
                                  tools=[{"name": "search"}] if step % 17 == 0 else ())
                try:
                    decision = policy.route(request)
                except BudgetExceeded:
                    continue
                policy.record_response(sid, cost_usd=round(rng.uniform(0.001, 0.03), 6), decision=decision)
            if step == 120:
                clock.tick(timedelta(minutes=31))
                store.tick()  # every session idles out; the next requests start second lifetimes
        store.close()


@pytest.fixture(scope="module")
def policy_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "audit.jsonl"
    write_policy_log(path)
    return path


@pytest.fixture(scope="module")
def page(policy_log: Path) -> Path:
    out = policy_log.with_name("report.html")
    done = run_cli("report", policy_log, "-o", out, "--top", str(TOP))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}:") and not done.stderr
    return out


# -- the digest ---------------------------------------------------------------------------------------

def test_digest_totals_equal_what_the_log_records(policy_log: Path) -> None:
    """Spend, decisions by kind, hashes, strikes and escalations: every figure is the log's own count."""
    records = read_log(policy_log)
    d = report.read_digest(policy_log, top=TOP)
    assert d.records == len(records)
    assert d.spend_micros == sum(r["micros"] for r in records if r["event"] == "cost.added") > 0
    kinds = Counter(r["kind"] for r in records if r["event"] == "decision.made")
    assert dict(d.decision_kinds) == dict(kinds)
    assert {"initialize", "retain", "upgrade", "bypass", "escalate", "refuse"} <= set(kinds)
    assert d.hashed == sum(r["event"] == "hash.recorded" for r in records)
    escalated = [r for r in records if r["event"] == "session.escalated"]
    assert d.escalations["strikes"] == len(escalated) > 0
    assert d.escalations["strikes"] <= d.strikes < d.hashed
    # The buckets partition the same totals.
    assert sum(b.spend_micros for b in d.buckets.values()) == d.spend_micros
    assert sum(sum(b.decisions.values()) for b in d.buckets.values()) == sum(kinds.values())
    assert sum(b.escalations for b in d.buckets.values()) == len(escalated)
    # Three hours do not fit 240 one-second buckets: they widened to a whole multiple.
    assert d.width_ms == 60_000 and len(d.buckets) <= report.MAX_BUCKETS
    served = Counter(r["model"] for r in records if r["event"] == "decision.made" and r["kind"] != "refuse")
    assert dict(d.served) == dict(served)
    assert sum(d.model_spend.values()) == d.spend_micros


def test_top_sessions_are_the_costliest_lifetimes_with_their_timelines(policy_log: Path) -> None:
    d = report.read_digest(policy_log, top=TOP)
    every = sorted(lives(stream_log(policy_log, history=True)), key=lambda life: -life.cost_micros)
    assert d.lifetimes == len(every) > 12  # the expiry ended every first lifetime
    assert [life.cost_micros for life in d.costliest()] == [life.cost_micros for life in every[:TOP]]
    assert [tl.life for tl in d.timelines] == d.costliest()
    for tl in d.timelines:
        life = tl.life
        assert tl.cost[-1][1] == life.cost_micros  # the timeline ends on the lifetime's total
        assert tl.decisions_seen == life.decision_count > 0
        assert tl.marks[0][1] == "session.created"
        assert all(life.started_at <= ts for ts, *_ in tl.decisions)
        if life.ended is not None:
            assert tl.marks[-1][1] == "session.expired" and tl.marks[-1][0] == life.ended["ts"]


def test_buckets_stay_bounded_and_keep_every_micro_over_a_month() -> None:
    d = report.Digest()
    start = 1_700_000_000_000
    total = 0
    for i in range(5_000):
        ts = start + i * 537_000  # a record every ~9 minutes for a month
        d.add({"seq": i + 1, "ts": ts, "event": "cost.added", "session_id": f"s{i % 7}", "micros": i,
               "session_cost_micros": 0})
        total += i
    assert len(d.buckets) <= report.MAX_BUCKETS
    assert d.width_ms in report.BUCKET_WIDTHS_MS and d.width_ms > 3_600_000
    assert sum(b.spend_micros for b in d.buckets.values()) == total == d.spend_micros


def test_model_labels_and_top_heap_and_timelines_are_bounded() -> None:
    d = report.Digest(top_n=3)
    for i in range(report.MAX_LABELS + 25):
        d.add({"seq": i + 1, "ts": 1000 + i, "event": "decision.made", "session_id": f"s{i}", "kind": "initialize",
               "model": f"vendor/model-{i}"})
    assert len(d.served) == report.MAX_LABELS + 1 and d.served["other"] == 25
    for life in lives([{"seq": i + 1, "ts": i, "event": "session.created", "session_id": f"s{i}",
                        "session_cost_micros": i * 10, "created_at": i} for i in range(50)]):
        d.add_life(life)
    assert [life.cost_micros for life in d.costliest()] == [490, 480, 470] and len(d.top) == 3
    points: list[int] = []
    for i in range(10_000):
        report._thin(points, i, report.MAX_POINTS)
    assert len(points) < report.MAX_POINTS and points[0] == 0 and points[-1] == 9_999


# -- the page in a real browser --------------------------------------------------------------------------

def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium when it runs as root)")
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: no CDN could answer
         "--virtual-time-budget=15000", *args],
        capture_output=True, text=True, timeout=240)


def test_page_is_one_offline_file(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", text), "the page loads nothing from outside"
    assert "Plotly.newPlot" in text and len(text) > 3_000_000  # plotly.js itself is inlined
    assert "stuck on the same bug" not in text and "question 1" not in text  # never any request content


@pytest.fixture(scope="module")
def browser(page: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One chromium run: the DOM after every script ran, and a screenshot of the top of the page."""
    tmp = tmp_path_factory.mktemp("browser")
    shot = tmp / "shot.png"
    done = chromium("--window-size=1000,900", f"--screenshot={shot}", "--dump-dom", page.as_uri(),
                    profile=tmp / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, shot


def test_every_chart_renders_in_headless_chromium_without_script_errors(browser: tuple[str, Path]) -> None:
    dom, _ = browser
    root = re.search(r"<html[^>]*>", dom)
    assert root is not None
    assert "data-report-errors" not in root.group(0), root.group(0)
    charts = re.findall(r'<div class="chart[^"]*" id="(chart-[^"]+)"', dom)
    assert charts[:5] == ["chart-spend", "chart-decisions", "chart-mix", "chart-funnel", "chart-top"]
    assert len(charts) == 5 + TOP
    assert f'data-report-ready="{len(charts)}"' in root.group(0)
    pieces = re.split(r'<div class="chart', dom)[1:]
    for ident, piece in zip(charts, pieces, strict=True):
        assert "js-plotly-plot" in piece.split(">", 1)[0], f"{ident} was not plotted"
        assert 'class="main-svg"' in piece, f"{ident} has no drawn plot"
        drawn = len(re.findall(r'class="(?:point|trace [^"]*|slice|surface)"', piece))
        assert drawn > 0, f"{ident} draws no data"


def test_screenshot_of_the_page_is_not_blank(browser: tuple[str, Path]) -> None:
    _, shot = browser
    assert shot.exists()
    width, height, pixels = png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 900)
    colours = Counter(pixels)
    _, most = colours.most_common(1)[0]
    assert len(colours) > 50, "a handful of colours: nothing was drawn"
    assert 1 - most / len(pixels) > 0.05, "almost every pixel is the background"
    mean = sum(sum(p) for p in pixels) / len(pixels)
    variance = sum((sum(p) - mean) ** 2 for p in pixels) / len(pixels)
    assert variance > 1_000


def png_pixels(data: bytes) -> tuple[int, int, list[tuple[int, ...]]]:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG (what chromium writes) into its pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
    assert depth == 8 and interlace == 0 and colour in (2, 6), (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    prev = bytearray(stride)
    pixels: list[tuple[int, ...]] = []
    for y in range(height):
        start = y * (stride + 1)
        kind_byte, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if kind_byte == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind_byte == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev, strict=True))
        elif kind_byte == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind_byte == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels.extend(tuple(line[i:i + 3]) for i in range(0, stride, bpp))
        prev = line
    return width, height, pixels


# -- other logs and errors ---------------------------------------------------------------------------------

def test_a_log_without_decisions_still_gets_every_chart(make_store, tmp_path: Path) -> None:
    """A seed-API log (no routing policy, so no decision.made records): the model mix comes from the pins."""
    log, out = tmp_path / "seed.jsonl", tmp_path / "seed.html"
    with freeze_time(T0) as clock:
        store = make_store(event_log=str(log), auto_escalate=True)
        for i in range(3):
            store.set_session(f"s{i}", MODELS[Tier.MEDIUM] if i else MODELS[Tier.SIMPLE], "MEDIUM")
            store.add_session_cost(f"s{i}", 1_000 * (i + 1))
        for _ in range(3):
            clock.tick(timedelta(seconds=2))
            store.record_request_hash("s0", "same")
        store.close()
    done = run_cli("report", log, "-o", out, "--top", "2")
    assert done.returncode == 0, done.stderr
    text = out.read_text(encoding="utf-8")
    assert "no decision.made records: this log was written without the routing policy" in text
    assert "requests by pinned model" in text
    assert len(re.findall(r'<div class="chart"', text)) == 5 + 2
    d = report.read_digest(log)
    assert (d.spend_micros, d.decisions, d.strikes, dict(d.escalations)) == (6_000, 0, 2, {"strikes": 1})
    assert dict(d.pinned) == {MODELS[Tier.SIMPLE]: 1, MODELS[Tier.MEDIUM]: 2}
    assert dict(d.model_spend) == {MODELS[Tier.SIMPLE]: 1_000, MODELS[Tier.MEDIUM]: 5_000}


@pytest.mark.parametrize(("setup", "message"), [
    (lambda p: None, "no such file or directory"),
    (lambda p: p.mkdir(), "a directory without log segments"),
    (lambda p: p.write_text(""), "no records (an empty file)"),
    (lambda p: p.write_text('{"seq": 1, "ts": 1, "event": "session.touched", "session_id": "a"}\nnot json\n'
                            '{"seq": 3, "ts": 1, "event": "session.touched", "session_id": "a"}\n'), "line 2"),
])
def test_a_bad_log_is_one_line_on_stderr(tmp_path: Path, setup, message: str) -> None:
    log = tmp_path / "log.jsonl"
    setup(log)
    done = run_cli("report", log, "-o", tmp_path / "out.html")
    assert done.returncode != 0 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("session-engine: error:"), done.stderr
    assert message in done.stderr
    assert not (tmp_path / "out.html").exists()


def test_an_unwritable_output_is_one_line_on_stderr(tmp_path: Path) -> None:
    known = Path(__file__).resolve().parents[1] / "golden" / "known.jsonl"
    done = run_script("report", known, "-o", tmp_path / "no-such-dir" / "out.html")
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "no-such-dir" in done.stderr and "Traceback" not in done.stderr


def test_help_lists_the_report_command() -> None:
    done = run_script("--help")
    assert re.search(r"report\s+One self-contained HTML report", done.stdout), done.stdout


def test_a_segment_directory_with_its_oldest_history_deleted_still_reports(make_store, tmp_path: Path) -> None:
    """Lifetimes that began in deleted history start from the snapshot at the head of the oldest segment left."""
    log = tmp_path / "segments"
    log.mkdir()
    with freeze_time(T0) as clock:
        store = make_store(event_log=log, segment_bytes=4096)
        policy = Policy(store, MODELS, Options(deadline_s=5.0))
        for i in range(120):
            clock.tick(timedelta(seconds=30))
            sid = f"s{i % 6}"
            decision = policy.route(Request(MODELS[Tier.MEDIUM], Tier.MEDIUM, sid,
                                            [{"role": "user", "content": f"turn {i}"}]))
            policy.record_response(sid, micros=100 + i, decision=decision)
        store.close()
    segments = sorted(log.glob("*.jsonl"))
    assert len(segments) > 4
    whole = report.read_digest(log, top=3)
    # The three oldest segments: every session began in them (the hash chain's seals make segments fill sooner,
    # and routed turns log their inputs with each decision).
    for segment in segments[:3]:
        segment.unlink()
    rest = report.read_digest(log, top=3)
    assert rest.records < whole.records and rest.spend_micros < whole.spend_micros
    assert [life.origin for life in rest.costliest()] == ["snapshot"] * 3
    for tl in rest.timelines:  # each starts at the snapshot's total and ends on its lifetime's total
        assert tl.marks[0][1] == "log.snapshot" and tl.cost[0][1] > 0
        assert tl.cost[-1][1] == tl.life.cost_micros
    assert [life.cost_micros for life in rest.costliest()] == [life.cost_micros for life in whole.costliest()]
    out = tmp_path / "segments.html"
    done = run_cli("report", log, "-o", out, "--top", "3")
    assert done.returncode == 0, done.stderr
    assert len(re.findall(r'<div class="chart"', out.read_text(encoding="utf-8"))) == 5 + 3


def test_session_ids_and_models_cannot_inject_markup(make_store, tmp_path: Path) -> None:
    log, out = tmp_path / "odd.jsonl", tmp_path / "odd.html"
    odd = "<img src=x onerror=alert(1)></script>"
    with freeze_time(T0):
        store = make_store(event_log=str(log))
        store.set_session(odd, "vendor/<b>model</b>", "MEDIUM")
        store.add_session_cost(odd, 5)
        store.close()
    done = run_cli("report", log, "-o", out)
    assert done.returncode == 0, done.stderr
    text = out.read_text(encoding="utf-8")
    assert "<img src=x" not in text and "</script>\"" not in text and "<b>model" not in text
    # The id is there as text: HTML-escaped for plotly's labels, then JSON-escaped inside the <script> block.
    assert "\\u0026lt;img src=x onerror=alert(1)\\u0026gt;" in text
