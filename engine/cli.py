"""The command line: a thin layer over the library (every command is a Python function)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from events import EngineError

app = typer.Typer(
    name="session-engine",
    help="Per-session memory for LLM routers: simulate a router workload, audit and replay the log.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit, never a traceback."""
    typer.echo(f"session-engine: error: {message}", err=True)
    raise typer.Exit(code=2)


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
    shards: Annotated[int, typer.Option(min=1, max=256, help="Shard actors hosting the sessions.")] = 4,
    max_sessions: Annotated[int | None, typer.Option(
        min=1, help="Session capacity; least recently used sessions are evicted beyond it. Default: unbounded.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr (only when it is a terminal).")] = True,
) -> None:
    """Drive a realistic router workload through the engine and write its audit log.

    Zipf-skewed conversations: follow-ups, retries (3rd identical escalates), explicit and cache pins, cost, expiry.

    Runs on a simulated clock and ends with a summary table; docs/simulate.md describes the workload.
    """
    from engine._simulate import SimulationConfig, run_simulation

    cfg = SimulationConfig(sessions=sessions, requests=requests, concurrency=concurrency, seed=seed, log=log,
                           timeout_s=timeout_s, clock_speed=clock_speed, shards=shards, max_sessions=max_sessions)
    run_simulation(cfg, progress=progress)


def main() -> None:
    """Console entry point: library errors become one line on stderr."""
    try:
        app(standalone_mode=False)
    except typer.Exit as exc:
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
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        typer.echo(f"session-engine: error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
