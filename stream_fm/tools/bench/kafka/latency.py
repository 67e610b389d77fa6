"""The latency phase: the simulator at a fixed offered rate while a worker serves."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stream_fm.errors import StreamFMError
from stream_fm.tools.bench.kafka.data import _topics, read_timestamps
from stream_fm.tools.bench.kafka.metrics import Scrape, _bucket_delta, histogram_quantile
from stream_fm.tools.bench.kafka.options import (
    LAG_REFRESH_WAIT_S,
    STALL_TIMEOUT_S,
    KafkaBenchOptions,
    Say,
)
from stream_fm.tools.bench.kafka.processes import WorkerProcess
from stream_fm.tools.bench.kafka.results import LatencyResult
from stream_fm.tools.broker import KafkaBroker


def measure_latency(
    broker: KafkaBroker,
    rate: float,
    run_id: str,
    work: Path,
    options: KafkaBenchOptions,
    say: Say,
    client: str = "kafka-python",
) -> LatencyResult:
    """A fresh worker on ``client`` serving the simulator's records offered at ``rate``."""
    bootstrap = broker.bootstrap_servers
    name = f"latency-{client}-{rate:g}"
    topics = _topics(run_id, name, options.labels)
    others = [t for name, t in topics.items() if name != "predictions"]
    broker.create_topics(others, partitions=options.partitions)
    # The broker stamps each prediction when it appends it: end-to-end latency per record.
    broker.create_topics(
        [topics["predictions"]],
        partitions=options.partitions,
        configs={"message.timestamp.type": "LogAppendTime"},
    )
    worker = WorkerProcess(
        bootstrap, topics, work, name, options.attribution_window_s, kafka_client=client
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
            "--kafka-client", options.load_client,
        ]  # fmt: skip
        # To a file, not a pipe: a chatty simulator must never block on a full pipe.
        simulator_log = work / f"simulate-{name}.log"
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
    checkpoints_before = before.get("stream_fm_checkpoints_total") if before is not None else 0.0
    result = LatencyResult(
        client=client,
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
        checkpoints=round(after.get("stream_fm_checkpoints_total") - checkpoints_before),
        longest_pause_ms=after.get("stream_fm_loop_longest_pause_seconds") * 1000,
        exit_code=exit_code,
    )
    say(
        f"bench kafka: {client}, {rate:,.0f}/s offered: p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, "
        f"backlog at producer end {backlog:,}"
    )
    return result
