"""Every phase's result, as frozen dataclasses, and the whole report (JSON-ready)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stream_fm.tools.bench.kafka.options import EXACT_LATENCY_MEASURES, LATENCY_MEASURES


@dataclass(frozen=True, slots=True)
class PreloadResult:
    topic: str
    records: int
    impressions: int
    clicks: int
    bytes: int
    seconds: float
    records_per_s: float


@dataclass(frozen=True, slots=True)
class CeilingResult:
    client: str  # kafka_client
    flush: str  # "end" or "every_poll"
    records: int
    produced: int
    seconds: float  # first records received -> everything acknowledged
    seconds_with_join: float  # consumer created -> everything acknowledged
    counted_after_first_poll: int
    events_per_s: float  # (records - first poll's) / seconds


@dataclass(frozen=True, slots=True)
class RssSample:
    events: int
    seconds: float  # since the first processed batch
    rss_mib: float


@dataclass(frozen=True, slots=True)
class QuixResult:
    """The bare Quix Streams application (``quix``): JSON in, filter, JSON out, no model."""

    records: int
    produced: int
    startup_s: float  # process start -> its first processed record
    seconds: float  # first processed record -> stopped (last commit and flush done)
    events_per_s: float  # (records - 1) / seconds
    quixstreams_version: str


@dataclass(frozen=True, slots=True)
class WorkerResult:
    client: str  # kafka_client
    records: int  # events_total + invalid_events_total at the end
    invalid: int
    predictions: int
    startup_s: float  # process start -> first processed batch seen on /metrics
    count_at_first: int
    steady_seconds: float
    events_per_s: float  # (records - count_at_first) / steady_seconds
    events_per_s_with_startup: float
    rss: list[RssSample]
    rss_start_mib: float
    rss_1m_mib: float | None
    rss_end_mib: float
    rss_peak_mib: float  # VmHWM, or the highest VmRSS sample when that is higher
    pending_end: int
    pending_max: int
    checkpoints: int
    checkpoint_bytes: int  # the last durable checkpoint file
    checkpoint_write_s: float  # its write beside the loop
    checkpoint_pause_p99_ms: float  # the loop's pause for a snapshot (histogram)
    longest_pause_ms: float  # stream_fm_loop_longest_pause_seconds
    exit_code: int | None
    summary: str
    profile: str  # the py-spy summary line ("" when not profiled)


@dataclass(frozen=True, slots=True)
class LatencyResult:
    client: str  # kafka_client
    offered_per_s: float
    produced: int
    achieved_offered_per_s: float  # from the input records' timestamps
    duration_s: float
    warmup_s: float
    observed: int  # histogram observations in the measured window
    p50_ms: float
    p99_ms: float
    p999_ms: float
    mean_ms: float
    exact_p50_ms: float
    exact_p99_ms: float
    exact_p999_ms: float
    exact_max_ms: float
    exact_count: int
    batches: int  # batches processed in the measured window
    batch_p50_ms: float  # poll-to-publish time of one batch (stream_fm_batch_seconds)
    batch_p99_ms: float
    backlog_at_producer_end: int
    drain_s: float
    final_consumer_lag: float | None
    kept_up: bool
    checkpoints: int  # checkpoints written inside the measured window
    longest_pause_ms: float  # the worker's longest pause between two polls, whole run
    exit_code: int | None


@dataclass(frozen=True, slots=True)
class ScaleOutWorker:
    name: str  # "single", "a", "b"
    records: int  # events_total + invalid_events_total at the end, re-processed ones included
    counted: int  # of those, processed inside the run's window (after its first batch)
    events_per_s: float  # counted / the run's seconds
    predictions: int  # stream_fm_predictions_total
    checkpoints: int
    startup_s: float | None  # process start -> its own first batch seen (None: none)
    partitions: list[int]  # input partitions in its stream_fm_consumer_lag series after the run
    exit_code: int | None
    summary: str


@dataclass(frozen=True, slots=True)
class ScaleOutRun:
    workers: list[ScaleOutWorker]
    group_id: str
    records: int  # processed by all its workers together (input + re-processed - lost)
    counted: int  # of those, inside the window
    count_at_first: int  # processed at the first batch seen, before the window
    seconds: float  # first batch of any worker -> everything processed and on the broker
    events_per_s: float  # counted / seconds
    predictions_on_broker: int  # high watermarks of its predictions topic
    impressions_without_prediction: int  # input impressions with no prediction on the broker
    # how the end was established: "counts" (processed == input, one prediction per
    # impression on the broker), "lag" (every partition seen at lag 0: re-processed records)
    # or "timeout" (the counts reached the input but the lag series never all showed 0)
    ended_by: str
    # two workers: the stretch while both were processing (after the later one's first batch,
    # until the first one had processed all it would), None for one worker
    both_busy_seconds: float | None
    both_busy_events_per_s: float | None


@dataclass(frozen=True, slots=True)
class ScaleOutResult:
    input_topic: str
    partitions: int
    input_records: int
    impressions: int
    preload_records_per_s: float
    single: ScaleOutRun  # one worker, its own group
    pair: ScaleOutRun  # two workers started together, one group, one checkpoint directory
    ratio_pair_to_single: float | None  # pair.events_per_s / single.events_per_s
    measures: str = (
        "records processed after the first batch of any worker of the run / seconds from that "
        "batch until every partition is consumed and every prediction is on the broker"
    )


@dataclass
class ClientRun:
    """One client's ceilings and the worker on it, measured back to back."""

    client: str
    ceiling: CeilingResult
    ceiling_flush_every_poll: CeilingResult
    worker: WorkerResult
    ratio_worker_to_ceiling: float | None


@dataclass
class SecuredRun:
    """The worker over the same topic again, through a SASL_SSL listener: what TLS and SCRAM
    cost against its PLAINTEXT run just before."""

    client: str
    protocol: str
    mechanism: str
    worker: WorkerResult
    plaintext_events_per_s: float
    ratio_to_plaintext: float | None


@dataclass(frozen=True, slots=True)
class ReleaseCeiling:
    requested: str  # the release asked for, or "installed"
    version: str  # what the child imported
    consumed: int
    produced: int
    seconds: float
    events_per_s: float
    peak_rss_mb: float
    stopped: str  # why the loop stopped early ("" when it consumed everything)


def client_versions() -> dict[str, str]:
    """The Kafka client libraries this run measured, as installed."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("kafka-python", "confluent-kafka", "quixstreams"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    try:
        import confluent_kafka

        versions["librdkafka"] = str(confluent_kafka.libversion()[0])
    except ImportError:
        pass
    return versions


@dataclass
class KafkaBenchReport:
    kafka_version: str
    bootstrap_servers: str
    options: dict[str, Any]
    preload: PreloadResult | None = None
    clients: list[ClientRun] = field(default_factory=list)
    quix: QuixResult | None = None
    latency: list[LatencyResult] = field(default_factory=list)
    scale_out: ScaleOutResult | None = None
    secured: SecuredRun | None = None
    releases: list[ReleaseCeiling] = field(default_factory=list)
    client_versions: dict[str, str] = field(default_factory=dict)
    latency_measures: str = LATENCY_MEASURES
    exact_latency_measures: str = EXACT_LATENCY_MEASURES

    def client(self, name: str) -> ClientRun | None:
        return next((run for run in self.clients if run.client == name), None)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return _json_safe(out)  # type: ignore[no-any-return]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --- metrics -------------------------------------------------------------------------------
