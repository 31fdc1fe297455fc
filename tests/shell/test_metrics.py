"""Prometheus metrics: scraped in the text format, as Prometheus would read them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time
from prometheus_client.parser import text_string_to_metric_families

from engine import Config, SessionStore
from engine.metrics import Metrics
from events import Escalate

T0 = "2025-01-01 00:00:00"


@pytest.fixture
def observed() -> Iterator[Callable[..., tuple[SessionStore, Metrics]]]:
    """Stores built with a fresh Metrics observer; all closed afterwards."""
    stores: list[SessionStore] = []

    def make(**overrides: Any) -> tuple[SessionStore, Metrics]:
        settings: dict[str, Any] = {"enabled": True, "tick_ms": 0}
        settings.update(overrides)
        metrics = Metrics()
        store = SessionStore(Config(**settings), observer=metrics)
        stores.append(store)
        return store, metrics

    yield make
    for store in stores:
        store.close()


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the /metrics body into {(sample name, sorted labels): value}."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_scrape_counts_sessions_events_escalations_and_cost(observed):
    store, metrics = observed(auto_escalate=True)
    store.set_session("a", "openai/gpt-4o-mini", "MEDIUM")
    store.set_session("b", "openai/gpt-4o-mini", "SIMPLE")
    for _ in range(3):
        store.record_request_hash("a", "same")
    store.add_session_cost("a", 1_250_000)
    store.add_session_cost("b", 250_000)
    store.ask(Escalate("b", reason="user_asked"))

    s = scrape(metrics)
    assert s[("session_engine_live_sessions", ())] == 2
    assert s[("session_engine_events_total", (("event", "session.created"),))] == 2
    assert s[("session_engine_events_total", (("event", "hash.recorded"),))] == 3
    assert s[("session_engine_escalations_total", (("reason", "strikes"),))] == 1
    assert s[("session_engine_escalations_total", (("reason", "user_asked"),))] == 1
    assert s[("session_engine_cost_usd_total", ())] == pytest.approx(1.5)


def test_expiry_eviction_and_clear_end_live_sessions_by_reason(observed):
    with freeze_time(T0) as clock:
        store, metrics = observed(timeout_ms=1000, max_sessions=2)
        store.set_session("old", "m")
        clock.tick(2)
        assert store.tick() == 1  # "old" idled past its timeout
        store.set_session("x", "m")
        clock.tick(0.01)
        store.set_session("y", "m")
        clock.tick(0.01)
        store.set_session("z", "m")  # over capacity: the least recently used one, "x", goes
        assert store.get_session("x") is None  # queued behind the eviction of "x", so it has been applied
        store.clear_session("y")
        live = store.get_stats().count

    s = scrape(metrics)
    assert s[("session_engine_expiries_total", (("reason", "idle"),))] == 1
    assert s[("session_engine_evictions_total", (("reason", "capacity"),))] == 1
    assert s[("session_engine_sessions_ended_total", (("how", "cleared"),))] == 1
    assert s[("session_engine_live_sessions", ())] == live == 1


def test_per_shard_mailbox_depth_and_apply_latency_are_exposed(observed):
    store, metrics = observed(shards=2)
    before = sum(metrics.value("session_engine_applied_events_total", {"shard": k}) for k in ("0", "1"))
    for i in range(40):
        store.set_session(f"s{i}", "m")
    s = scrape(metrics)
    for shard in ("0", "1"):
        assert s[("session_engine_mailbox_depth", (("shard", shard),))] == 0  # drained
        assert s[("session_engine_event_apply_seconds_count", (("shard", shard),))] > 0
    applied = sum(s[("session_engine_applied_events_total", (("shard", shard),))] for shard in ("0", "1"))
    assert applied - before == 40
    assert s[("session_engine_batch_events_count", ())] > 0


def test_log_write_latency_is_timed_when_the_audit_log_is_on(observed, tmp_path: Path):
    store, metrics = observed(event_log=str(tmp_path / "audit.jsonl"), fsync="always")
    store.set_session("s", "m")
    store.touch_session("s")
    s = scrape(metrics)
    assert s[("session_engine_log_write_seconds_count", ())] >= 2
    assert s[("session_engine_log_write_seconds_sum", ())] > 0
    assert (tmp_path / "audit.jsonl").read_bytes().count(b"\n") == 2  # records still reach the log


def test_decisions_by_kind_and_unavailable_requests_are_counted(observed):
    from events import Decision

    store, metrics = observed()
    store.set_session("s", "m")
    store.ask(Decision("s", kind="retain", model="m"))
    store.ask(Decision("s", kind="escalate", model="m2"))
    metrics.count_unavailable("deadline")
    s = scrape(metrics)
    assert s[("session_engine_decisions_total", (("kind", "retain"),))] == 1
    assert s[("session_engine_decisions_total", (("kind", "escalate"),))] == 1
    assert s[("session_engine_policy_unavailable_total", (("reason", "deadline"),))] == 1


def test_two_observers_do_not_share_metrics(observed):
    first, m1 = observed()
    _, m2 = observed()
    first.set_session("s", "m")
    assert m1.value("session_engine_live_sessions") == 1
    assert m2.value("session_engine_live_sessions") == 0


def test_unbounded_label_values_collapse_into_other(observed):
    store, metrics = observed()
    for i in range(40):
        store.set_session(f"s{i}", "m")
        store.ask(Escalate(f"s{i}", reason=f"r{i}"))
    total = sum(v for (name, _), v in scrape(metrics).items() if name == "session_engine_escalations_total")
    assert total == 40
    assert metrics.value("session_engine_escalations_total", {"reason": "other"}) == 8


def test_a_failing_observer_never_fails_the_shard(observed):
    store, metrics = observed()

    def broken(*_args: Any) -> None:
        raise RuntimeError("bug in metrics")

    metrics._on_batch = broken  # type: ignore[method-assign]
    store.set_session("s", "m")
    assert store.get_session("s").model == "m"
    assert metrics.value("session_engine_observer_errors_total") >= 1


def test_sessions_restored_from_the_log_count_as_live(tmp_path: Path):
    log = str(tmp_path / "audit.jsonl")
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log)) as store:
        store.set_session("a", "m")
        store.set_session("b", "m")
    metrics = Metrics()
    with SessionStore(Config(enabled=True, tick_ms=0, event_log=log), observer=metrics) as store:
        assert store.get_stats().count == 2  # restored from the log before serving
        assert metrics.value("session_engine_live_sessions") == 2
        store.clear_session("a")
        assert metrics.value("session_engine_live_sessions") == 1


def test_log_latencies_and_out_of_batch_records_are_observed(observed, tmp_path: Path) -> None:
    from engine import InvalidEvent

    store, metrics = observed(event_log=str(tmp_path / "a.jsonl"), fsync="always")
    store.set_session("a", "m")
    store.add_session_cost("a", 5)
    with pytest.raises(InvalidEvent):
        store.add_session_cost("a", -5)
    assert metrics.value("session_engine_log_write_seconds_count") >= 2
    assert metrics.value("session_engine_log_sync_seconds_count") >= 1
    assert metrics.value("session_engine_events_total", {"event": "input.rejected"}) == 1
