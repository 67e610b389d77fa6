"""Prometheus metrics of the worker and the HTTP endpoint serving /metrics, /healthz, /readyz.

The registry is injected so tests (and several workers in one process) never share state.
The worker's hot loop reports once per batch: ``WorkerMetrics.observe_batch`` takes aggregates,
and latency arrays are binned with numpy in one call rather than one ``observe()`` per event.

Counters are process-local and start at zero on every restart; PromQL's ``rate``/``increase``
handle the reset, so restored totals are never replayed into them. Gauges describing the model
since start (progressive log loss, NE, calibration, AUC) come from the restored accumulators.
"""

from __future__ import annotations

import contextlib
import http.server
import math
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from stream_fm.errors import ConfigError
from stream_fm.webconfig import WebConfig, check_basic_auth

__all__ = [
    "BATCH_SECONDS_BUCKETS",
    "CLICK_DELAY_SECONDS_BUCKETS",
    "IMPRESSION_TO_PREDICTION_SECONDS_BUCKETS",
    "BulkHistogram",
    "HealthCheck",
    "MetricsServer",
    "WorkerMetrics",
]

# Upper bounds in seconds. Batches take milliseconds to seconds; serving latency includes the
# producer's queueing and can reach a minute under backpressure; click delays span seconds to
# the longest attribution window operators use (a day).
BATCH_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
IMPRESSION_TO_PREDICTION_SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
CLICK_DELAY_SECONDS_BUCKETS: tuple[float, ...] = (
    1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0,
    43200.0, 86400.0,
)  # fmt: skip

EVENT_TYPES: tuple[str, ...] = ("impression", "click", "labeled")
DUPLICATE_KINDS: tuple[str, ...] = ("impression", "click")

HealthCheck = Callable[[], tuple[bool, str]]
FloatArray = Sequence[float] | npt.NDArray[np.floating[Any]]


class BulkHistogram:
    """A Prometheus histogram fed whole arrays: one numpy binning and one lock per batch.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets in Python for
    every value, which costs more than scoring the event. The exposition is the same
    (``_bucket{le}``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = np.asarray(sorted(float(b) for b in buckets), dtype=np.float64)
        if bounds.size == 0 or not np.all(np.isfinite(bounds)) or np.any(np.diff(bounds) <= 0):
            raise ValueError(f"{name}: buckets must be finite, distinct and non-empty")
        self.name = name
        self.documentation = documentation
        self._bounds = bounds
        # repr() matches prometheus_client's "le" text for finite bounds ("0.001", "1.0").
        self._le = [repr(b) for b in bounds.tolist()] + ["+Inf"]
        # Per-bucket (non-cumulative) counts; the last slot holds values above every bound.
        self._counts = np.zeros(bounds.size + 1, dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: FloatArray) -> None:
        """Record every value; NaN is dropped, negatives (clock skew) count as 0."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        v = v[~np.isnan(v)]
        # A negative latency is clock skew between producers; clamping keeps _sum monotonic.
        v = np.maximum(v, 0.0)
        # side="left": the first bound >= v, i.e. Prometheus' "le" (less than or equal).
        counts = np.bincount(
            np.searchsorted(self._bounds, v, side="left"), minlength=self._counts.size
        )
        total = float(v.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def observe(self, value: float) -> None:
        """Record one value (for the rare single observation, e.g. one batch's duration)."""
        self.observe_many((value,))

    def _family(self, with_samples: bool) -> HistogramMetricFamily:
        if not with_samples:
            return HistogramMetricFamily(self.name, self.documentation)
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        buckets = [(le, float(c)) for le, c in zip(self._le, cumulative.tolist(), strict=True)]
        return HistogramMetricFamily(
            self.name, self.documentation, buckets=buckets, sum_value=total
        )

    def collect(self) -> Iterator[Metric]:
        yield self._family(with_samples=True)

    def describe(self) -> Iterator[Metric]:
        # Lets the registry reject a second metric with the same name at registration.
        yield self._family(with_samples=False)


class WorkerMetrics:
    """Every metric of docs/design.md, plus a few operational ones, on one registry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        invalid_reasons: Iterable[str] = (),
        version: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``invalid_reasons``: labels to pre-create at 0 so ``rate()`` sees the first one.

        ``clock`` (wall time, seconds) is what checkpoint times are measured against.
        """
        r = registry
        self._clock = clock

        # Counters. prometheus_client appends "_total" when exposing.
        self.events = Counter(
            "stream_fm_events", "Valid input events, by type.", ["type"], registry=r
        )
        self.invalid_events = Counter(
            "stream_fm_invalid_events",
            "Input records sent to the dead-letter topic, by reason.",
            ["reason"],
            registry=r,
        )
        self.predictions = Counter("stream_fm_predictions", "Predictions published.", registry=r)
        self.examples_learned = Counter(
            "stream_fm_examples_learned",
            "Labeled examples learned, by label (0 or 1).",
            ["label"],
            registry=r,
        )
        self.logloss_sum = Counter(
            "stream_fm_logloss_sum",
            "Sum of per-example progressive log loss (natural log, on the served p).",
            registry=r,
        )
        self.prediction_sum = Counter(
            "stream_fm_prediction_sum",
            "Sum of the served p over learned examples (calibration numerator).",
            registry=r,
        )
        self.late_clicks = Counter(
            "stream_fm_late_clicks",
            "Clicks whose impression was already learned as negative.",
            registry=r,
        )
        self.orphan_clicks = Counter(
            "stream_fm_orphan_clicks", "Clicks for an unknown impression id.", registry=r
        )
        self.evicted_impressions = Counter(
            "stream_fm_evicted_impressions",
            "Pending impressions evicted from the full buffer and learned as negative.",
            registry=r,
        )
        # Operational extras (not in docs/design.md): what an operator asks next.
        self.duplicate_events = Counter(
            "stream_fm_duplicate_events",
            "Duplicate impressions or clicks ignored, by kind.",
            ["kind"],
            registry=r,
        )
        self.refused_updates = Counter(
            "stream_fm_refused_updates",
            "Model updates refused because they were not finite.",
            registry=r,
        )
        self.nonfinite_predictions = Counter(
            "stream_fm_nonfinite_predictions",
            "Scores whose raw output was not a number (served as p = 0.5).",
            registry=r,
        )
        self.checkpoints = Counter(
            "stream_fm_checkpoints", "Checkpoints written durably.", registry=r
        )
        self.checkpoint_write_seconds = Gauge(
            "stream_fm_checkpoint_write_seconds",
            "How long the last checkpoint took to write durably (beside the loop).",
            registry=r,
        )
        self.loop_longest_pause_seconds = Gauge(
            "stream_fm_loop_longest_pause_seconds",
            "Longest time since start between two polls of the loop (one batch and any "
            "checkpoint snapshot): how long a record can wait on the worker itself.",
            registry=r,
        )
        self.checkpoint_bytes = Gauge(
            "stream_fm_checkpoint_bytes", "Size of the last durable checkpoint file.", registry=r
        )
        self.checkpoint_errors = Counter(
            "stream_fm_checkpoint_errors", "Checkpoint writes that failed.", registry=r
        )
        self.produce_errors = Counter(
            "stream_fm_produce_errors",
            "Produce failures, by kind: permanent (the broker refused a record as such: too "
            "large, invalid, not authorized) or transient (broker away, timeouts).",
            ["kind"],
            registry=r,
        )
        self.rollbacks = Counter(
            "stream_fm_rollbacks",
            "Rollbacks to the last checkpoint after a produce failure (each redoes the batches "
            "since, after a back-off that doubles until a checkpoint succeeds).",
            registry=r,
        )
        self.consumer_rebuilds = Counter(
            "stream_fm_consumer_rebuilds",
            "Consumers replaced by the watchdog: behind the log end (read on a connection of "
            "its own) yet fetching nothing for consumer_stall_timeout_s.",
            registry=r,
        )

        # Gauges.
        self.progressive_logloss = Gauge(
            "stream_fm_progressive_logloss",
            "Progressive log loss since the model started (restored with the checkpoint).",
            registry=r,
        )
        self.normalized_entropy = Gauge(
            "stream_fm_normalized_entropy",
            "Log loss divided by the entropy of the empirical CTR, since start.",
            registry=r,
        )
        self.calibration = Gauge(
            "stream_fm_calibration", "Sum of served p / sum of labels, since start.", registry=r
        )
        self.logloss_window = Gauge(
            "stream_fm_logloss_window",
            "Progressive log loss over the last auc_window examples (what a cold start reads).",
            registry=r,
        )
        self.normalized_entropy_window = Gauge(
            "stream_fm_normalized_entropy_window",
            "Normalized entropy over the last auc_window examples.",
            registry=r,
        )
        self.auc_window = Gauge(
            "stream_fm_auc_window",
            "ROC AUC over the recent window of examples (NaN until both labels seen).",
            registry=r,
        )
        self.pending_impressions = Gauge(
            "stream_fm_pending_impressions",
            "Impressions waiting for a click or the end of the attribution window.",
            registry=r,
        )
        self.pending_impressions_limit = Gauge(
            "stream_fm_pending_impressions_limit",
            "The pending-impression bound (max_pending_impressions); beyond it the oldest are evicted.",
            registry=r,
        )
        self.ready = Gauge(
            "stream_fm_ready",
            "1 when /readyz would answer ready (state restored, partitions, broker reachable).",
            registry=r,
        )
        self.consumer_lag = Gauge(
            "stream_fm_consumer_lag",
            "Records between the worker's position and the partition end.",
            ["topic", "partition"],
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "stream_fm_checkpoint_age_seconds",
            "Seconds since the newest durable checkpoint (since start if none yet).",
            registry=r,
        )
        self.model_version = Gauge(
            "stream_fm_model_version", "Examples the model has learned.", registry=r
        )
        self.build_info = Gauge(
            "stream_fm_build_info", "Always 1; the version label names the build.", ["version"],
            registry=r,
        )  # fmt: skip

        # Histograms, fed per batch.
        self.batch_seconds = BulkHistogram(
            "stream_fm_batch_seconds",
            "Wall time to process one batch, poll to publish.",
            BATCH_SECONDS_BUCKETS,
            r,
        )
        self.impression_to_prediction_seconds = BulkHistogram(
            "stream_fm_impression_to_prediction_seconds",
            "From the impression's ts to its prediction being published.",
            IMPRESSION_TO_PREDICTION_SECONDS_BUCKETS,
            r,
        )
        self.checkpoint_pause_seconds = BulkHistogram(
            "stream_fm_checkpoint_pause_seconds",
            "How long the loop stopped for a checkpoint: acknowledgements awaited and the state "
            "copied (the write happens beside the loop).",
            BATCH_SECONDS_BUCKETS,
            r,
        )
        self.click_delay_seconds = BulkHistogram(
            "stream_fm_click_delay_seconds",
            "Event-time delay from an impression to its click.",
            CLICK_DELAY_SECONDS_BUCKETS,
            r,
        )

        # Known label values exist at 0 from the start, so the first increment is a visible
        # step for rate()/increase() rather than a series appearing from nowhere.
        for t in EVENT_TYPES:
            self.events.labels(type=t)
        for reason in invalid_reasons:
            self.invalid_events.labels(reason=reason)
        for label in ("0", "1"):
            self.examples_learned.labels(label=label)
        for kind in DUPLICATE_KINDS:
            self.duplicate_events.labels(kind=kind)
        for kind in ("permanent", "transient"):
            self.produce_errors.labels(kind=kind)
        self.build_info.labels(version=version).set(1)
        # Quality is undefined before the first example; 0 would read as a perfect log loss.
        self.set_quality(math.nan, math.nan, math.nan, None)
        self.set_window_quality(math.nan, math.nan)

        # Age is computed at scrape time, so it keeps growing while the loop is stuck.
        self._last_checkpoint = clock()
        self.checkpoint_age.set_function(lambda: max(0.0, self._clock() - self._last_checkpoint))

    def watch_readiness(self, ready_check: Callable[[], tuple[bool, str]]) -> None:
        """Evaluate ``ready_check`` at scrape time, so alerts see what /readyz sees."""
        self.ready.set_function(lambda: 1.0 if ready_check()[0] else 0.0)

    def observe_batch(
        self,
        *,
        events_by_type: Mapping[str, int] | None = None,
        invalid_by_reason: Mapping[str, int] | None = None,
        duplicates_by_kind: Mapping[str, int] | None = None,
        predictions: int = 0,
        learned_pos: int = 0,
        learned_neg: int = 0,
        logloss_sum: float = 0.0,
        prediction_sum: float = 0.0,
        late: int = 0,
        orphan: int = 0,
        evicted: int = 0,
        refused: int = 0,
        nonfinite: int = 0,
        batch_seconds: float | None = None,
        impression_to_prediction_s: FloatArray = (),
        click_delays_s: FloatArray = (),
    ) -> None:
        """Add one batch's aggregates. Keyword-only: many ints, easy to swap by position."""
        for t, n in (events_by_type or {}).items():
            if n:
                self.events.labels(type=t).inc(n)
        for reason, n in (invalid_by_reason or {}).items():
            if n:
                self.invalid_events.labels(reason=reason).inc(n)
        for kind, n in (duplicates_by_kind or {}).items():
            if n:
                self.duplicate_events.labels(kind=kind).inc(n)
        for counter, amount in (
            (self.predictions, predictions),
            (self.examples_learned.labels(label="1"), learned_pos),
            (self.examples_learned.labels(label="0"), learned_neg),
            (self.logloss_sum, logloss_sum),
            (self.prediction_sum, prediction_sum),
            (self.late_clicks, late),
            (self.orphan_clicks, orphan),
            (self.evicted_impressions, evicted),
            (self.refused_updates, refused),
            (self.nonfinite_predictions, nonfinite),
        ):
            if amount:
                counter.inc(amount)
        if batch_seconds is not None:
            self.batch_seconds.observe(batch_seconds)
        self.impression_to_prediction_seconds.observe_many(impression_to_prediction_s)
        self.click_delay_seconds.observe_many(click_delays_s)

    def set_quality(self, logloss: float, ne: float, calibration: float, auc: float | None) -> None:
        """Since-start quality from the progressive accumulators; None/NaN = not yet defined."""
        self.progressive_logloss.set(logloss)
        self.normalized_entropy.set(ne)
        self.calibration.set(calibration)
        self.auc_window.set(math.nan if auc is None else auc)

    def set_window_quality(self, logloss: float, ne: float) -> None:
        """Quality over the recent window of examples; NaN = not yet defined."""
        self.logloss_window.set(logloss)
        self.normalized_entropy_window.set(ne)

    def set_pending(self, n: int) -> None:
        self.pending_impressions.set(n)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop a revoked partition's lag so two workers never report the same partition."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(topic, str(partition))

    def mark_checkpoint(self, at: float | None = None) -> None:
        """A checkpoint became durable at wall time ``at`` (now if None); also after restore."""
        self._last_checkpoint = self._clock() if at is None else at

    def set_model_version(self, version: int) -> None:
        self.model_version.set(version)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper must not hold up process exit

    def __init__(
        self,
        address: tuple[str, int],
        registry: CollectorRegistry,
        health_check: HealthCheck,
        ready_check: HealthCheck,
        web: WebConfig | None = None,
    ) -> None:
        # ThreadingHTTPServer is IPv4-only unless told; a literal IPv6 host needs AF_INET6.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.registry = registry
        self.health_check = health_check
        self.ready_check = ready_check
        self.web = web or WebConfig(None)
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that cannot speak TLS (or hangs up) is its own problem, not a traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.web.tls is None:
            return sock, address
        # The handshake runs in the request's own thread (a slow client holds up nobody).
        return self.web.tls.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), address


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    server_version = "stream_fm"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            try:
                self.request.do_handshake()
            except (OSError, ssl.SSLError):
                self.request.close()
                raise
        super().setup()

    def _respond(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics" and not check_basic_auth(
            self.server.web.users, self.headers.get("Authorization")
        ):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="stream-fm metrics"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(200, encoder(self.server.registry), content_type, send_body)
        elif path in ("/healthz", "/readyz"):
            check = self.server.health_check if path == "/healthz" else self.server.ready_check
            try:
                ok, reason = check()
            except Exception as exc:  # a failing check means unhealthy, not a dead endpoint
                ok, reason = False, f"check failed: {exc!r}"
            body = (reason or ("ok" if ok else "not ok")) + "\n"
            self._send(200 if ok else 503, body.encode(), "text/plain; charset=utf-8", send_body)
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8", send_body)

    def _send(self, status: int, body: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # One line per scrape every few seconds would drown the worker's own log.
        pass


def _always_ok() -> tuple[bool, str]:
    return True, "ok"


class MetricsServer:
    """/metrics, /healthz and /readyz over HTTP, served from a daemon thread.

    The socket is bound in ``start()``; ``port`` is the bound port (useful with port 0).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        health_check: HealthCheck = _always_ok,
        ready_check: HealthCheck = _always_ok,
        web: WebConfig | None = None,
    ) -> None:
        self._web = web or WebConfig(None)
        self._registry = registry
        self._host = host
        self._requested_port = port
        self._health_check = health_check
        self._ready_check = ready_check
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("MetricsServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{self._web.scheme}://{host}:{self.port}"

    def start(self) -> MetricsServer:
        if self._server is not None:
            return self
        try:
            server = _Server(
                (self._host, self._requested_port),
                self._registry,
                self._health_check,
                self._ready_check,
                self._web,
            )
        except OSError as exc:
            # The operator fixes this by changing the setting, so name it.
            setting = "metrics_host" if isinstance(exc, socket.gaierror) else "metrics_port"
            raise ConfigError(
                setting,
                f"cannot listen on {self._host}:{self._requested_port}: {exc.strerror or exc}",
            ) from exc
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="stream-fm-metrics",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving, join the thread and close the socket; safe to call twice."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
