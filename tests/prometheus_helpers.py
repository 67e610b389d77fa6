"""Shared by the metric, rule and dashboard tests: the metric names of docs/design.md and the real tools."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from stream_fm.errors import StreamFMError
from stream_fm.tools.prometheus import find_binary

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "stream_fm.json"

# docs/design.md, "Metrics".
DESIGN_COUNTERS = (
    "stream_fm_events_total",
    "stream_fm_invalid_events_total",
    "stream_fm_predictions_total",
    "stream_fm_examples_learned_total",
    "stream_fm_logloss_sum_total",
    "stream_fm_prediction_sum_total",
    "stream_fm_late_clicks_total",
    "stream_fm_orphan_clicks_total",
    "stream_fm_evicted_impressions_total",
)
DESIGN_GAUGES = (
    "stream_fm_progressive_logloss",
    "stream_fm_normalized_entropy",
    "stream_fm_calibration",
    "stream_fm_logloss_window",
    "stream_fm_normalized_entropy_window",
    "stream_fm_auc_window",
    "stream_fm_pending_impressions",
    "stream_fm_consumer_lag",
    "stream_fm_checkpoint_age_seconds",
    "stream_fm_model_version",
)
DESIGN_HISTOGRAMS = (
    "stream_fm_batch_seconds",
    "stream_fm_impression_to_prediction_seconds",
    "stream_fm_click_delay_seconds",
)


def missing_tool(message: str) -> None:
    """A tool a promised test needs is missing: the test fails, never skips, with the
    reason (``make test`` installs every such tool; see scripts/setup-tests)."""
    pytest.fail(message, pytrace=False)


def require_prometheus() -> str:
    try:
        return find_binary()
    except StreamFMError as error:
        missing_tool(str(error))
        raise  # unreachable: _missing raises


def require_promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.access(path, os.X_OK):
        missing_tool("promtool not found: install the Debian package (apt-get install prometheus)")
    return path


def referenced_metrics(text: str) -> set[str]:
    """stream_fm_* names in PromQL text; recording-rule names (level:metric:ops) excluded."""
    return set(re.findall(r"(?<![:\w])stream_fm_[a-z0-9_]*[a-z0-9](?![:\w])", text))
