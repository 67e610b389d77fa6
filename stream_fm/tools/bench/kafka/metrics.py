"""Reading a worker's /metrics: samples, processed counts, histogram quantiles."""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from stream_fm.tools.bench.kafka.options import BATCH_HISTOGRAM, LATENCY_HISTOGRAM, PAUSE_HISTOGRAM


@dataclass(frozen=True, slots=True)
class Scrape:
    totals: dict[str, float]  # samples summed over labels, by sample name
    buckets: list[tuple[float, float]]  # the latency histogram: (le, cumulative count)
    latency_sum: float
    latency_count: float
    batch_buckets: list[tuple[float, float]]  # stream_fm_batch_seconds, the same way
    # stream_fm_consumer_lag by (topic, partition): the partitions the worker owns (reported)
    lags: dict[tuple[str, int], float] = field(default_factory=dict)
    pause_buckets: list[tuple[float, float]] = field(default_factory=list)  # checkpoint pauses

    def get(self, name: str) -> float:
        return self.totals.get(name, 0.0)

    @property
    def processed(self) -> int:
        return round(
            self.get("stream_fm_events_total") + self.get("stream_fm_invalid_events_total")
        )


def scrape(url: str, timeout_s: float = 2.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    buckets: list[tuple[float, float]] = []
    batch_buckets: list[tuple[float, float]] = []
    lags: dict[tuple[str, int], float] = {}
    pause_buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if sample.name == LATENCY_HISTOGRAM + "_bucket":
                buckets.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name == BATCH_HISTOGRAM + "_bucket":
                batch_buckets.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name == PAUSE_HISTOGRAM + "_bucket":
                pause_buckets.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name == "stream_fm_consumer_lag" and "partition" in sample.labels:
                key = (sample.labels.get("topic", ""), int(sample.labels["partition"]))
                lags[key] = float(sample.value)
    buckets.sort()
    batch_buckets.sort()
    pause_buckets.sort()
    return Scrape(
        totals,
        buckets,
        totals.get(LATENCY_HISTOGRAM + "_sum", 0.0),
        totals.get(LATENCY_HISTOGRAM + "_count", 0.0),
        batch_buckets,
        lags,
        pause_buckets,
    )


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket.

    ``buckets`` are (upper bound, cumulative count), sorted, the last one ``+Inf``. A rank in
    the ``+Inf`` bucket answers the largest finite bound; no observations answer NaN.

    >>> b = [(0.001, 0.0), (0.0025, 50.0), (0.005, 99.0), (math.inf, 100.0)]
    >>> round(histogram_quantile(0.5, b), 6), round(histogram_quantile(0.99, b), 6)
    (0.0025, 0.005)
    >>> histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)])
    nan
    """
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _bucket_delta(
    after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]] | None
) -> list[tuple[float, float]]:
    if not before:
        return list(after)
    previous = dict(before)
    return [(le, count - previous.get(le, 0.0)) for le, count in after]


# --- processes -----------------------------------------------------------------------------
