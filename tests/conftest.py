"""Shared fixtures: every store a test opens is closed, and no thread outlives its test."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from engine import Config, SessionStore
from tests.support.redis_servers import redis_cluster, redis_server  # noqa: F401  (fixtures)

#: The operator secret that keys tenants (docs/identity.md), set as a deployment sets it; the tests of a
#: missing or weak secret remove it with monkeypatch.
os.environ.setdefault("SESSION_ENGINE_SECRET", "tests-only-secret-4f9c2a7e1b3d5f60")


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[..., SessionStore]]:
    """Build enabled stores (background clock off unless asked); all are closed afterwards."""
    stores: list[SessionStore] = []

    def make(**overrides: Any) -> SessionStore:
        settings: dict[str, Any] = {"enabled": True, "tick_ms": 0}
        settings.update(overrides)
        store = SessionStore(Config(**settings))
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


#: The small policy simulation whose log the backtest tests read (tests/tools/test_backtest*.py).
SIM_SETTINGS = {"sessions": 40, "requests": 1_500, "concurrency": 3, "shards": 2, "timeout_s": 120,
                "clock_speed": 0.5, "max_cost_usd": 0.6}


@pytest.fixture(scope="module")
def sim_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small policy simulation, shared by a module's tests that only read its log."""
    import io

    from rich.console import Console

    from engine.tools.simulate import SimulationConfig, run_simulation

    log = tmp_path_factory.mktemp("sim") / "audit.jsonl"
    run_simulation(SimulationConfig(log=log, **SIM_SETTINGS), out=Console(file=io.StringIO()))  # type: ignore[arg-type]
    return log


def read_log(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


@pytest.fixture(autouse=True)
def no_thread_leaks() -> Iterator[None]:
    before = {t.ident for t in threading.enumerate()}
    yield
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not leaked, f"threads leaked by the test: {[t.name for t in leaked]}"
