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

What the latency histogram measures (``stream_fm.worker.observe``, at the end of each
batch): wall clock then minus the input *record's Kafka timestamp* (CreateTime, stamped by
the producer at ``send``), not the event's ``ts`` field. The worker hands the batch's
predictions to its producer and awaits acknowledgements only before a checkpoint, so the
histogram includes the producer's linger, the broker, the worker's poll wait and the whole
batch, but not the predictions' own trip to the broker. The per-record figures do include it:
the latency phase's predictions topic uses ``LogAppendTime``, so a prediction's timestamp is
when the broker appended it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import asdict
from pathlib import Path

from stream_fm.config import build_settings
from stream_fm.kafka.acls import required_acls
from stream_fm.tools.bench.kafka.data import _topics, preload
from stream_fm.tools.bench.kafka.latency import measure_latency
from stream_fm.tools.bench.kafka.options import KafkaBenchOptions, Say, _stderr
from stream_fm.tools.bench.kafka.quix import measure_quix
from stream_fm.tools.bench.kafka.releases import measure_releases
from stream_fm.tools.bench.kafka.report import format_report
from stream_fm.tools.bench.kafka.results import (
    ClientRun,
    KafkaBenchReport,
    PreloadResult,
    SecuredRun,
    _json_safe,
    client_versions,
)
from stream_fm.tools.bench.kafka.scale_out import measure_scale_out
from stream_fm.tools.bench.kafka.throughput import measure_ceiling, measure_worker
from stream_fm.tools.broker import KafkaBroker
from stream_fm.tools.broker.secure import SecuredBroker
from stream_fm.tools.scratch import scratch_dir

# What a run in a temp dir removes at its end: the workers' checkpoints, the other releases.
BENCH_BULK = ("*-checkpoints", "kafka-python-*")


def run_kafka_bench(
    options: KafkaBenchOptions, broker: KafkaBroker | None = None, say: Say = _stderr
) -> KafkaBenchReport:
    """All phases on ``broker`` (or on a broker of its own, started and stopped here)."""
    with scratch_dir(options.work_dir, "stream-fm-bench-kafka-", BENCH_BULK) as work:
        return _run_quietly(options, broker, work, say)


def _run_quietly(
    options: KafkaBenchOptions, broker: KafkaBroker | None, work: Path, say: Say
) -> KafkaBenchReport:
    # The preloading producer's IO thread waits for the GIL while this thread builds records;
    # kafka-python then warns about every slow selector task. Not a finding: keep it quiet.
    selector_log = logging.getLogger("kafka.net.selector")
    level = selector_log.level
    selector_log.setLevel(logging.ERROR)
    try:
        if broker is None:
            say("bench kafka: starting Apache Kafka (KRaft) ...")
            # Secured listeners beside the PLAINTEXT one the other phases use.
            with SecuredBroker(log_path=work / "kafka.log", partitions=options.partitions) as own:
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
    failed = [r.exit_code for r in report.latency] + [c.worker.exit_code for c in report.clients]
    if report.secured is not None:
        failed.append(report.secured.worker.exit_code)
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
        client_versions=client_versions(),
    )
    say(f"bench kafka: Kafka {broker.kafka_version} on {bootstrap}; work dir {work}")
    topics = _topics(run_id, "throughput", options.labels)
    broker.create_topics(list(topics.values()), partitions=options.partitions)

    say(f"bench kafka: preloading {options.events:,} simulated records into {topics['input']} ...")
    report.preload = preload(bootstrap, topics["input"], options)
    expected = report.preload.records
    say(
        f"bench kafka: preloaded {expected:,} records ({report.preload.bytes / 1e6:,.0f} MB) "
        f"at {report.preload.records_per_s:,.0f}/s"
    )
    for client in options.clients:
        report.clients.append(
            _client_run(broker, client, run_id, topics["input"], report.preload, work, options, say)
        )
    if options.kafka_python_versions:
        report.releases = measure_releases(
            broker, options.kafka_python_versions, topics["input"], expected, work, say
        )
    if isinstance(broker, SecuredBroker):
        report.secured = _secured_run(broker, report, run_id, topics["input"], work, options, say)
    if options.quix:
        output = f"bench-{run_id}-quix-output"
        broker.create_topics([output], partitions=options.partitions)
        say("bench kafka: a bare Quix Streams application (JSON in, filter, JSON out) ...")
        report.quix = measure_quix(bootstrap, topics["input"], output, expected, work)
        say(f"bench kafka: Quix Streams {report.quix.events_per_s:,.0f} events/s")

    if options.scale_out_events > 0:
        report.scale_out = measure_scale_out(broker, run_id, work, options, say)

    for client in options.clients:
        for rate in options.rates:
            say(
                f"bench kafka: latency on {client} at {rate:,.0f} events/s for "
                f"{options.latency_duration_s:g}s ..."
            )
            report.latency.append(
                measure_latency(broker, rate, run_id, work, options, say, client=client)
            )
    return report


def _client_run(
    broker: KafkaBroker,
    client: str,
    run_id: str,
    input_topic: str,
    preloaded: PreloadResult,
    work: Path,
    options: KafkaBenchOptions,
    say: Say,
) -> ClientRun:
    """One client's two ceilings, then the worker on it, over the preloaded topic."""
    bootstrap = broker.bootstrap_servers
    outputs = [f"bench-{run_id}-ceiling-{client}-end", f"bench-{run_id}-ceiling-{client}-poll"]
    worker_topics = {**_topics(run_id, f"worker-{client}", options.labels), "input": input_topic}
    outputs_of_worker = [t for name, t in worker_topics.items() if name != "input"]
    broker.create_topics(outputs + outputs_of_worker, partitions=options.partitions)
    expected = preloaded.records
    ceilings = []
    for flush, output in zip(("end", "every_poll"), outputs, strict=True):
        say(f"bench kafka: ceiling on {client} (bare consume + produce, flush {flush}) ...")
        ceiling = measure_ceiling(bootstrap, input_topic, output, expected, flush, client)
        say(f"bench kafka: ceiling on {client} {ceiling.events_per_s:,.0f} events/s")
        ceilings.append(ceiling)
    say(f"bench kafka: the worker on {client} over the same topic ...")
    worker = measure_worker(
        bootstrap, worker_topics, expected, preloaded.impressions, work, options, say, client
    )
    say(f"bench kafka: worker on {client} {worker.events_per_s:,.0f} events/s")
    ratio = worker.events_per_s / ceilings[0].events_per_s if ceilings[0].events_per_s else None
    return ClientRun(client, ceilings[0], ceilings[1], worker, ratio)


def _secured_run(
    broker: SecuredBroker,
    report: KafkaBenchReport,
    run_id: str,
    input_topic: str,
    work: Path,
    options: KafkaBenchOptions,
    say: Say,
) -> SecuredRun:
    """The load client's worker once more over the same topic, through SASL_SSL with SCRAM,
    as a user holding exactly the ACLs the worker needs; right after its PLAINTEXT run."""
    client, mechanism = options.load_client, "SCRAM-SHA-512"
    plain = report.client(client)
    assert plain is not None and report.preload is not None
    topics = {**_topics(run_id, f"worker-{client}-secured", options.labels), "input": input_topic}
    broker.create_topics(
        [t for name, t in topics.items() if name != "input"], partitions=options.partitions
    )
    values = broker.client_settings("SASL_SSL", mechanism)
    password_file = work / "sasl-password"
    password_file.write_text(values.pop("sasl_password"))
    password_file.chmod(0o600)
    env = {f"STREAM_FM_{k.upper()}": str(v) for k, v in values.items()}
    env["STREAM_FM_SASL_PASSWORD_FILE"] = str(password_file)
    group = f"bench-throughput-{client}-secured-{run_id}"
    env["STREAM_FM_GROUP_ID"] = group
    needs = required_acls(
        build_settings(
            {
                "group_id": group,
                "input_topics": (input_topic,),
                "predictions_topic": topics["predictions"],
                "dead_letter_topic": topics["dead_letters"],
                "labels_topic": topics.get("labels", ""),
            }
        )
    )
    broker.grant("worker", needs)
    say(f"bench kafka: the worker on {client} over SASL_SSL ({mechanism}) ...")
    worker = measure_worker(
        broker.bootstrap_servers, topics, report.preload.records, report.preload.impressions,
        work, options, say, client, secured=env,
    )  # fmt: skip
    rate = plain.worker.events_per_s
    say(f"bench kafka: worker on {client} over SASL_SSL {worker.events_per_s:,.0f} events/s")
    ratio = worker.events_per_s / rate if rate else None
    return SecuredRun(client, "SASL_SSL", mechanism, worker, rate, ratio)


# --- output --------------------------------------------------------------------------------
