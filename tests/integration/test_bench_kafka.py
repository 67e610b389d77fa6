"""`stream-fm bench kafka` at a tiny scale on the session broker: every figure present and consistent."""

from __future__ import annotations

import json
import math
from pathlib import Path

from stream_fm.cli import _parser
from stream_fm.tools.bench.kafka import KafkaBenchOptions, format_report, run_kafka_bench
from stream_fm.tools.bench.kafka.results import LatencyResult
from stream_fm.tools.broker import KafkaBroker

EVENTS = 20_000
# Large enough that the worker which joins the group first (and owns every partition until the
# rebalance, a few seconds: heartbeats are 3 s apart) leaves work for the other one.
SCALE_OUT_EVENTS = 200_000
# A kafka-python release beside the installed one (pip fetches it): the 2.x line.
OTHER_KAFKA_PYTHON = "2.3.3"


def test_bench_kafka_subcommand_leaves_the_model_bench_alone() -> None:
    model = _parser().parse_args(["bench", "--events", "10", "--streams", "simulated"])
    assert model.bench_target is None
    assert (model.events, model.streams) == (10, "simulated")
    kafka = _parser().parse_args(["bench", "kafka", "--events", "200000", "--json", "out.json"])
    assert kafka.bench_target == "kafka"
    assert (kafka.events, kafka.json, kafka.rates) == (200_000, Path("out.json"), "10000,50000")
    assert (kafka.clients, kafka.no_quix, kafka.latency_duration_s) == (
        "kafka-python,confluent",
        False,
        100.0,
    )
    assert (kafka.scale_out_events, kafka.scale_out_partitions) == (1_000_000, 4)
    off = _parser().parse_args(["bench", "kafka", "--scale-out-events", "0"])
    assert off.scale_out_events == 0


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
        scale_out_events=SCALE_OUT_EVENTS,
        scale_out_partitions=4,
        kafka_python_versions=(OTHER_KAFKA_PYTHON,),
    )
    report = run_kafka_bench(options, broker=kafka_broker, say=lambda _line: None)

    preload = report.preload
    assert preload is not None
    assert preload.records == EVENTS
    assert preload.impressions + preload.clicks == EVENTS
    assert 0 < preload.clicks < preload.impressions

    assert [run.client for run in report.clients] == ["kafka-python", "confluent"]
    for run in report.clients:
        for ceiling in (run.ceiling, run.ceiling_flush_every_poll):
            assert ceiling.client == run.client
            assert ceiling.records == EVENTS
            assert ceiling.produced == preload.impressions, "one output record per impression"
            assert ceiling.events_per_s > 0
            assert 0 < ceiling.seconds <= ceiling.seconds_with_join
        worker = run.worker
        assert worker.client == run.client
        assert worker.records == EVENTS, "the worker processed exactly the input"
        assert worker.invalid == 0
        assert worker.predictions == preload.impressions
        assert worker.exit_code == 0, "SIGTERM drains and exits 0"
        assert "worker stopped" in worker.summary
        assert worker.events_per_s > 0 and worker.startup_s > 0
        assert 0 < worker.count_at_first <= EVENTS
        assert worker.checkpoints >= 1 and worker.checkpoint_bytes > 0
        assert worker.checkpoint_write_s > 0 and worker.longest_pause_ms > 0
        assert worker.rss_start_mib > 0 and 0 < worker.rss_end_mib <= worker.rss_peak_mib
        assert worker.rss_1m_mib is None  # fewer than 1M records
        assert worker.rss[-1].events == EVENTS
        assert 0 < worker.pending_end <= worker.pending_max <= preload.impressions
        assert run.ratio_worker_to_ceiling is not None
        assert math.isclose(
            run.ratio_worker_to_ceiling, worker.events_per_s / run.ceiling.events_per_s
        )
    quix = report.quix
    assert quix is not None
    assert quix.records == EVENTS and quix.produced == preload.impressions
    assert quix.events_per_s > 0 and quix.startup_s > 0

    assert [(r.client, r.offered_per_s) for r in report.latency] == [
        ("kafka-python", 1_000.0),
        ("confluent", 1_000.0),
    ]
    for latency in report.latency:
        _check_latency(latency)

    scale_out = report.scale_out
    assert scale_out is not None
    assert (scale_out.input_records, scale_out.partitions) == (SCALE_OUT_EVENTS, 4)
    assert 0 < scale_out.impressions < SCALE_OUT_EVENTS
    single, pair = scale_out.single, scale_out.pair
    (alone,) = single.workers
    assert single.records == alone.records == SCALE_OUT_EVENTS, "one worker: exactly the input"
    assert alone.partitions == [0, 1, 2, 3]
    assert [w.name for w in pair.workers] == ["a", "b"]
    assert pair.group_id != single.group_id
    assert all(w.records > 0 for w in pair.workers), "both workers of the group got work"
    assert pair.records == sum(w.records for w in pair.workers)
    assert pair.records >= SCALE_OUT_EVENTS, "re-processed records may add, none may be missing"
    owned = [p for w in pair.workers for p in w.partitions]
    assert sorted(owned) == [0, 1, 2, 3], "the group split the partitions"
    for run in (single, pair):
        assert run.impressions_without_prediction == 0, "every impression got a prediction"
        assert run.predictions_on_broker >= scale_out.impressions
        assert run.seconds > 0 and run.events_per_s > 0
        assert 0 < run.counted <= run.records
        assert run.ended_by in ("counts", "lag")
        assert all(w.exit_code == 0 for w in run.workers), "SIGTERM drains and exits 0"
        assert all("worker stopped" in w.summary for w in run.workers)
        assert math.isclose(run.events_per_s, run.counted / run.seconds)
    assert single.both_busy_seconds is None
    for w in pair.workers:
        assert 0 <= w.counted <= w.records
        assert w.startup_s is not None and w.startup_s > 0
        assert math.isclose(w.events_per_s, w.counted / pair.seconds)
    assert math.isclose(pair.events_per_s, sum(w.events_per_s for w in pair.workers))
    assert pair.events_per_s > 0 and any(w.events_per_s > 0 for w in pair.workers)
    assert scale_out.ratio_pair_to_single is not None
    assert math.isclose(scale_out.ratio_pair_to_single, pair.events_per_s / single.events_per_s)

    installed, other = report.releases
    assert installed.requested == "installed"
    assert installed.version == report.client_versions["kafka-python"]
    assert (other.requested, other.version) == (OTHER_KAFKA_PYTHON, OTHER_KAFKA_PYTHON)
    for row in report.releases:
        assert (row.consumed, row.produced, row.stopped) == (EVENTS, preload.impressions, "")
        assert row.events_per_s > 0 and row.peak_rss_mb > 0
    assert {"kafka-python", "confluent-kafka", "librdkafka"} <= set(report.client_versions)

    figures = json.loads(json.dumps(report.as_dict()))
    assert figures["clients"][1]["worker"]["records"] == EVENTS
    assert figures["latency"][0]["p99_ms"] > 0
    assert "CreateTime" in figures["latency_measures"]
    assert figures["scale_out"]["pair"]["workers"][1]["name"] == "b"
    assert figures["options"]["scale_out_events"] == SCALE_OUT_EVENTS
    table = format_report(report)
    for heading in (
        "ceiling: bare consume",
        "ratio worker / ceiling",
        "ratio worker / Quix Streams",
        "longest loop pause",
        "p99 ms",
        "VmRSS",
        "pending",
        "1 worker",
        "2 workers: worker a",
        "worker b",
        "2 workers: combined",
        "ratio combined / 1 worker",
        "records processed in total",
        "kafka-python releases",
        f"{OTHER_KAFKA_PYTHON}  ",
        f"clients: kafka-python {installed.version}",
    ):
        assert heading in table


def _check_latency(latency: LatencyResult) -> None:
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
