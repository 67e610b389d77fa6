"""The Grafana dashboard's queries, outside Grafana: evaluate them, or draw a picture of them.

``panel_queries`` reads deploy/grafana/dashboards/stream_fm.json and substitutes Grafana's
variables, so tests can run every panel's PromQL against a real Prometheus, and
``render_snapshot`` draws the key panels from ``query_range`` results (matplotlib, the
``plot`` extra) for README.

    >>> queries = panel_queries(load_dashboard(), rate_interval="30s")
    >>> any(q.title == "Pending impressions" for q in queries)
    True
    >>> all("$" not in q.expr for q in queries)
    True
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_fm.tools.prometheus import JOB, REPO_DEPLOY, PrometheusServer

DASHBOARD_PATH = REPO_DEPLOY / "grafana" / "dashboards" / "stream_fm.json"

# The panels README's picture shows, in order: traffic, quality, latency, state.
SNAPSHOT_PANELS = (
    "Events/s by type",
    "Predictions/s and examples learned/s",
    "Progressive log loss",
    "Normalized entropy (since start)",
    "Calibration (sum p / sum y)",
    "AUC (recent window)",
    "Impression to prediction latency",
    "Pending impressions",
    "Consumer lag per partition",
)


@dataclass(frozen=True)
class PanelQuery:
    title: str
    ref_id: str
    legend: str
    expr: str


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(Path(path).read_text())
    return dashboard


def panel_queries(
    dashboard: dict[str, Any],
    *,
    job: str = JOB,
    instance: str = ".*",
    rate_interval: str = "1m",
) -> list[PanelQuery]:
    """Every target of every panel, with $job, $instance and $__rate_interval filled in."""
    variables = {"$__rate_interval": rate_interval, "$instance": instance, "$job": job}
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in variables.items():
                expr = expr.replace(name, value)
            queries.append(
                PanelQuery(panel["title"], target["refId"], target.get("legendFormat", ""), expr)
            )
    return queries


def _legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ",".join(f"{k}={v}" for k, v in labels.items()) or "value"


def render_snapshot(
    server: PrometheusServer,
    png_path: Path,
    *,
    start_s: float,
    end_s: float | None = None,
    panels: Sequence[str] = SNAPSHOT_PANELS,
    rate_interval: str = "30s",
    dashboard: dict[str, Any] | None = None,
) -> int:
    """Draw ``panels`` from Prometheus data over [start_s, end_s] into a PNG; returns series drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end_s = time.time() if end_s is None else end_s
    step_s = max(1.0, (end_s - start_s) / 300)
    queries = panel_queries(dashboard or load_dashboard(), rate_interval=rate_interval)
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.1 * rows), squeeze=False)
    drawn = 0
    for axis, title in zip(axes.flat, panels, strict=False):
        for query in (q for q in queries if q.title == title):
            for series in server.query_range(query.expr, start_s, end_s, step_s):
                points = [(float(t) - start_s, float(v)) for t, v in series["values"]]
                points = [(t, v) for t, v in points if math.isfinite(v)]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, label=_legend(query.legend, series["metric"]), linewidth=1.2)
                drawn += 1
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("seconds", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="best")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle("stream_fm dashboard panels, from a real Prometheus (stream-fm demo)")
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=90)
    plt.close(figure)
    return drawn
