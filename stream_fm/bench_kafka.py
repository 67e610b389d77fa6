"""``stream-fm bench kafka``: the worker against a bare kafka-python loop, on a real broker.

One run, one broker, the same simulated records (impressions and clicks, 20 fields):

1. **preload** ``events`` records into an input topic (as fast as the producer goes);
2. **ceiling**: a bare loop over the worker's own kafka-python clients (``KafkaIO``'s consumer
   and producer, so every client setting is the worker's) that consumes the input topic from the
   beginning and produces one ~60-byte record per impression, nothing else; once with a single
   flush at the end, once flushing (awaiting every acknowledgement) after every poll;
3. **worker**: ``python -m stream_fm run`` as a child process over the same topic (fresh group,
   fresh checkpoint directory, checkpoints and metrics on), timed until its /metrics show
   ``events_total + invalid_events_total`` equal to the input count *and* the predictions
   topic's high watermarks (acknowledged records) add up to the impression count; start-up
   (imports, numba cache load, group join) is excluded by measuring from the first processed
   batch; VmRSS of the process is sampled along the way; then SIGTERM and the exit code;
4. **scale-out** (``scale_out_events`` > 0): its own input topic (``scale_out_partitions``
   partitions, the same simulated records), consumed once by one worker in a fresh group and
   once by two workers started together in one fresh group sharing one checkpoint directory,
   each run with fresh output topics. A run is timed from the first processed batch of any of
   its workers until the workers together processed the input and the predictions topic's
   high watermarks hold a prediction per impression; if records were re-processed (the start
   rebalance), until every input partition shows lag 0 in the workers'
   ``stream_fm_consumer_lag`` series and the predictions topic holds all they produced.
   Re-processed records are counted, not hidden (records processed in total vs the input);
   every impression is checked for a prediction on the broker; each worker's partitions are
   read from its lag series; SIGTERM and the exit codes;
5. **latency** at fixed offered rates: ``stream-fm simulate --rate R`` (the simulator's own
   pacing: bursts of 256 records) into a fresh topic while a fresh worker runs; quantiles come
   from the worker's histogram ``stream_fm_impression_to_prediction_seconds`` (the difference
   between a snapshot taken after a warm-up and one after the drain), and per record from the
   topics, end to end.

What the latency histogram measures (stream_fm/worker.py ``_observe``, called at the end of
each batch): wall clock then minus the input *record's Kafka timestamp* (CreateTime, stamped by
the producer at ``send``), not the event's ``ts`` field. The worker hands the batch's
predictions to its producer and awaits acknowledgements only before a checkpoint, so the
histogram includes the producer's linger, the broker, the worker's poll wait and the whole
batch, but not the predictions' own trip to the broker. The per-record figures do include it:
the latency phase's predictions topic uses ``LogAppendTime``, so a prediction's timestamp is
when the broker appended it.

>>> histogram_quantile(0.5, [(0.01, 0.0), (0.02, 10.0), (math.inf, 10.0)])
0.015
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from stream_fm.broker import KafkaBroker
from stream_fm.config import build_settings
from stream_fm.errors import StreamFMError
from stream_fm.kafka.admin import EventProducer, TopicReader, read_topic
from stream_fm.kafka.bare import IMPRESSION_PREFIX, consume_and_produce
from stream_fm.simulate import SimulationParams, Simulator
from stream_fm.tools.process import free_ports

LATENCY_HISTOGRAM = "stream_fm_impression_to_prediction_seconds"
BATCH_HISTOGRAM = "stream_fm_batch_seconds"
LATENCY_MEASURES = (
    "input record's Kafka timestamp (CreateTime, set by the producer at send) -> the worker's "
    "prediction for it handed to its producer (acknowledgements are awaited before each "
    "checkpoint, not per batch); not the event's ts field"
)
EXACT_LATENCY_MEASURES = (
    "per record from the topics, end to end: the prediction's broker append time (its topic "
    "uses LogAppendTime) minus the input record's CreateTime; 1 ms resolution"
)
LAG_REFRESH_WAIT_S = 8.0  # the worker refreshes its lag gauge every 5 s
START_TIMEOUT_S = 300.0  # a first run compiles the numba kernels
STALL_TIMEOUT_S = 120.0
MIB = 1024.0

Say = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True, slots=True)
class KafkaBenchOptions:
    events: int = 5_000_000
    partitions: int = 2
    rates: tuple[float, ...] = (1_000.0, 10_000.0)
    latency_duration_s: float = 25.0
    latency_warmup_s: float = 5.0
    impressions_per_s: float = 10.0  # event time of the simulated data
    attribution_window_s: float = 3600.0
    seed: int = 7
    labels: bool = False  # also publish the worker's labels topic
    poll_interval_s: float = 0.1
    py_spy: Path | None = None  # profile the worker phase with py-spy into this file
    work_dir: Path | None = None
    scale_out_events: int = 1_000_000  # records of the scale-out phase; 0 = no such phase
    scale_out_partitions: int = 4

    def __post_init__(self) -> None:
        if self.events < 1:
            raise StreamFMError("bench kafka: --events must be >= 1")
        if self.partitions < 1:
            raise StreamFMError("bench kafka: --partitions must be >= 1")
        if any(r <= 0 for r in self.rates):
            raise StreamFMError("bench kafka: every rate must be > 0")
        if self.latency_duration_s <= 0 or self.latency_warmup_s < 0:
            raise StreamFMError("bench kafka: latency duration must be > 0, warm-up >= 0")
        if self.scale_out_events < 0:
            raise StreamFMError("bench kafka: --scale-out-events must be >= 0 (0: no scale-out)")
        if self.scale_out_partitions < 1:
            raise StreamFMError("bench kafka: --scale-out-partitions must be >= 1")


# --- results -------------------------------------------------------------------------------


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
class WorkerResult:
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
    rss_peak_mib: float  # VmHWM
    pending_end: int
    pending_max: int
    checkpoints: int
    exit_code: int | None
    summary: str
    profiled: bool


@dataclass(frozen=True, slots=True)
class LatencyResult:
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
class KafkaBenchReport:
    kafka_version: str
    bootstrap_servers: str
    options: dict[str, Any]
    preload: PreloadResult | None = None
    ceiling: CeilingResult | None = None
    ceiling_flush_every_poll: CeilingResult | None = None
    worker: WorkerResult | None = None
    ratio_worker_to_ceiling: float | None = None
    latency: list[LatencyResult] = field(default_factory=list)
    scale_out: ScaleOutResult | None = None
    latency_measures: str = LATENCY_MEASURES
    exact_latency_measures: str = EXACT_LATENCY_MEASURES

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


@dataclass(frozen=True, slots=True)
class Scrape:
    totals: dict[str, float]  # samples summed over labels, by sample name
    buckets: list[tuple[float, float]]  # the latency histogram: (le, cumulative count)
    latency_sum: float
    latency_count: float
    batch_buckets: list[tuple[float, float]]  # stream_fm_batch_seconds, the same way
    # stream_fm_consumer_lag by (topic, partition): the partitions the worker owns (reported)
    lags: dict[tuple[str, int], float] = field(default_factory=dict)

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
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if sample.name == LATENCY_HISTOGRAM + "_bucket":
                buckets.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name == BATCH_HISTOGRAM + "_bucket":
                batch_buckets.append((float(sample.labels["le"]), float(sample.value)))
            elif sample.name == "stream_fm_consumer_lag" and "partition" in sample.labels:
                key = (sample.labels.get("topic", ""), int(sample.labels["partition"]))
                lags[key] = float(sample.value)
    buckets.sort()
    batch_buckets.sort()
    return Scrape(
        totals,
        buckets,
        totals.get(LATENCY_HISTOGRAM + "_sum", 0.0),
        totals.get(LATENCY_HISTOGRAM + "_count", 0.0),
        batch_buckets,
        lags,
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


def _status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


class WorkerProcess:
    """``python -m stream_fm run`` as a child, configured by STREAM_FM_* like the demo's."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: dict[str, str],
        work: Path,
        name: str,
        attribution_window_s: float,
        group_id: str | None = None,
        checkpoint_dir: Path | None = None,
    ) -> None:
        """``group_id`` and ``checkpoint_dir`` default to ones of this worker alone (from
        ``name``); pass the same ones to several workers to run them as one group."""
        self.name = name
        self.group_id = group_id or f"bench-{name}-{uuid.uuid4().hex[:8]}"
        self.checkpoint_dir = checkpoint_dir or work / f"{name}-checkpoints"
        self.port = free_ports()[0]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("STREAM_FM_LABELS_TOPIC", None)
        env.update(
            {
                "STREAM_FM_BOOTSTRAP_SERVERS": bootstrap_servers,
                "STREAM_FM_INPUT_TOPICS": topics["input"],
                "STREAM_FM_PREDICTIONS_TOPIC": topics["predictions"],
                "STREAM_FM_DEAD_LETTER_TOPIC": topics["dead_letters"],
                "STREAM_FM_GROUP_ID": self.group_id,
                "STREAM_FM_CHECKPOINT_DIR": str(self.checkpoint_dir),
                "STREAM_FM_METRICS_HOST": "127.0.0.1",
                "STREAM_FM_METRICS_PORT": str(self.port),
                "STREAM_FM_ATTRIBUTION_WINDOW_S": str(attribution_window_s),
                "STREAM_FM_LOG_LEVEL": "WARNING",
            }
        )
        if topics.get("labels"):
            env["STREAM_FM_LABELS_TOPIC"] = topics["labels"]
        self.log_path = work / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._terminated = False
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stream_fm", "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise StreamFMError(
                f"bench kafka: the {self.name} worker exited with {self.process.returncode}:\n"
                + self.log_tail()
            )

    def scrape(self) -> Scrape | None:
        """The worker's /metrics, or None while its server does not answer yet."""
        self._check_alive()
        try:
            return scrape(self.url + "/metrics")
        except (OSError, urllib.error.URLError):
            return None

    def ready(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise StreamFMError(
                    f"bench kafka: the {self.name} worker was not ready after {timeout_s:.0f}s:\n"
                    + self.log_tail()
                )
            time.sleep(0.1)

    def rss_mib(self) -> float:
        return _status_kib(self.pid, "VmRSS") / MIB

    def peak_mib(self) -> float:
        return _status_kib(self.pid, "VmHWM") / MIB

    def terminate(self) -> None:
        """SIGTERM without waiting (``stop()`` then waits): several workers stop together."""
        if self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the worker drains, checkpoints, exits); kill after ``timeout_s``."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def summary(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        found = [line for line in text.splitlines() if "worker stopped" in line]
        return found[-1] if found else ""


class PySpy:
    """``py-spy record`` attached to a pid; ``stop()`` makes it write its file (SIGINT)."""

    def __init__(self, pid: int, out: Path, log: Path) -> None:
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
        exe = Path(sys.executable).with_name("py-spy")
        command = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid)]
        # --idle and --threads: wall time, waits included, per thread (main loop vs client IO).
        # Blocking sampling (py-spy's default) pauses the worker briefly at each sample but
        # gives consistent stacks; --nonblocking garbles fast-changing ones.
        command += ["--rate", "100", "--idle", "--threads"]
        command += ["--format", fmt, "--output", str(out)]
        self.out = out
        self._log = log.open("wb")
        try:
            self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        except OSError as error:
            self._log.close()
            raise StreamFMError(f"bench kafka: cannot start py-spy ({error})") from error

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# --- phases --------------------------------------------------------------------------------


def _topics(run_id: str, name: str, labels: bool) -> dict[str, str]:
    topics = {
        "input": f"bench-{run_id}-{name}-input",
        "predictions": f"bench-{run_id}-{name}-predictions",
        "dead_letters": f"bench-{run_id}-{name}-dlq",
    }
    if labels:
        topics["labels"] = f"bench-{run_id}-{name}-labels"
    return topics


def simulated_records(options: KafkaBenchOptions) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the first ``options.events`` simulated events, in event-time order."""
    params = SimulationParams(
        n_impressions=0,  # unbounded, streamed: the first ``events`` are taken
        n_fields=20,
        impressions_per_s=options.impressions_per_s,
        attribution_window_s=options.attribution_window_s,
        seed=options.seed,
    )
    for event in islice(Simulator(params).events(), options.events):
        yield event["id"].encode(), orjson.dumps(event)


def preload(
    bootstrap_servers: str,
    topic: str,
    options: KafkaBenchOptions,
    impression_keys: set[bytes] | None = None,
) -> PreloadResult:
    """Produce ``options.events`` simulated records; collect the impressions' keys (ids) into
    ``impression_keys`` if given."""
    producer = EventProducer(bootstrap_servers)
    records = impressions = size = 0
    started = time.monotonic()
    try:
        for key, value in simulated_records(options):
            producer.send(topic, key, value)
            records += 1
            size += len(value)
            if value.startswith(IMPRESSION_PREFIX):
                impressions += 1
                if impression_keys is not None:
                    impression_keys.add(key)
        producer.flush(timeout_s=600)
    finally:
        producer.close()
    seconds = time.monotonic() - started
    return PreloadResult(
        topic, records, impressions, records - impressions, size, seconds, records / seconds
    )


def measure_ceiling(
    bootstrap_servers: str, input_topic: str, output_topic: str, expected: int, flush: str
) -> CeilingResult:
    """Consume ``expected`` records from the beginning, produce one small record per impression,
    on the worker's own client settings (``stream_fm.kafka.bare``), nothing else."""
    settings = build_settings(
        {
            "bootstrap_servers": bootstrap_servers,
            "group_id": f"bench-ceiling-{uuid.uuid4().hex[:8]}",
            "client_id": "stream-fm-bench-ceiling",
        }
    )
    run = consume_and_produce(
        settings,
        input_topic,
        output_topic,
        expected,
        flush_every_poll=flush == "every_poll",
        stall_timeout_s=STALL_TIMEOUT_S,
    )
    seconds = run.ended_s - run.first_s
    return CeilingResult(
        flush=flush,
        records=run.consumed,
        produced=run.produced,
        seconds=seconds,
        seconds_with_join=run.ended_s - run.started_s,
        counted_after_first_poll=run.first_count,
        events_per_s=(run.consumed - run.first_count) / seconds if seconds > 0 else math.nan,
    )


def _milestones(expected: int) -> list[int]:
    """Event counts at which to sample RSS: every tenth of the run, and 1M when it is passed."""
    marks = {max(1, expected * i // 10) for i in range(1, 11)}
    if expected >= 1_000_000:
        marks.add(1_000_000)
    return sorted(marks)


def measure_worker(
    bootstrap_servers: str,
    topics: dict[str, str],
    expected: int,
    expected_predictions: int,
    work: Path,
    options: KafkaBenchOptions,
    say: Say,
) -> WorkerResult:
    worker = WorkerProcess(
        bootstrap_servers, topics, work, "throughput", options.attribution_window_s
    )
    profiler: PySpy | None = None
    watermarks = Watermarks(bootstrap_servers, topics["predictions"])
    try:
        first: tuple[float, int] | None = None
        samples: list[RssSample] = []
        marks = _milestones(expected)
        pending_max = 0
        last: Scrape | None = None
        last_progress = (time.monotonic(), -1)
        report_every_s, last_report = 10.0, time.monotonic()
        while True:
            time.sleep(options.poll_interval_s)
            s = worker.scrape()
            now = time.monotonic()
            if s is None:
                if now - worker.started > START_TIMEOUT_S:
                    raise StreamFMError("bench kafka: the worker's /metrics never answered")
                continue
            last = s
            done = s.processed
            pending_max = max(pending_max, round(s.get("stream_fm_pending_impressions")))
            if done != last_progress[1]:
                last_progress = (now, done)
            elif now - last_progress[0] > (START_TIMEOUT_S if first is None else STALL_TIMEOUT_S):
                raise StreamFMError(
                    f"bench kafka: the worker stalled at {done:,} of {expected:,} records:\n"
                    + worker.log_tail()
                )
            if done > 0 and first is None:
                first = (now, done)
                samples.append(RssSample(done, 0.0, worker.rss_mib()))
                if options.py_spy is not None:
                    profiler = PySpy(worker.pid, options.py_spy, work / "py-spy.log")
            if first is not None:
                while marks and marks[0] <= done:
                    marks.pop(0)
                    samples.append(RssSample(done, now - first[0], worker.rss_mib()))
                if now - last_report >= report_every_s:
                    last_report = now
                    rate = (done - first[1]) / max(now - first[0], 1e-9)
                    say(
                        f"bench kafka: worker {done:,}/{expected:,} records, {rate:,.0f}/s, "
                        f"RSS {worker.rss_mib():,.0f} MiB"
                    )
            # The worker awaits acknowledgements only before a checkpoint: count what the
            # broker holds, not what the worker queued.
            if done >= expected and watermarks.total() >= expected_predictions:
                ended = now
                break
        assert first is not None and last is not None
        if profiler is not None:
            profiler.stop()
            profiler = None
        peak = worker.peak_mib()
    finally:
        if profiler is not None:
            profiler.stop()
        watermarks.close()
        exit_code = worker.stop()
    steady = ended - first[0]
    rss_1m = next((x.rss_mib for x in samples if x.events >= 1_000_000), None)
    # De-duplicate samples taken at the same scrape (several marks passed at once).
    unique: dict[int, RssSample] = {}
    for sample in samples:
        unique.setdefault(sample.events, sample)
    return WorkerResult(
        records=last.processed,
        invalid=round(last.get("stream_fm_invalid_events_total")),
        predictions=round(last.get("stream_fm_predictions_total")),
        startup_s=first[0] - worker.started,
        count_at_first=first[1],
        steady_seconds=steady,
        events_per_s=(last.processed - first[1]) / steady if steady > 0 else math.nan,
        events_per_s_with_startup=last.processed / (ended - worker.started),
        rss=list(unique.values()),
        rss_start_mib=samples[0].rss_mib,
        rss_1m_mib=rss_1m,
        rss_end_mib=samples[-1].rss_mib,
        rss_peak_mib=peak,
        pending_end=round(last.get("stream_fm_pending_impressions")),
        pending_max=pending_max,
        checkpoints=round(last.get("stream_fm_checkpoints_total")),
        exit_code=exit_code,
        summary=worker.summary(),
        profiled=options.py_spy is not None,
    )


class Watermarks:
    """Records the broker acknowledged (acks=all) in one topic: its high watermarks' sum."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self._reader = TopicReader(bootstrap_servers)
        self._topic = topic

    def total(self) -> int:
        return self._reader.total(self._topic)

    def close(self) -> None:
        self._reader.close()


def read_timestamps(
    bootstrap_servers: str, topic: str, expected: int, impressions_only: bool = False
) -> dict[bytes, int]:
    """key -> record timestamp (ms) of a whole topic, read from the beginning."""
    records = read_topic(bootstrap_servers, topic, timeout_s=STALL_TIMEOUT_S)
    if len(records) < expected:
        raise StreamFMError(
            f"bench kafka: {topic} holds {len(records):,} records, {expected:,} expected"
        )
    return {
        r.key or b"": int(r.timestamp)
        for r in records
        if not impressions_only or (r.value or b"").startswith(IMPRESSION_PREFIX)
    }


def measure_latency(
    broker: KafkaBroker, rate: float, run_id: str, work: Path, options: KafkaBenchOptions, say: Say
) -> LatencyResult:
    bootstrap = broker.bootstrap_servers
    topics = _topics(run_id, f"latency-{rate:g}", options.labels)
    others = [t for name, t in topics.items() if name != "predictions"]
    broker.create_topics(others, partitions=options.partitions)
    # The broker stamps each prediction when it appends it: end-to-end latency per record.
    broker.create_topics(
        [topics["predictions"]],
        partitions=options.partitions,
        configs={"message.timestamp.type": "LogAppendTime"},
    )
    worker = WorkerProcess(
        bootstrap, topics, work, f"latency-{rate:g}", options.attribution_window_s
    )
    simulator: subprocess.Popen[bytes] | None = None
    try:
        worker.wait_ready()
        simulate = [
            sys.executable, "-m", "stream_fm", "simulate",
            "--bootstrap-servers", bootstrap, "--topic", topics["input"],
            "--rate", str(rate), "--duration-s", str(options.latency_duration_s),
            "--fields", "20", "--seed", str(options.seed + 1),
            "--impressions-per-s", str(options.impressions_per_s),
            "--attribution-window-s", str(options.attribution_window_s),
        ]  # fmt: skip
        # To a file, not a pipe: a chatty simulator must never block on a full pipe.
        simulator_log = work / f"simulate-{rate:g}.log"
        with simulator_log.open("wb") as sink:
            simulator = subprocess.Popen(simulate, stdout=sink, stderr=subprocess.STDOUT)
        first_s: float | None = None
        before: Scrape | None = None
        window_start_ms: int | None = None
        s: Scrape | None = None
        while simulator.poll() is None:
            time.sleep(options.poll_interval_s)
            s = worker.scrape()
            if s is None:
                continue
            now = time.monotonic()
            if first_s is None and s.processed > 0:
                first_s = now
            if first_s is not None and before is None and now - first_s >= options.latency_warmup_s:
                before = s
                window_start_ms = int(time.time() * 1000)
        producer_end = time.monotonic()
        output = simulator_log.read_text(errors="replace")
        if simulator.returncode != 0:
            raise StreamFMError(f"bench kafka: the simulator failed:\n{output[-2000:]}")
        found = re.search(r"wrote ([\d,]+) events", output)
        if found is None:
            raise StreamFMError(f"bench kafka: unexpected simulator output:\n{output[-2000:]}")
        produced = int(found.group(1).replace(",", ""))
        s = worker.scrape()
        backlog = produced - (s.processed if s is not None else 0)
        while s is None or s.processed < produced:
            if time.monotonic() - producer_end > STALL_TIMEOUT_S:
                raise StreamFMError(
                    f"bench kafka: the worker did not drain {rate:g}/s within {STALL_TIMEOUT_S:.0f}s"
                )
            time.sleep(options.poll_interval_s)
            s = worker.scrape()
        drain_s = time.monotonic() - producer_end
        after = s
        lag_deadline = time.monotonic() + LAG_REFRESH_WAIT_S
        final_lag: float | None = None
        while time.monotonic() < lag_deadline:
            s = worker.scrape()
            if s is not None and "stream_fm_consumer_lag" in s.totals:
                final_lag = s.get("stream_fm_consumer_lag")
                if final_lag == 0:
                    break
            time.sleep(0.5)
    finally:
        if simulator is not None and simulator.poll() is None:
            simulator.terminate()
            simulator.wait()
        exit_code = worker.stop()
    window = _bucket_delta(after.buckets, before.buckets if before is not None else None)
    observed = window[-1][1] if window else 0.0
    sum_s = after.latency_sum - (before.latency_sum if before is not None else 0.0)
    batch_window = _bucket_delta(
        after.batch_buckets, before.batch_buckets if before is not None else None
    )
    # Per record, from the topics: input CreateTime vs the prediction's LogAppendTime.
    inputs = read_timestamps(bootstrap, topics["input"], produced, impressions_only=True)
    predicted = read_timestamps(
        bootstrap, topics["predictions"], round(after.get("stream_fm_predictions_total"))
    )
    start_ms = window_start_ms if window_start_ms is not None else 0
    exact = np.array(
        [predicted[k] - ts for k, ts in inputs.items() if ts >= start_ms and k in predicted],
        dtype=np.float64,
    )
    times = np.fromiter(inputs.values(), dtype=np.float64)
    span_s = (times.max() - times.min()) / 1000 if times.size > 1 else math.nan
    achieved = produced / span_s if span_s and span_s > 0 else math.nan
    result = LatencyResult(
        offered_per_s=rate,
        produced=produced,
        achieved_offered_per_s=achieved,
        duration_s=options.latency_duration_s,
        warmup_s=options.latency_warmup_s if before is not None else 0.0,
        observed=round(observed),
        p50_ms=histogram_quantile(0.5, window) * 1000,
        p99_ms=histogram_quantile(0.99, window) * 1000,
        p999_ms=histogram_quantile(0.999, window) * 1000,
        mean_ms=sum_s / observed * 1000 if observed else math.nan,
        exact_p50_ms=float(np.percentile(exact, 50)) if exact.size else math.nan,
        exact_p99_ms=float(np.percentile(exact, 99)) if exact.size else math.nan,
        exact_p999_ms=float(np.percentile(exact, 99.9)) if exact.size else math.nan,
        exact_max_ms=float(exact.max()) if exact.size else math.nan,
        exact_count=int(exact.size),
        batches=round(batch_window[-1][1]) if batch_window else 0,
        batch_p50_ms=histogram_quantile(0.5, batch_window) * 1000,
        batch_p99_ms=histogram_quantile(0.99, batch_window) * 1000,
        backlog_at_producer_end=backlog,
        drain_s=drain_s,
        final_consumer_lag=final_lag,
        kept_up=backlog <= max(rate, 1.0),
        exit_code=exit_code,
    )
    say(
        f"bench kafka: {rate:,.0f}/s offered: p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"backlog at producer end {backlog:,}"
    )
    return result


LAG_CONFIRM_S = 2 * LAG_REFRESH_WAIT_S  # how long a run waits for its lag series after the counts


@dataclass(frozen=True, slots=True)
class _Window:
    first_s: float  # the first processed batch of any worker was seen
    counts_at_first: list[int]
    own_first_s: list[float | None]  # each worker's own first batch
    ended_s: float
    last: list[Scrape]  # each worker's final scrape
    on_broker: int  # high watermarks of the predictions topic at the end
    ended_by: str
    both_busy: tuple[float, int] | None  # (seconds, records) while every worker was busy


def _all_consumed(scrapes: Sequence[Scrape], topic: str, partitions: int) -> bool:
    """Every partition of ``topic`` in some worker's lag series, and all of them at 0."""
    lags = [(p, lag) for s in scrapes for (t, p), lag in s.lags.items() if t == topic]
    return {p for p, _ in lags} == set(range(partitions)) and all(lag == 0 for _, lag in lags)


def _both_busy(
    samples: Sequence[tuple[float, list[int], int]], final: Sequence[int]
) -> tuple[float, int] | None:
    """(seconds, records) from the first scrape at which every worker had processed something
    to the first at which one of them had processed all it would: the shared stretch, without
    the start (one worker alone until the rebalance) and the tail (one worker left)."""
    start = next((x for x in samples if all(c > 0 for c in x[1])), None)
    end = next((x for x in samples if any(c >= f for c, f in zip(x[1], final, strict=True))), None)
    if start is None or end is None or end[0] <= start[0]:
        return None
    return end[0] - start[0], sum(end[1]) - sum(start[1])


def _watch_group(
    workers: Sequence[WorkerProcess],
    watermarks: Watermarks,
    topic: str,
    partitions: int,
    expected: int,
    impressions: int,
    options: KafkaBenchOptions,
    say: Say,
    label: str,
) -> _Window:
    """Scrape ``workers`` (one group over ``topic``) until the input is processed.

    Done ("counts") when the processed total is exactly the input and the predictions topic
    holds exactly one record per impression, as many as the workers counted; otherwise
    (records re-processed, or some never processed) done ("lag") when every partition is seen
    at lag 0 in the workers' lag series and the predictions topic holds every prediction the
    workers counted; failing that ("timeout"), ``LAG_CONFIRM_S`` after the counts reached the
    input and stopped moving. The end is then the first scrape at which the processed total
    and the watermarks had reached their final values, so waiting for the lag series (5 s
    refresh) does not lengthen the window.
    """
    started = min(w.started for w in workers)
    last: list[Scrape | None] = [None] * len(workers)
    own_first: list[float | None] = [None] * len(workers)
    first: tuple[float, list[int]] | None = None
    samples: list[tuple[float, list[int], int]] = []  # (time, processed by each, watermarks)
    changed = (time.monotonic(), -1, -1)  # last time the (processed, watermarks) pair moved
    report_every_s, last_report = 10.0, time.monotonic()
    while True:
        time.sleep(options.poll_interval_s)
        for i, worker in enumerate(workers):
            s = worker.scrape()
            if s is not None:
                last[i] = s
        now = time.monotonic()
        scrapes = [s for s in last if s is not None]
        if len(scrapes) < len(workers):
            if now - started > START_TIMEOUT_S:
                raise StreamFMError(f"bench kafka: {label}: a worker's /metrics never answered")
            continue
        counts = [s.processed for s in scrapes]
        total = sum(counts)
        for i, count in enumerate(counts):
            if own_first[i] is None and count > 0:
                own_first[i] = now
        if first is None:
            if total == 0:
                if now - started > START_TIMEOUT_S:
                    raise StreamFMError(
                        f"bench kafka: {label}: nothing processed after {START_TIMEOUT_S:.0f}s:\n"
                        + "\n".join(w.log_tail(5) for w in workers)
                    )
                continue
            first = (now, counts)
        on_broker = watermarks.total()
        samples.append((now, counts, on_broker))
        if (total, on_broker) != changed[1:]:
            changed = (now, total, on_broker)
        predicted = sum(round(s.get("stream_fm_predictions_total")) for s in scrapes)
        reached = total >= expected and on_broker >= impressions
        if total == expected and on_broker == predicted == impressions:
            ended_by = "counts"
            break
        if _all_consumed(scrapes, topic, partitions) and on_broker >= predicted:
            ended_by = "lag"
            break
        if reached and now - changed[0] > LAG_CONFIRM_S:
            ended_by = "timeout"
            break
        if not reached and now - changed[0] > STALL_TIMEOUT_S:
            raise StreamFMError(
                f"bench kafka: {label}: stalled at {total:,} of {expected:,} records, "
                f"{on_broker:,} of {impressions:,} predictions:\n"
                + "\n".join(w.log_tail(5) for w in workers)
            )
        if now - last_report >= report_every_s:
            last_report = now
            rate = (total - sum(first[1])) / max(now - first[0], 1e-9)
            say(
                f"bench kafka: {label}: {total:,}/{expected:,} records "
                f"({' + '.join(f'{c:,}' for c in counts)}), {rate:,.0f}/s"
            )
    assert first is not None
    final_counts, final_on_broker = samples[-1][1], samples[-1][2]
    ended = next(
        t
        for t, c, b in samples
        if b >= final_on_broker and all(x >= f for x, f in zip(c, final_counts, strict=True))
    )
    return _Window(
        first_s=first[0],
        counts_at_first=first[1],
        own_first_s=own_first,
        ended_s=ended,
        last=scrapes,
        on_broker=final_on_broker,
        ended_by=ended_by,
        both_busy=_both_busy(samples, final_counts) if len(workers) > 1 else None,
    )


def _await_partitions(
    workers: Sequence[WorkerProcess], topic: str, partitions: int
) -> list[list[int]]:
    """Each worker's partitions of ``topic``, from its lag series (refreshed every 5 s): waits
    up to ``LAG_REFRESH_WAIT_S`` for the series to cover every partition exactly once, after
    the measured window; else what they show then."""
    deadline = time.monotonic() + LAG_REFRESH_WAIT_S
    while True:
        scrapes = [w.scrape() for w in workers]
        owned = [
            sorted(p for t, p in s.lags if t == topic) if s is not None else [] for s in scrapes
        ]
        flat = [p for ps in owned for p in ps]
        if sorted(flat) == list(range(partitions)) or time.monotonic() > deadline:
            return owned
        time.sleep(0.25)


def _scale_out_run(
    bootstrap_servers: str,
    topics: dict[str, str],
    names: Sequence[str],
    inputs: PreloadResult,
    impression_keys: set[bytes],
    work: Path,
    options: KafkaBenchOptions,
    say: Say,
    label: str,
) -> ScaleOutRun:
    """``len(names)`` workers started together in one fresh group sharing one checkpoint dir."""
    group_id = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    checkpoints = work / f"{label}-checkpoints"
    workers: list[WorkerProcess] = []
    watermarks = Watermarks(bootstrap_servers, topics["predictions"])
    try:
        for name in names:
            workers.append(
                WorkerProcess(
                    bootstrap_servers,
                    topics,
                    work,
                    f"{label}-{name}" if len(names) > 1 else label,
                    options.attribution_window_s,
                    group_id=group_id,
                    checkpoint_dir=checkpoints,
                )
            )
        window = _watch_group(
            workers,
            watermarks,
            topics["input"],
            options.scale_out_partitions,
            inputs.records,
            inputs.impressions,
            options,
            say,
            label,
        )
        owned = _await_partitions(workers, topics["input"], options.scale_out_partitions)
    finally:
        watermarks.close()
        for worker in workers:
            worker.terminate()
        exit_codes = [worker.stop() for worker in workers]
    seconds = window.ended_s - window.first_s
    predicted = read_timestamps(bootstrap_servers, topics["predictions"], window.on_broker)
    missing = len(impression_keys - predicted.keys())
    results = []
    for i, (name, worker) in enumerate(zip(names, workers, strict=True)):
        s = window.last[i]
        counted = s.processed - window.counts_at_first[i]
        own_first = window.own_first_s[i]
        results.append(
            ScaleOutWorker(
                name=name,
                records=s.processed,
                counted=counted,
                events_per_s=counted / seconds if seconds > 0 else math.nan,
                predictions=round(s.get("stream_fm_predictions_total")),
                checkpoints=round(s.get("stream_fm_checkpoints_total")),
                startup_s=own_first - worker.started if own_first is not None else None,
                partitions=owned[i],
                exit_code=exit_codes[i],
                summary=worker.summary(),
            )
        )
    counted = sum(w.counted for w in results)
    busy = window.both_busy
    return ScaleOutRun(
        workers=results,
        group_id=group_id,
        records=sum(w.records for w in results),
        counted=counted,
        count_at_first=sum(window.counts_at_first),
        seconds=seconds,
        events_per_s=counted / seconds if seconds > 0 else math.nan,
        predictions_on_broker=window.on_broker,
        impressions_without_prediction=missing,
        ended_by=window.ended_by,
        both_busy_seconds=busy[0] if busy is not None else None,
        both_busy_events_per_s=busy[1] / busy[0] if busy is not None else None,
    )


def measure_scale_out(
    broker: KafkaBroker, run_id: str, work: Path, options: KafkaBenchOptions, say: Say
) -> ScaleOutResult:
    """One worker over a topic, then two workers in one group over the same topic."""
    bootstrap = broker.bootstrap_servers
    n = options.scale_out_partitions
    input_topic = _topics(run_id, "scale-out", False)["input"]
    runs = {
        label: {**_topics(run_id, label, options.labels), "input": input_topic}
        for label in ("scale-out-1", "scale-out-2")
    }
    outputs = [t for topics in runs.values() for name, t in topics.items() if name != "input"]
    broker.create_topics([input_topic, *outputs], partitions=n)
    say(
        f"bench kafka: scale-out: preloading {options.scale_out_events:,} simulated records "
        f"into {input_topic} ({n} partitions) ..."
    )
    impression_keys: set[bytes] = set()
    events = replace(options, events=options.scale_out_events)
    inputs = preload(bootstrap, input_topic, events, impression_keys)
    if len(impression_keys) != inputs.impressions:
        raise StreamFMError(
            f"bench kafka: scale-out: {len(impression_keys):,} distinct impression ids in "
            f"{inputs.impressions:,} impressions"
        )
    say(f"bench kafka: scale-out: one worker over {inputs.records:,} records ...")
    single = _scale_out_run(
        bootstrap, runs["scale-out-1"], ["single"], inputs, impression_keys, work, options, say,
        "scale-out-1",
    )  # fmt: skip
    say(f"bench kafka: scale-out: one worker {single.events_per_s:,.0f} events/s")
    say("bench kafka: scale-out: two workers in one group, started together ...")
    pair = _scale_out_run(
        bootstrap, runs["scale-out-2"], ["a", "b"], inputs, impression_keys, work, options, say,
        "scale-out-2",
    )  # fmt: skip
    say(
        f"bench kafka: scale-out: two workers {pair.events_per_s:,.0f} events/s together "
        f"({' + '.join(f'{w.events_per_s:,.0f}' for w in pair.workers)}), "
        f"{pair.records:,} records processed for {inputs.records:,} input"
    )
    return ScaleOutResult(
        input_topic=input_topic,
        partitions=n,
        input_records=inputs.records,
        impressions=inputs.impressions,
        preload_records_per_s=inputs.records_per_s,
        single=single,
        pair=pair,
        ratio_pair_to_single=(
            pair.events_per_s / single.events_per_s if single.events_per_s > 0 else None
        ),
    )


# --- the run -------------------------------------------------------------------------------


def run_kafka_bench(
    options: KafkaBenchOptions, broker: KafkaBroker | None = None, say: Say = _stderr
) -> KafkaBenchReport:
    """All phases on ``broker`` (or on a broker of its own, started and stopped here)."""
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="stream-fm-bench-kafka-"))
    work.mkdir(parents=True, exist_ok=True)
    # The preloading producer's IO thread waits for the GIL while this thread builds records;
    # kafka-python then warns about every slow selector task. Not a finding: keep it quiet.
    selector_log = logging.getLogger("kafka.net.selector")
    level = selector_log.level
    selector_log.setLevel(logging.ERROR)
    try:
        if broker is None:
            say("bench kafka: starting Apache Kafka (KRaft) ...")
            with KafkaBroker(log_path=work / "kafka.log", partitions=options.partitions) as own:
                return _run(options, own, work, say)
        return _run(options, broker, work, say)
    finally:
        selector_log.setLevel(level)


def main_kafka_bench(options: KafkaBenchOptions, json_path: Path | None = None) -> int:
    """``stream-fm bench kafka``: the report to stdout (and JSON); exit 1 if a worker failed."""
    import json

    report = run_kafka_bench(options)
    print(format_report(report), flush=True)
    if json_path:
        json_path.write_text(json.dumps(report.as_dict(), indent=2))
    failed = [r.exit_code for r in report.latency] + [
        report.worker.exit_code if report.worker else 0
    ]
    if report.scale_out is not None:
        runs = (report.scale_out.single, report.scale_out.pair)
        failed += [w.exit_code for run in runs for w in run.workers]
    return 0 if all(code == 0 for code in failed) else 1


def _run(options: KafkaBenchOptions, broker: KafkaBroker, work: Path, say: Say) -> KafkaBenchReport:
    run_id = uuid.uuid4().hex[:6]
    bootstrap = broker.bootstrap_servers
    report = KafkaBenchReport(
        kafka_version=broker.kafka_version,
        bootstrap_servers=bootstrap,
        options=_json_safe(asdict(options)),
    )
    say(f"bench kafka: Kafka {broker.kafka_version} on {bootstrap}; work dir {work}")
    topics = _topics(run_id, "throughput", options.labels)
    ceiling_topics = [f"bench-{run_id}-ceiling-end", f"bench-{run_id}-ceiling-every-poll"]
    broker.create_topics([*topics.values(), *ceiling_topics], partitions=options.partitions)

    say(f"bench kafka: preloading {options.events:,} simulated records into {topics['input']} ...")
    report.preload = preload(bootstrap, topics["input"], options)
    expected = report.preload.records
    say(
        f"bench kafka: preloaded {expected:,} records ({report.preload.bytes / 1e6:,.0f} MB) "
        f"at {report.preload.records_per_s:,.0f}/s"
    )

    say("bench kafka: ceiling (bare consume + produce, one flush at the end) ...")
    report.ceiling = measure_ceiling(bootstrap, topics["input"], ceiling_topics[0], expected, "end")
    say(f"bench kafka: ceiling {report.ceiling.events_per_s:,.0f} events/s")
    say("bench kafka: ceiling (flush after every poll) ...")
    report.ceiling_flush_every_poll = measure_ceiling(
        bootstrap, topics["input"], ceiling_topics[1], expected, "every_poll"
    )
    say(f"bench kafka: ceiling {report.ceiling_flush_every_poll.events_per_s:,.0f} events/s")

    say("bench kafka: the worker over the same topic ...")
    report.worker = measure_worker(
        bootstrap, topics, expected, report.preload.impressions, work, options, say
    )
    say(
        f"bench kafka: worker {report.worker.events_per_s:,.0f} events/s, "
        f"exit code {report.worker.exit_code}"
    )
    if report.ceiling.events_per_s > 0:
        report.ratio_worker_to_ceiling = report.worker.events_per_s / report.ceiling.events_per_s

    if options.scale_out_events > 0:
        report.scale_out = measure_scale_out(broker, run_id, work, options, say)

    for rate in options.rates:
        say(f"bench kafka: latency at {rate:,.0f} events/s for {options.latency_duration_s:g}s ...")
        report.latency.append(measure_latency(broker, rate, run_id, work, options, say))
    return report


# --- output --------------------------------------------------------------------------------


def _f(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{fmt}}{unit}"


def _format_scale_out(so: ScaleOutResult) -> list[str]:
    single, pair = so.single, so.pair
    lines = [
        "",
        f"scale-out: {so.input_records:,} records ({so.impressions:,} impressions) in "
        f"{so.partitions} partitions; one worker in a group, then two started together in one "
        "group sharing one checkpoint directory (fresh output topics each)",
        f"{'':<24} {'events/s':>10} {'records':>10} {'seconds':>9} {'partitions':>11}",
    ]

    def row(label: str, rate: float, records: int, seconds: float, parts: str) -> None:
        lines.append(f"{label:<24} {_f(rate):>10} {records:>10,} {seconds:>9.2f} {parts:>11}")

    def parts(w: ScaleOutWorker) -> str:
        return f"{len(w.partitions)}: " + ",".join(map(str, w.partitions)) if w.partitions else "0"

    (s,) = single.workers
    row("1 worker", single.events_per_s, single.records, single.seconds, parts(s))
    for i, w in enumerate(pair.workers):
        label = f"2 workers: worker {w.name}" if i == 0 else f"{'':<11}worker {w.name}"
        row(label, w.events_per_s, w.records, pair.seconds, parts(w))
    row("2 workers: combined", pair.events_per_s, pair.records, pair.seconds, "")
    if pair.both_busy_seconds is not None and pair.both_busy_events_per_s is not None:
        busy = round(pair.both_busy_events_per_s * pair.both_busy_seconds)
        row("  while both were busy", pair.both_busy_events_per_s, busy, pair.both_busy_seconds, "")
    lines.append(f"{'ratio combined / 1 worker':<24} {_f(so.ratio_pair_to_single, '.3f'):>10}")
    lines.append(
        f"(events/s = {so.measures}; records = processed by the end, all of them; while both "
        "were busy = from the later worker's first batch until one of them had processed all "
        "it would)"
    )
    for name, run in (("1 worker", single), ("2 workers", pair)):
        extra = run.records - so.input_records
        note = (
            "exactly the input"
            if extra == 0
            else f"{extra:+,} vs the input ({'re-processed' if extra > 0 else 'NOT processed'})"
        )
        lines.append(
            f"{name}: records processed in total {run.records:,} of {so.input_records:,} input "
            f"({note}); predictions on the broker {run.predictions_on_broker:,} for "
            f"{so.impressions:,} impressions, {run.impressions_without_prediction:,} without one; "
            f"rate counted from {run.count_at_first:,} records; "
            f"end established by {run.ended_by}; "
            "start-up "
            + " / ".join(_f(w.startup_s, ".1f", " s") for w in run.workers)
            + "; exit codes after SIGTERM "
            + " / ".join(str(w.exit_code) for w in run.workers)
        )
    return lines


def format_report(report: KafkaBenchReport) -> str:
    lines: list[str] = []
    p, c, cp, w = report.preload, report.ceiling, report.ceiling_flush_every_poll, report.worker
    lines.append(
        f"stream-fm bench kafka - Apache Kafka {report.kafka_version} on {report.bootstrap_servers}, "
        f"{report.options['partitions']} partitions"
    )
    if p is not None:
        lines.append(
            f"input: {p.records:,} records ({p.impressions:,} impressions, {p.clicks:,} clicks, 20 fields, "
            f"{p.bytes / max(p.records, 1):.0f} B each); preloaded at {p.records_per_s:,.0f}/s"
        )
    lines.append("")
    lines.append(f"{'throughput':<52} {'events/s':>10} {'seconds':>9}")
    if c is not None:
        lines.append(
            f"{'ceiling: bare consume + produce, flush at end':<52} {_f(c.events_per_s):>10} {c.seconds:>9.2f}"
        )
    if cp is not None:
        lines.append(
            f"{'ceiling: same, flush after every poll':<52} {_f(cp.events_per_s):>10} {cp.seconds:>9.2f}"
        )
    if w is not None:
        lines.append(
            f"{'worker (steady state, from first batch)':<52} {_f(w.events_per_s):>10} {w.steady_seconds:>9.2f}"
        )
        lines.append(
            f"{'worker (incl. start-up ' + format(w.startup_s, '.1f') + ' s)':<52} "
            f"{_f(w.events_per_s_with_startup):>10} {w.startup_s + w.steady_seconds:>9.2f}"
        )
    lines.append(f"{'ratio worker / ceiling':<52} {_f(report.ratio_worker_to_ceiling, '.3f'):>10}")
    if cp is not None and w is not None and cp.events_per_s > 0:
        lines.append(
            f"{'ratio worker / ceiling flushing every poll':<52} {w.events_per_s / cp.events_per_s:>10.3f}"
        )
    if w is not None:
        lines.append(
            f"worker processed {w.records:,} records ({w.invalid:,} invalid), {w.predictions:,} "
            f"predictions, {w.checkpoints} checkpoints; rate counted from {w.count_at_first:,} records; "
            f"exit code after SIGTERM: {w.exit_code}{' (profiled with py-spy)' if w.profiled else ''}"
        )
    if report.scale_out is not None:
        lines += _format_scale_out(report.scale_out)
    if report.latency:
        lines.append("")
        lines.append(f"latency: {LATENCY_MEASURES}")
        lines.append(
            "(histogram quantiles interpolated inside the buckets 1, 2.5, 5, 10, 25, 50, 100, 250 ms ...: "
            "a quantile in the 100-250 ms bucket only says 'between 100 and 250'; "
            "exact = " + EXACT_LATENCY_MEASURES + ")"
        )
        lines.append(
            f"{'offered/s':>10} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
            f"{'mean ms':>8} {'exact p50/p99/p99.9/max':>23} {'batch p50/p99 ms':>17} "
            f"{'backlog':>8} {'drain s':>8} {'lag':>5} {'kept up':>8}"
        )
        for r in report.latency:
            lines.append(
                f"{r.offered_per_s:>10,.0f} {_f(r.achieved_offered_per_s):>10} {_f(r.p50_ms, '.1f'):>8} "
                f"{_f(r.p99_ms, '.1f'):>8} {_f(r.p999_ms, '.1f'):>9} {_f(r.mean_ms, '.1f'):>8} "
                f"{'/'.join(_f(v, '.0f') for v in (r.exact_p50_ms, r.exact_p99_ms, r.exact_p999_ms, r.exact_max_ms)):>23} "
                f"{_f(r.batch_p50_ms, '.1f') + ' / ' + _f(r.batch_p99_ms, '.1f'):>17} "
                f"{r.backlog_at_producer_end:>8,} {r.drain_s:>8.2f} {_f(r.final_consumer_lag, '.0f'):>5} "
                f"{'yes' if r.kept_up else 'NO':>8}"
            )
        lines.append(
            f"(window: after a {report.options['latency_warmup_s']:g} s warm-up until drained; "
            "batch = one batch's poll-to-publish time (stream_fm_batch_seconds); "
            "backlog = records not yet processed when the producer finished; kept up = backlog "
            "<= 1 s of offered traffic; lag = the worker's stream_fm_consumer_lag after the drain)"
        )
    if w is not None:
        lines.append("")
        lines.append(
            f"memory (worker VmRSS): start {w.rss_start_mib:,.0f} MiB (after {w.count_at_first:,} records), "
            f"1M {_f(w.rss_1m_mib, ',.0f', ' MiB')}, end {w.rss_end_mib:,.0f} MiB; "
            f"peak (VmHWM) {w.rss_peak_mib:,.0f} MiB"
        )
        lines.append(
            "RSS by records processed: "
            + ", ".join(f"{x.events:,}: {x.rss_mib:,.0f}" for x in w.rss)
            + " (MiB)"
        )
        lines.append(f"pending impressions: end {w.pending_end:,}, max {w.pending_max:,}")
    return "\n".join(lines)
