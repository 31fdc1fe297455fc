"""The report page: plotly figures of a ``Digest``, in one HTML file that opens offline.

plotly.js is inlined (``plotly.offline.get_plotlyjs()``, ~4.8 MB), never loaded
from a CDN. The figures travel as one JSON block that a short script hands to
``Plotly.newPlot``; once every chart has rendered it sets
``data-report-ready="<number of charts>"`` on ``<html>``, and any script
error lands in ``data-report-errors`` (the browser test reads both).
"""

from __future__ import annotations

import html
from datetime import UTC, datetime
from typing import Any

from engine.core.kinds import Kind
from engine.tools.audit import fmt_ts, fmt_usd
from engine.tools.report import LEDGER_MARK, Digest, Timeline
from events import EngineError
from events import records as record_names

__all__ = ["render_html", "require_plotly"]

#: One colour per decision kind, the same on every chart.
KIND_COLOURS = {
    Kind.INITIALIZE: "#1f77b4", Kind.RETAIN: "#2ca02c", Kind.UPGRADE: "#ff7f0e", Kind.BYPASS: "#9edae5",
    Kind.ESCALATE: "#d62728", Kind.SWITCH: "#9467bd", Kind.REFUSE: "#222222", Kind.UNAVAILABLE: "#7f7f7f",
}
MARK_SYMBOLS = {
    record_names.SESSION_CREATED: ("circle", "#1f77b4", "created"), record_names.SESSION_UPDATED: ("diamond",
                                                                                                   "#ff7f0e",
                                                                                                   "model changed"),
    record_names.SESSION_ESCALATED: ("triangle-up", "#d62728", "escalated"), record_names.STICKY_PINNED: ("star",
                                                                                                          "#8c564b",
                                                                                                          "cache pin"),
    record_names.SESSION_EXPIRED: ("x", "#444444", "ended"), record_names.SESSION_CLEARED: ("x", "#444444", "ended"),
    record_names.SESSION_EVICTED: ("x", "#444444", "ended"), record_names.LOG_SNAPSHOT: ("square-open", "#7f7f7f",
                                                                                         "from a snapshot"),
    LEDGER_MARK: ("x-open", "#444444", "pin expired, budget ledger continued"),
}
_CONFIG = {"displaylogo": False, "responsive": True}


def require_plotly() -> None:
    """Fail with one clear line when the ``report`` extra is not installed."""
    try:
        import plotly  # noqa: F401
    except ImportError:
        raise EngineError("the report needs plotly: pip install 'session-engine[report]'") from None


def _when(ts: int) -> str:
    """Unix ms as the date text plotly reads as a time axis (UTC)."""
    return datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _width(ms: int) -> str:
    for unit, size in (("week", 604_800_000), ("day", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size} {unit}"
    return f"{ms} ms"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    layout: dict[str, Any] = {"title": {"text": html.escape(title)}, "template": "plotly_white", "height": 380,
                              "margin": {"l": 60, "r": 30, "t": 50, "b": 50}}
    layout.update(extra)
    return layout


def _empty(fig: Any, text: str) -> None:
    fig.add_annotation(text=html.escape(text), showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                       font={"size": 14, "color": "#666"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)


def _spend(d: Digest) -> Any:
    import plotly.graph_objects as go

    keys = sorted(d.buckets)
    x = [_when(k * d.width_ms) for k in keys]
    per = [d.buckets[k].spend_micros / 1e6 for k in keys]
    total, running = [], 0.0
    for value in per:
        running += value
        total.append(running)
    fig = go.Figure(layout=_layout(f"Spend over time (USD per {_width(d.width_ms)}, UTC)",
                                   yaxis={"title": {"text": "USD per bucket"}},
                                   yaxis2={"title": {"text": "cumulative USD"}, "overlaying": "y", "side": "right",
                                           "rangemode": "tozero"},
                                   legend={"orientation": "h", "y": -0.2}))
    fig.add_bar(x=x, y=per, name=f"spend per {_width(d.width_ms)}", marker_color="#1f77b4")
    fig.add_scatter(x=x, y=total, name="cumulative", yaxis="y2", mode="lines", line={"shape": "hv", "color": "#d62728"})
    if not d.spend_micros:
        _empty(fig, "no cost.added records: no spend was recorded")
    return fig


def _decisions(d: Digest) -> Any:
    import plotly.graph_objects as go

    keys = sorted(d.buckets)
    x = [_when(k * d.width_ms) for k in keys]
    fig = go.Figure(layout=_layout(f"Decisions by kind (per {_width(d.width_ms)}, UTC)", barmode="stack",
                                   yaxis={"title": {"text": "decisions"}}))
    for kind in sorted(d.decision_kinds, key=lambda k: -d.decision_kinds[k]):
        fig.add_bar(x=x, y=[d.buckets[k].decisions.get(kind, 0) for k in keys], name=html.escape(kind),
                    marker_color=KIND_COLOURS.get(kind))
    if not d.decision_kinds:
        _empty(fig, "no decision.made records: this log was written without the routing policy")
    return fig


def _mix(d: Digest) -> Any:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    requests = d.served or d.pinned
    label = "requests by serving model" if d.served else "requests by pinned model (no decisions in the log)"
    fig = make_subplots(rows=1, cols=2, specs=[[{"type": "domain"}, {"type": "domain"}]],
                        subplot_titles=(label, "spend by model (USD)"))
    fig.update_layout(_layout("Model mix", height=440, margin={"l": 30, "r": 30, "t": 90, "b": 30}))
    for col, counts, scale in ((1, requests, 1), (2, d.model_spend, 1e6)):
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        fig.add_trace(go.Pie(labels=[html.escape(_short(m)) for m, _ in ranked], values=[n / scale for _, n in ranked],
                             hole=0.45, sort=False, textinfo="percent", textposition="inside"), row=1, col=col)
    if not requests and not d.model_spend:
        _empty(fig, "no requests or spend in the log")
    return fig


def _funnel(d: Digest) -> Any:
    import plotly.graph_objects as go

    by_strikes = d.escalations.get("strikes", 0)
    other = sum(d.escalations.values()) - by_strikes
    stages = ["requests hashed", "repeats (strikes)", "escalated by strikes"]
    fig = go.Figure(layout=_layout(f"Escalation funnel (other escalations: {other})"))
    fig.add_trace(go.Funnel(y=stages, x=[d.hashed, d.strikes, by_strikes], textinfo="value+percent initial",
                            marker={"color": ["#1f77b4", "#ff7f0e", "#d62728"]}))
    if not d.hashed:
        _empty(fig, "no hash.recorded records: no request was hashed")
    return fig


def _top(d: Digest) -> Any:
    import plotly.graph_objects as go

    lives = d.costliest()[::-1]  # costliest at the top of a horizontal bar chart
    fig = go.Figure(layout=_layout(f"Top {len(lives)} sessions by cost (USD)", height=max(300, 60 + 32 * len(lives)),
                                   margin={"l": 220, "r": 30, "t": 50, "b": 40}))
    fig.add_bar(orientation="h", x=[life.cost_micros / 1e6 for life in lives],
                y=[f"{i}. {html.escape(_short(life.session_id, 28))}" for i, life in
                   zip(range(len(lives), 0, -1), lives, strict=True)],
                hovertext=[html.escape(f"{life.requests} requests; models {' > '.join(life.models) or '-'}; "
                                       f"{life.escalation_count} escalations") for life in lives],
                marker_color="#1f77b4")
    if not lives:
        _empty(fig, "no session has any spend")
    return fig


def _cost_at(points: list[tuple[int, int]], ts: int) -> float:
    """The session's total (USD) at ``ts``: the last cost point at or before it."""
    value = 0
    for when, micros in points:
        if when > ts:
            break
        value = micros
    return value / 1e6


def _timeline(rank: int, tl: Timeline) -> Any:
    from plotly.subplots import make_subplots

    life = tl.life
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.5, 0.5], vertical_spacing=0.08,
                        subplot_titles=("session cost (USD) and what changed", "decisions: serving model, by kind"))
    fig.update_layout(_layout(f"{rank}. {_short(life.session_id, 60)}: {fmt_usd(life.cost_micros)}", height=460,
                              legend={"orientation": "h", "y": -0.12}))
    cost = list(tl.cost)
    if cost and life.origin != "snapshot" and life.started_at is not None and life.started_at < cost[0][0]:
        cost.insert(0, (life.started_at, 0))
    fig.add_scatter(x=[_when(ts) for ts, _ in cost], y=[m / 1e6 for _, m in cost], mode="lines+markers",
                    line={"shape": "hv", "color": "#1f77b4"}, name="cost", row=1, col=1)
    groups: dict[str, list[tuple[int, str]]] = {}
    for ts, name, text in tl.marks:
        groups.setdefault(name, []).append((ts, text))
    for name, marks in groups.items():
        symbol, colour, label = MARK_SYMBOLS.get(name, ("circle", "#444", name))
        fig.add_scatter(x=[_when(ts) for ts, _ in marks], y=[_cost_at(tl.cost, ts) for ts, _ in marks], mode="markers",
                        marker={"symbol": symbol, "size": 11, "color": colour}, name=label,
                        hovertext=[html.escape(text) for _, text in marks], hoverinfo="x+text", row=1, col=1)
    kinds: dict[str, list[tuple[int, str, str]]] = {}
    for ts, kind, model, _tier, text in tl.decisions:
        kinds.setdefault(kind, []).append((ts, model or "(none)", text))
    for kind, points in kinds.items():
        fig.add_scatter(x=[_when(ts) for ts, _, _ in points], y=[html.escape(_short(m)) for _, m, _ in points],
                        mode="markers", marker={"size": 9, "color": KIND_COLOURS.get(kind)}, name=html.escape(kind),
                        hovertext=[html.escape(text) for _, _, text in points], hoverinfo="x+text", row=2, col=1)
    if not tl.decisions:
        fig.add_annotation(text="no decision.made records for this session", showarrow=False, xref="x2 domain",
                           yref="y2 domain", x=0.5, y=0.5, font={"color": "#666"})
    fig.update_yaxes(type="category", row=2, col=1)
    return fig


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1200px; color: #222; padding: 0 16px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table.summary td { padding: 2px 16px 2px 0; } table.summary td:first-child { color: #666; }
.chart { min-height: 300px; } .note { color: #666; font-size: 0.9em; }
"""

_SCRIPT = """
(function () {
  var root = document.documentElement;
  var figures = JSON.parse(document.getElementById('report-figures').textContent);
  var config = JSON.parse(document.getElementById('report-config').textContent);
  Promise.all(figures.map(function (f) { return Plotly.newPlot(f.id, f.figure.data, f.figure.layout, config); }))
    .then(function () { root.setAttribute('data-report-ready', String(figures.length)); })
    .catch(function (e) { window.__reportError(String(e && e.stack || e)); });
})();
"""

_ERRORS = """
window.__reportError = function (text) {
  var root = document.documentElement;
  var was = root.getAttribute('data-report-errors');
  root.setAttribute('data-report-errors', (was ? was + ' | ' : '') + text);
};
window.addEventListener('error', function (e) { window.__reportError(String(e.message)); });
window.addEventListener('unhandledrejection', function (e) { window.__reportError(String(e.reason)); });
"""


def _json(value: Any) -> str:
    """JSON safe inside a <script> element: no ``<`` survives to close it."""
    from plotly.io.json import to_json_plotly

    return to_json_plotly(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(d: Digest, *, source: str = "", title: str = "session-engine report") -> str:
    """The whole page, plotly.js included; ``source`` names the log in the header."""
    require_plotly()
    from plotly.offline import get_plotlyjs

    sections: list[tuple[str, str, Any]] = [
        ("spend", "Spend over time", _spend(d)),
        ("decisions", "Decisions by kind over time", _decisions(d)),
        ("mix", "Model mix", _mix(d)),
        ("funnel", "Escalation funnel: strikes to escalations", _funnel(d)),
        ("top", "Top sessions by cost", _top(d)),
    ]
    for rank, tl in enumerate(d.timelines, 1):
        sections.append((f"session-{rank}", "", _timeline(rank, tl)))
    e = html.escape
    span = f"{fmt_ts(d.first_ts)} to {fmt_ts(d.last_ts)} UTC" if d.first_ts is not None else "-"
    escalations = ", ".join(f"{n} {reason}" for reason, n in sorted(d.escalations.items())) or "0"
    rows = [("log", source or "-"), ("records", f"{d.records:,}"), ("time span", span),
            ("session lifetimes", f"{d.lifetimes:,}"), ("spend", fmt_usd(d.spend_micros)),
            ("decisions", f"{d.decisions:,}"), ("escalations", escalations),
            ("time buckets", f"{len(d.buckets)} of {_width(d.width_ms)}")]
    body = [f"<h1>{e(title)}</h1>", '<table class="summary">',
            *(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows), "</table>"]
    for ident, heading, _ in sections:
        if ident == "session-1":
            body.append("<h2>Timelines of the costliest sessions</h2>"
                        '<p class="note">Hover a point for what the audit log says happened.</p>')
        if heading:
            body.append(f"<h2>{e(heading)}</h2>")
        body.append(f'<div class="chart" id="chart-{ident}"></div>')
    figures = [{"id": f"chart-{ident}", "figure": fig.to_plotly_json()} for ident, _, fig in sections]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(title)}</title>",
        f"<style>{_STYLE}</style>", f"<script>{_ERRORS}</script>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head>", "<body>", *body,
        f'<script type="application/json" id="report-figures">{_json(figures)}</script>',
        f'<script type="application/json" id="report-config">{_json(_CONFIG)}</script>',
        f"<script>{_SCRIPT}</script>", "</body>", "</html>", ""])
