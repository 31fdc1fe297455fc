"""docs/grafana-dashboard.json queries only metrics the engine exports.

Every PromQL expression (panel targets and template-variable queries) is
parsed for the metric names it selects; each must be a name that a scrape of
``engine.metrics.Metrics``' registry shows, counting the ``_total``,
``_bucket``, ``_sum`` and ``_count`` series of its counters and histograms.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from freezegun import freeze_time

from engine.metrics import Metrics
from engine.policy import Options, Policy, Request
from events import Tier

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
#: PromQL words that are not metric names (operators and modifiers; functions are dropped by their "(").
KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                      "offset", "inf", "nan", "Inf", "NaN"})
#: Grafana variables the dashboard may use.
VARIABLES = frozenset({"$job", "$instance", "$__rate_interval", "${datasource}"})


def load() -> dict[str, Any]:
    return orjson.loads(DASHBOARD.read_bytes())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", ()))  # panels inside a collapsed row
    return out


def expressions(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in panels(dashboard) for target in panel.get("targets", ())]
    for variable in dashboard.get("templating", {}).get("list", ()):
        if variable.get("type") == "query":
            query = variable["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values(...)`` query) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings: label values, regexes
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # range and subquery selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)  # label lists
    text = re.sub(r"\blabel_values\s*\(([^,()]*),[^()]*\)", r"(\1)", text)  # Grafana: label_values(metric, label)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or match.group(0) in KEYWORDS:
            continue  # a function or an aggregation, or an operator word
        names.add(match.group(0))
    return names


def exported_names() -> tuple[set[str], int]:
    """Every series name a scrape of the engine's registry can show, after real traffic (and the decisions seen)."""
    metrics = Metrics()
    from engine import Config, SessionStore

    with freeze_time("2025-03-01 12:00:00"):
        store = SessionStore(Config(enabled=True, tick_ms=0, auto_escalate=True), observer=metrics)
        try:
            policy = Policy(store, {Tier.MEDIUM: "openai/gpt-4o", Tier.COMPLEX: "openai/o3"}, Options(deadline_s=5.0))
            for _ in range(3):
                policy.route(Request("openai/gpt-4o", Tier.MEDIUM, "s", [{"role": "user", "content": "again"}]))
            policy.record_cost("s", 0.25)
            store.clear_session("s")
        finally:
            store.close()
    body = metrics.render()[0].decode()
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.match(r"[\w:]+", line).group(0))
    return names, int(metrics.value("session_engine_decisions_total", {"kind": "escalate"}))


def test_metric_name_parser_finds_selectors_not_functions_labels_or_variables() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, shard) (rate(a_bucket{job=~"$job", x="b_total"}[$__rate_interval])))'
            ' / clamp_min(sum without (instance) (c_total offset 5m), 1e-9) > bool 2 and on (job) d')
    assert metric_names(expr) == {"a_bucket", "c_total", "d"}
    assert metric_names('label_values(session_engine_live_sessions{job=~"$job"}, instance)') == {
        "session_engine_live_sessions"}


def test_every_dashboard_query_names_only_metrics_the_engine_exports() -> None:
    exported, escalations = exported_names()
    assert escalations == 1  # the scrape saw real traffic: the third identical request escalated
    assert {"session_engine_decisions_total", "session_engine_event_apply_seconds_bucket",
            "session_engine_cost_usd_total"} <= exported
    exprs = expressions(load())
    assert len(exprs) >= 20
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which engine.metrics does not export"
        used |= names
    assert all(name.startswith("session_engine_") for name in used)


def test_dashboard_is_well_formed_for_grafana() -> None:
    dashboard = load()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs))
    for expr in expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
        assert set(re.findall(r"\$\{?\w+\}?", expr)) <= VARIABLES, expr


@pytest.mark.parametrize("name", ["live_sessions", "decisions_total", "cost_usd_total", "escalations_total"])
def test_the_headline_metrics_are_on_the_dashboard(name: str) -> None:
    assert any(f"session_engine_{name}" in metric_names(expr) for expr in expressions(load()))
