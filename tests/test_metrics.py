"""WorkerMetrics names and values, the HTTP endpoint, a real Prometheus scraping it, deploy files."""

from __future__ import annotations

import math
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from stream_fm.errors import ConfigError
from stream_fm.metrics import (
    BATCH_SECONDS_BUCKETS,
    CLICK_DELAY_SECONDS_BUCKETS,
    IMPRESSION_TO_PREDICTION_SECONDS_BUCKETS,
    BulkHistogram,
    MetricsServer,
    WorkerMetrics,
)
from stream_fm.tools.prometheus import PrometheusServer
from tests.prometheus_helpers import (
    DESIGN_COUNTERS,
    DESIGN_GAUGES,
    DESIGN_HISTOGRAMS,
    require_prometheus,
)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def metrics(registry: CollectorRegistry, clock: FakeClock) -> WorkerMetrics:
    return WorkerMetrics(registry, invalid_reasons=("not_json",), version="test", clock=clock)


def _observe_everything(m: WorkerMetrics) -> None:
    m.observe_batch(
        events_by_type={"impression": 10, "click": 3, "labeled": 2},
        invalid_by_reason={"not_json": 2, "bad_ts": 1},
        duplicates_by_kind={"click": 1},
        predictions=12,
        learned_pos=3,
        learned_neg=6,
        logloss_sum=4.5,
        prediction_sum=1.25,
        late=1,
        orphan=2,
        evicted=4,
        refused=1,
        batch_seconds=0.02,
        impression_to_prediction_s=np.array([0.004, 0.2, 3.0]),
        click_delays_s=[2.0, 45.0, 7200.0],
    )
    m.set_quality(logloss=0.5, ne=0.9, calibration=1.1, auc=0.75)
    m.set_pending(17)
    m.set_lag("impressions", 3, 250)
    m.set_model_version(1843211)


def _sample_names(registry: CollectorRegistry) -> set[str]:
    return {s.name for family in registry.collect() for s in family.samples}


# --- WorkerMetrics -------------------------------------------------------------------------


def test_every_design_metric_is_exposed_under_its_exact_name(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    _observe_everything(metrics)
    names = _sample_names(registry)
    for name in DESIGN_COUNTERS + DESIGN_GAUGES:
        assert name in names, name
    for name in DESIGN_HISTOGRAMS:
        assert {f"{name}_bucket", f"{name}_count", f"{name}_sum"} <= names, name
    # The trap: a Counter declared as "..._sum_total" would not expose "_sum_total_total".
    assert not any(n.endswith("_total_total") for n in names)


def test_observe_batch_values(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    _observe_everything(metrics)
    v = registry.get_sample_value
    assert v("stream_fm_events_total", {"type": "impression"}) == 10
    assert v("stream_fm_events_total", {"type": "click"}) == 3
    assert v("stream_fm_events_total", {"type": "labeled"}) == 2
    assert v("stream_fm_invalid_events_total", {"reason": "not_json"}) == 2
    assert v("stream_fm_invalid_events_total", {"reason": "bad_ts"}) == 1
    assert v("stream_fm_predictions_total") == 12
    assert v("stream_fm_examples_learned_total", {"label": "1"}) == 3
    assert v("stream_fm_examples_learned_total", {"label": "0"}) == 6
    assert v("stream_fm_logloss_sum_total") == 4.5
    assert v("stream_fm_prediction_sum_total") == 1.25
    assert v("stream_fm_late_clicks_total") == 1
    assert v("stream_fm_orphan_clicks_total") == 2
    assert v("stream_fm_evicted_impressions_total") == 4
    assert v("stream_fm_duplicate_events_total", {"kind": "click"}) == 1
    assert v("stream_fm_refused_updates_total") == 1
    assert v("stream_fm_progressive_logloss") == 0.5
    assert v("stream_fm_normalized_entropy") == 0.9
    assert v("stream_fm_calibration") == 1.1
    assert v("stream_fm_auc_window") == 0.75
    assert v("stream_fm_pending_impressions") == 17
    assert v("stream_fm_consumer_lag", {"topic": "impressions", "partition": "3"}) == 250
    assert v("stream_fm_model_version") == 1843211
    assert v("stream_fm_build_info", {"version": "test"}) == 1

    assert v("stream_fm_batch_seconds_count") == 1
    assert v("stream_fm_batch_seconds_sum") == pytest.approx(0.02)
    assert v("stream_fm_batch_seconds_bucket", {"le": "0.01"}) == 0
    assert v("stream_fm_batch_seconds_bucket", {"le": "0.025"}) == 1
    assert v("stream_fm_impression_to_prediction_seconds_count") == 3
    assert v("stream_fm_impression_to_prediction_seconds_bucket", {"le": "0.005"}) == 1
    assert v("stream_fm_impression_to_prediction_seconds_bucket", {"le": "0.25"}) == 2
    assert v("stream_fm_impression_to_prediction_seconds_sum") == pytest.approx(3.204)
    assert v("stream_fm_click_delay_seconds_count") == 3
    assert v("stream_fm_click_delay_seconds_bucket", {"le": "2.0"}) == 1
    assert v("stream_fm_click_delay_seconds_bucket", {"le": "60.0"}) == 2
    assert v("stream_fm_click_delay_seconds_bucket", {"le": "3600.0"}) == 2
    assert v("stream_fm_click_delay_seconds_bucket", {"le": "86400.0"}) == 3


def test_counters_accumulate_and_zero_entries_create_no_series(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    metrics.observe_batch(predictions=5, learned_neg=2, invalid_by_reason={"too_large": 0})
    metrics.observe_batch(predictions=7, learned_neg=1)
    v = registry.get_sample_value
    assert v("stream_fm_predictions_total") == 12
    assert v("stream_fm_examples_learned_total", {"label": "0"}) == 3
    assert v("stream_fm_invalid_events_total", {"reason": "too_large"}) is None


def test_known_labels_start_at_zero_and_quality_starts_undefined(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    v = registry.get_sample_value
    for t in ("impression", "click", "labeled"):
        assert v("stream_fm_events_total", {"type": t}) == 0
    assert v("stream_fm_examples_learned_total", {"label": "0"}) == 0
    assert v("stream_fm_examples_learned_total", {"label": "1"}) == 0
    assert v("stream_fm_invalid_events_total", {"reason": "not_json"}) == 0
    for name in ("progressive_logloss", "normalized_entropy", "calibration", "auc_window"):
        value = v(f"stream_fm_{name}")
        assert value is not None and math.isnan(value), name


def test_auc_none_is_nan(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    metrics.set_quality(0.4, 0.8, 1.0, 0.7)
    metrics.set_quality(0.4, 0.8, 1.0, None)
    value = registry.get_sample_value("stream_fm_auc_window")
    assert value is not None and math.isnan(value)


def test_checkpoint_age_is_computed_at_scrape_time(
    registry: CollectorRegistry, metrics: WorkerMetrics, clock: FakeClock
) -> None:
    # Before any checkpoint the age counts from start, so a worker that never manages one alerts.
    clock.now += 30
    assert registry.get_sample_value("stream_fm_checkpoint_age_seconds") == 30
    metrics.mark_checkpoint()
    assert registry.get_sample_value("stream_fm_checkpoint_age_seconds") == 0
    clock.now += 12.5
    assert registry.get_sample_value("stream_fm_checkpoint_age_seconds") == 12.5
    metrics.mark_checkpoint(clock.now - 100)  # e.g. the restored checkpoint's write time
    assert registry.get_sample_value("stream_fm_checkpoint_age_seconds") == 100


def test_forget_partition_drops_its_lag(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    metrics.set_lag("t", 0, 5)
    metrics.set_lag("t", 1, 6)
    metrics.forget_partition("t", 0)
    metrics.forget_partition("t", 9)  # never assigned: nothing to do
    assert (
        registry.get_sample_value("stream_fm_consumer_lag", {"topic": "t", "partition": "0"})
        is None
    )
    assert (
        registry.get_sample_value("stream_fm_consumer_lag", {"topic": "t", "partition": "1"}) == 6
    )


def test_second_worker_metrics_on_one_registry_is_refused(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    with pytest.raises(ValueError, match="Duplicated"):
        WorkerMetrics(registry)


@pytest.mark.parametrize(
    "buckets",
    [BATCH_SECONDS_BUCKETS, IMPRESSION_TO_PREDICTION_SECONDS_BUCKETS, CLICK_DELAY_SECONDS_BUCKETS],
)
def test_bulk_histogram_matches_prometheus_client_histogram(buckets: tuple[float, ...]) -> None:
    rng = np.random.default_rng(7)
    hi = buckets[-1] * 2
    # Include every bound exactly: "le" means less than or equal.
    values = np.concatenate([rng.uniform(0, hi, 500), np.asarray(buckets), [0.0, hi * 10]])
    ours, reference = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram("h", "doc", buckets, ours)
    bulk.observe_many(values[:100])
    bulk.observe_many(values[100:])
    hist = Histogram("h", "doc", buckets=buckets, registry=reference)
    for x in values:
        hist.observe(float(x))
    for le in [*(repr(b) for b in buckets), "+Inf"]:
        assert ours.get_sample_value("h_bucket", {"le": le}) == reference.get_sample_value(
            "h_bucket", {"le": le}
        ), le
    assert ours.get_sample_value("h_count") == reference.get_sample_value("h_count")
    assert ours.get_sample_value("h_sum") == pytest.approx(reference.get_sample_value("h_sum"))


def test_bulk_histogram_drops_nan_and_clamps_negative() -> None:
    registry = CollectorRegistry()
    bulk = BulkHistogram("h", "doc", (1.0, 2.0), registry)
    bulk.observe_many([math.nan, -3.0, 1.5, math.inf])
    bulk.observe_many([])
    assert registry.get_sample_value("h_count") == 3
    assert registry.get_sample_value("h_bucket", {"le": "1.0"}) == 1
    assert registry.get_sample_value("h_bucket", {"le": "2.0"}) == 2
    assert registry.get_sample_value("h_bucket", {"le": "+Inf"}) == 3
    assert registry.get_sample_value("h_sum") == math.inf


def test_bulk_histogram_rejects_bad_buckets() -> None:
    with pytest.raises(ValueError, match="buckets"):
        BulkHistogram("h", "doc", (1.0, 1.0), CollectorRegistry())
    with pytest.raises(ValueError, match="buckets"):
        BulkHistogram("h", "doc", (), CollectorRegistry())


# --- MetricsServer -------------------------------------------------------------------------


def _get(url: str, accept: str | None = None, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    if accept is not None:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def test_metrics_endpoint_serves_the_registry(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    _observe_everything(metrics)
    with MetricsServer(registry) as server:
        assert server.port > 0
        status, content_type, body = _get(f"{server.url}/metrics")
        assert status == 200
        assert content_type.startswith("text/plain; version=0.0.4")
        assert "\nstream_fm_predictions_total 12.0\n" in body
        assert "\nstream_fm_logloss_sum_total 4.5\n" in body
        assert 'stream_fm_consumer_lag{partition="3",topic="impressions"} 250.0' in body

        status, content_type, body = _get(
            f"{server.url}/metrics?x=1", accept="application/openmetrics-text; version=1.0.0"
        )
        assert status == 200
        assert content_type.startswith("application/openmetrics-text")
        assert "\nstream_fm_predictions_total 12.0\n" in body
        assert body.endswith("# EOF\n")

        status, _, body = _get(f"{server.url}/metrics", method="HEAD")
        assert (status, body) == (200, "")
        assert _get(f"{server.url}/nope")[0] == 404


def test_healthz_and_readyz_follow_their_checks(registry: CollectorRegistry) -> None:
    state: dict[str, tuple[bool, str]] = {
        "health": (True, "ok"),
        "ready": (False, "broker unreachable"),
    }
    server = MetricsServer(
        registry, health_check=lambda: state["health"], ready_check=lambda: state["ready"]
    )
    with server:
        assert _get(f"{server.url}/healthz")[::2] == (200, "ok\n")
        assert _get(f"{server.url}/readyz")[::2] == (503, "broker unreachable\n")
        state["ready"] = (True, "")
        state["health"] = (False, "loop stalled for 120 s")
        assert _get(f"{server.url}/readyz")[::2] == (200, "ok\n")
        assert _get(f"{server.url}/healthz")[::2] == (503, "loop stalled for 120 s\n")


def test_a_raising_check_reports_unhealthy(registry: CollectorRegistry) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    with MetricsServer(registry, health_check=broken) as server:
        status, _, body = _get(f"{server.url}/healthz")
        assert status == 503 and "boom" in body
        assert _get(f"{server.url}/readyz")[0] == 200  # default check: ready


def test_stop_frees_the_port_and_is_idempotent(registry: CollectorRegistry) -> None:
    server = MetricsServer(registry).start()
    port = server.port
    thread = server._thread
    assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    server.stop()
    server.stop()
    assert thread is not None and not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    # A restarted server gets the same port back (EADDRINUSE if the listener were still open).
    with MetricsServer(registry, port=port) as again:
        assert _get(f"{again.url}/healthz")[0] == 200
    with pytest.raises(RuntimeError):
        _ = server.port


def test_port_in_use_names_the_setting(registry: CollectorRegistry) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        server = MetricsServer(registry, port=s.getsockname()[1])
        with pytest.raises(ConfigError, match=r"^metrics_port: cannot listen"):
            server.start()


# --- the real Prometheus server ------------------------------------------------------------


def test_missing_binary_fails_with_the_advice_never_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_BINARY", "/nonexistent/stream-fm-no-such-binary")
    for ci in ("true", ""):
        monkeypatch.setenv("CI", ci)
        with pytest.raises(pytest.fail.Exception, match="apt-get install prometheus"):
            require_prometheus()


def test_real_prometheus_scrapes_the_endpoint(
    tmp_path: Path, registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    binary = require_prometheus()
    metrics.observe_batch(
        events_by_type={"impression": 42},
        predictions=42,
        learned_neg=40,
        learned_pos=2,
        logloss_sum=3.5,
        batch_seconds=0.02,
    )
    metrics.set_lag("impressions", 0, 99)
    with (
        MetricsServer(registry) as server,
        PrometheusServer(tmp_path, [f"127.0.0.1:{server.port}"], binary=binary) as prometheus,
    ):
        prometheus.wait_for_scrapes(1)
        (result,) = prometheus.query("stream_fm_predictions_total")
        assert result["metric"]["job"] == "stream_fm"
        assert float(result["value"][1]) == 42
        (lag,) = prometheus.query("stream_fm_consumer_lag")
        assert lag["metric"]["partition"] == "0" and float(lag["value"][1]) == 99
        # The names that trip naive declarations, as Prometheus stores them.
        assert float(prometheus.query("stream_fm_logloss_sum_total")[0]["value"][1]) == 3.5
        (p99,) = prometheus.query("histogram_quantile(0.99, stream_fm_batch_seconds_bucket)")
        assert 0.01 < float(p99["value"][1]) <= 0.025


def test_ready_gauge_follows_the_readiness_check_at_scrape_time(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    state = {"ready": False}
    metrics.watch_readiness(lambda: (state["ready"], "reason"))
    assert registry.get_sample_value("stream_fm_ready") == 0
    state["ready"] = True
    assert registry.get_sample_value("stream_fm_ready") == 1
    metrics.pending_impressions_limit.set(5000)
    assert registry.get_sample_value("stream_fm_pending_impressions_limit") == 5000
