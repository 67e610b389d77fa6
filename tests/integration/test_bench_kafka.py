"""`stream-fm bench kafka` at a tiny scale on the session broker: every figure present and consistent."""

from __future__ import annotations

import json
import math
from pathlib import Path

from stream_fm.bench_kafka import KafkaBenchOptions, format_report, run_kafka_bench
from stream_fm.broker import KafkaBroker
from stream_fm.cli import _parser

EVENTS = 20_000


def test_bench_kafka_subcommand_leaves_the_model_bench_alone() -> None:
    model = _parser().parse_args(["bench", "--events", "10", "--streams", "simulated"])
    assert model.bench_target is None
    assert (model.events, model.streams) == (10, "simulated")
    kafka = _parser().parse_args(["bench", "kafka", "--events", "200000", "--json", "out.json"])
    assert kafka.bench_target == "kafka"
    assert (kafka.events, kafka.json, kafka.rates) == (200_000, Path("out.json"), "1000,10000")


def test_bench_kafka_tiny_run_reports_consistent_figures(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    options = KafkaBenchOptions(
        events=EVENTS,
        partitions=2,
        rates=(1_000.0,),
        latency_duration_s=5.0,
        latency_warmup_s=1.0,
        work_dir=tmp_path,
    )
    report = run_kafka_bench(options, broker=kafka_broker, say=lambda _line: None)

    preload = report.preload
    assert preload is not None
    assert preload.records == EVENTS
    assert preload.impressions + preload.clicks == EVENTS
    assert 0 < preload.clicks < preload.impressions

    for ceiling in (report.ceiling, report.ceiling_flush_every_poll):
        assert ceiling is not None
        assert ceiling.records == EVENTS
        assert ceiling.produced == preload.impressions, "one output record per impression"
        assert ceiling.events_per_s > 0
        assert 0 < ceiling.seconds <= ceiling.seconds_with_join

    worker = report.worker
    assert worker is not None
    assert worker.records == EVENTS, "the worker processed exactly the input"
    assert worker.invalid == 0
    assert worker.predictions == preload.impressions
    assert worker.exit_code == 0, "SIGTERM drains and exits 0"
    assert "worker stopped" in worker.summary
    assert worker.events_per_s > 0 and worker.startup_s > 0
    assert 0 < worker.count_at_first <= EVENTS
    assert worker.checkpoints >= 1
    assert worker.rss_start_mib > 0 and 0 < worker.rss_end_mib <= worker.rss_peak_mib
    assert worker.rss_1m_mib is None  # fewer than 1M records
    assert worker.rss[-1].events == EVENTS
    assert 0 < worker.pending_end <= worker.pending_max <= preload.impressions
    assert report.ratio_worker_to_ceiling is not None
    assert report.ceiling is not None
    assert math.isclose(
        report.ratio_worker_to_ceiling, worker.events_per_s / report.ceiling.events_per_s
    )

    (latency,) = report.latency
    assert latency.offered_per_s == 1_000.0
    assert latency.produced > 2_000
    assert latency.achieved_offered_per_s > 0
    assert 0 < latency.observed <= latency.produced
    assert 0 < latency.p50_ms <= latency.p99_ms <= latency.p999_ms
    assert latency.mean_ms > 0
    assert 0 < latency.exact_count <= latency.produced
    assert 0 <= latency.exact_p50_ms <= latency.exact_p99_ms <= latency.exact_p999_ms
    assert latency.exact_p999_ms <= latency.exact_max_ms
    assert latency.batches > 0 and 0 < latency.batch_p50_ms <= latency.batch_p99_ms
    assert latency.final_consumer_lag == 0
    assert latency.kept_up
    assert latency.exit_code == 0

    figures = json.loads(json.dumps(report.as_dict()))
    assert figures["worker"]["records"] == EVENTS
    assert figures["latency"][0]["p99_ms"] > 0
    assert "CreateTime" in figures["latency_measures"]
    table = format_report(report)
    for heading in (
        "ceiling: bare consume",
        "ratio worker / ceiling",
        "p99 ms",
        "VmRSS",
        "pending",
    ):
        assert heading in table
