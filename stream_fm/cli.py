"""The ``stream-fm`` command: run, replay, simulate, bench, demo."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from stream_fm.config import SPECS, Settings, load_settings
from stream_fm.errors import StreamFMError

log = logging.getLogger("stream_fm")
SERIES_EVERY = 10_000  # examples between two points of the replay plot


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (``--attribution-window-s``), listed with its default."""
    parser.add_argument(
        "--config", help="TOML settings file (then STREAM_FM_* env vars, then flags)"
    )
    group = parser.add_argument_group("settings (also STREAM_FM_<NAME> or a TOML key)")
    for spec in SPECS.values():
        flag = "--" + spec.name.replace("_", "-")
        default = ",".join(spec.default) if isinstance(spec.default, tuple) else spec.default
        help_text = f"{spec.help} (default: {default})"
        if spec.kind is bool:
            group.add_argument(
                flag, dest=f"setting__{spec.name}", action="store_const", const=True, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=f"setting__{spec.name}", metavar=spec.name.upper(), help=help_text
            )


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key.removeprefix("setting__"): value
        for key, value in vars(args).items()
        if key.startswith("setting__") and value is not None
    }
    return load_settings(args.config, overrides=overrides)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-fm", description="Streaming click prediction with a Factorization Machine."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the Kafka worker")
    _add_setting_flags(run)

    replay = commands.add_parser("replay", help="progressive validation over a file, no Kafka")
    replay.add_argument("path", type=Path)
    replay.add_argument(
        "--format", required=True, choices=("jsonl", "libsvm", "criteo", "avazu", "talkingdata")
    )
    replay.add_argument("--report", type=Path, help="write the JSON report here")
    replay.add_argument("--plot", type=Path, help="draw rolling log loss and NE to this PNG")
    replay.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_setting_flags(replay)

    simulate = commands.add_parser("simulate", help="synthetic traffic from a ground-truth FM")
    simulate.add_argument("--out", type=Path, help="JSONL file to write (.gz compresses)")
    simulate.add_argument("--impressions", type=int, default=100_000)
    simulate.add_argument("--fields", type=int, default=20)
    simulate.add_argument("--max-cardinality", type=int, default=100_000)
    simulate.add_argument("--k", type=int, default=4, help="latent dimension of the ground truth")
    simulate.add_argument("--base-ctr", type=float, default=0.03)
    simulate.add_argument("--impressions-per-s", type=float, default=10.0, help="event-time rate")
    simulate.add_argument("--attribution-window-s", type=float, default=3600.0)
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--click-delay-median-s", type=float, default=30.0)
    simulate.add_argument("--summary", type=Path, help="write the ground-truth summary (JSON) here")
    kafka = simulate.add_argument_group("to Kafka instead of a file")
    kafka.add_argument("--bootstrap-servers", help="produce to this Kafka cluster")
    kafka.add_argument("--topic", default="ad-events", help="topic for impressions (and clicks)")
    kafka.add_argument("--clicks-topic", help="a separate topic for clicks (same partition count)")
    kafka.add_argument(
        "--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)"
    )
    kafka.add_argument(
        "--duration-s", type=float, help="produce for this long at --rate (sets --impressions)"
    )

    demo = commands.add_parser(
        "demo", help="Kafka + simulator + worker on this machine, progress printed"
    )
    demo.add_argument("--rate", type=float, default=5000.0, help="simulated events per second")
    demo.add_argument(
        "--duration-s", type=float, help="stop after this long (default: until Ctrl-C)"
    )
    demo.add_argument(
        "--metrics-port", type=int, default=9464, help="the worker's /metrics port (0 = free port)"
    )
    demo.add_argument("--partitions", type=int, default=2)
    demo.add_argument(
        "--prometheus",
        action="store_true",
        help="also run a real Prometheus (Debian package) scraping the worker, with the alert rules",
    )
    demo.add_argument(
        "--snapshot",
        type=Path,
        help="at the end, draw the dashboard's key panels from Prometheus into this PNG "
        "(implies --prometheus; needs --duration-s)",
    )

    bench = commands.add_parser("bench", help="fast engine vs river vs Vowpal Wabbit, side by side")
    bench.add_argument(
        "--streams",
        default="simulated,ipinyou,talkingdata",
        help="comma-separated: simulated, ipinyou, talkingdata",
    )
    bench.add_argument(
        "--events", type=int, default=2_000_000, help="events of the simulated stream"
    )
    bench.add_argument(
        "--river-events",
        type=int,
        default=20_000,
        help="prefix all engines run for the river comparison",
    )
    bench.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    bench.add_argument("--json", type=Path, help="write all figures as JSON here")
    bench.add_argument("--sim-seed", type=int, default=7, help="seed of the simulated stream")
    _add_setting_flags(bench)
    targets = bench.add_subparsers(
        dest="bench_target",
        metavar="kafka",
        help="`stream-fm bench kafka --help`: the worker on a real broker (default: the model benchmark)",
    )
    bench_kafka = targets.add_parser(
        "kafka",
        help="the worker against a bare kafka-python loop on a local Apache Kafka: "
        "throughput, latency at fixed rates, memory",
    )
    bench_kafka.add_argument(
        "--events",
        type=int,
        default=5_000_000,
        help="records preloaded for the throughput and memory phases (scales the benchmark)",
    )
    bench_kafka.add_argument("--partitions", type=int, default=2, help="partitions per topic")
    bench_kafka.add_argument(
        "--rates",
        default="1000,10000",
        help="comma-separated offered rates (events/s) of the latency phases; empty = none",
    )
    bench_kafka.add_argument(
        "--latency-duration-s", type=float, default=25.0, help="seconds produced at each rate"
    )
    bench_kafka.add_argument(
        "--latency-warmup-s",
        type=float,
        default=5.0,
        help="seconds after the first processed batch left out of the latency quantiles",
    )
    bench_kafka.add_argument(
        "--impressions-per-s",
        type=float,
        default=10.0,
        help="event-time rate of the simulated data (sets how many impressions are pending)",
    )
    bench_kafka.add_argument(
        "--attribution-window-s",
        type=float,
        default=3600.0,
        help="attribution window of the data and the worker",
    )
    bench_kafka.add_argument("--seed", type=int, default=7, help="seed of the simulated data")
    bench_kafka.add_argument(
        "--labels", action="store_true", help="also publish the worker's labels topic"
    )
    bench_kafka.add_argument(
        "--py-spy",
        type=Path,
        help="profile the worker's throughput phase with py-spy into this file "
        "(.svg flame graph, .json speedscope, else raw collapsed stacks)",
    )
    bench_kafka.add_argument(
        "--scale-out-events",
        type=int,
        default=1_000_000,
        help="records of the scale-out phase (one worker vs two in one group over the same "
        "topic); 0 = no scale-out phase",
    )
    bench_kafka.add_argument(
        "--scale-out-partitions",
        type=int,
        default=4,
        help="partitions of the scale-out phase's topics",
    )
    bench_kafka.add_argument(
        "--work-dir", type=Path, help="logs and checkpoints (default: a temp dir)"
    )
    bench_kafka.add_argument("--json", type=Path, help="write all figures as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kafka-python logs every connection at INFO; keep its warnings only.
    logging.getLogger("kafka").setLevel(logging.WARNING)
    # Millions of live pending impressions make CPython's default GC cadence (every 700
    # allocations) cost a third of the hot loop; nothing here builds reference cycles.
    gc.set_threshold(100_000, 50, 100)
    try:
        handler = {
            "run": _run,
            "replay": _replay,
            "simulate": _simulate,
            "bench": _bench,
            "demo": _demo,
        }[args.command]
        return handler(args)
    except StreamFMError as error:
        print(f"stream-fm: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from stream_fm.worker import run_worker

    return run_worker(settings)


def _replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from stream_fm.evaluate import ProgressiveValidation
    from stream_fm.events import EventDecoder
    from stream_fm.features import FeatureHasher
    from stream_fm.model import FastFM
    from stream_fm.pipeline import Pipeline
    from stream_fm.replay import plot_series, read_batches, replay

    settings = _settings(args)
    if not args.path.is_file():
        raise StreamFMError(f"no such file: {args.path}")
    hasher = FeatureHasher(
        settings.hash_bits, settings.hash_seed, settings.numeric_transform, settings.max_features
    )
    decoder = EventDecoder(hasher, settings.max_event_bytes)
    pipeline = Pipeline(
        FastFM(settings.model),
        decoder,
        settings.attribution_window_ms,
        settings.max_pending_impressions,
        evaluator=ProgressiveValidation(settings.auc_window, series_every=SERIES_EVERY),
    )
    with tqdm(
        unit=" events", unit_scale=True, disable=args.no_progress or None, file=sys.stderr
    ) as bar:
        report = replay(
            pipeline, read_batches(args.path, args.format, decoder), progress=bar.update
        )
    figures = {k: v for k, v in _report_dict(report).items() if k != "series"}
    print(json.dumps(figures, indent=2))
    if args.report:
        args.report.write_text(json.dumps(_report_dict(report), indent=2))
    if args.plot:
        plot_series(report.series, args.plot, f"stream-fm replay: {args.path.name}")
    return 0


def _report_dict(report: Any) -> dict[str, Any]:
    from dataclasses import asdict

    out = asdict(report)
    # JSON has no NaN: report undefined figures as null.
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def _simulate(args: argparse.Namespace) -> int:
    from stream_fm.simulate import SimulationParams, Simulator

    n_impressions = args.impressions
    if args.duration_s is not None:
        if args.rate <= 0:
            raise StreamFMError("--duration-s needs --rate")
        n_impressions = max(1, round(args.rate * args.duration_s / (1 + args.base_ctr)))
    params = SimulationParams(
        n_impressions=n_impressions,
        click_delay_median_s=args.click_delay_median_s,
        n_fields=args.fields,
        max_cardinality=args.max_cardinality,
        k=args.k,
        base_ctr=args.base_ctr,
        impressions_per_s=args.impressions_per_s,
        attribution_window_s=args.attribution_window_s,
        seed=args.seed,
    )
    traffic = Simulator(params).generate()
    stats = traffic.stats.as_dict()
    if args.bootstrap_servers:
        sent = _simulate_to_kafka(traffic.events(), args)
        target = f"{sent:,} events to Kafka topic {args.topic}" + (
            f" and {args.clicks_topic}" if args.clicks_topic else ""
        )
    elif args.out is not None:
        target = _simulate_to_file(traffic.events(), args.out)
    else:
        raise StreamFMError("simulate needs --out PATH or --bootstrap-servers")
    if args.summary:
        args.summary.write_text(json.dumps(stats, indent=2))
    print(
        f"wrote {target}: {stats['impressions']:,} impressions, {stats['clicks']:,} clicks, "
        f"{stats['positives']:,} of them inside the {params.attribution_window_s:g}s window and "
        f"{stats['clicks_beyond_window']:,} beyond it; Bayes-optimal log loss {stats['bayes_logloss']:.5f}, "
        f"NE {stats['bayes_normalized_entropy']:.4f}",
        flush=True,
    )
    return 0


def _simulate_to_file(events: Iterator[dict[str, Any]], out: Path) -> str:
    import gzip

    import orjson

    opener = gzip.open if out.suffix == ".gz" else open
    with opener(out, "wb") as sink:
        for event in events:
            sink.write(orjson.dumps(event) + b"\n")
    return str(out)


def _simulate_to_kafka(events: Iterator[dict[str, Any]], args: argparse.Namespace) -> int:
    """Produce in event-time order at ``--rate`` events/s; SIGTERM stops after a flush."""
    import signal
    import time

    import orjson

    from stream_fm.kafka_io import EventProducer

    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    producer = EventProducer(args.bootstrap_servers)
    started = time.monotonic()
    sent = 0
    try:
        for event in events:
            if stopping:
                break
            topic = (
                args.clicks_topic
                if (args.clicks_topic and event["type"] == "click")
                else args.topic
            )
            producer.send(topic, event["id"].encode(), orjson.dumps(event))
            sent += 1
            if args.rate > 0 and sent % 256 == 0:
                ahead_s = sent / args.rate - (time.monotonic() - started)
                if ahead_s > 0:
                    time.sleep(ahead_s)
    finally:
        producer.flush()
        producer.close()
    return sent


def _demo(args: argparse.Namespace) -> int:
    from stream_fm.demo import main_demo

    if args.snapshot is not None and args.duration_s is None:
        print("stream-fm demo: --snapshot needs --duration-s", file=sys.stderr)
        return 2
    return main_demo(
        args.rate,
        args.duration_s,
        args.metrics_port,
        args.partitions,
        prometheus=args.prometheus,
        snapshot=args.snapshot,
    )


def _bench_kafka(args: argparse.Namespace) -> int:
    from stream_fm.bench_kafka import KafkaBenchOptions, format_report, run_kafka_bench

    try:
        rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
    except ValueError:
        raise StreamFMError(f"bench kafka: --rates: not numbers: {args.rates!r}") from None
    options = KafkaBenchOptions(
        events=args.events,
        partitions=args.partitions,
        rates=rates,
        latency_duration_s=args.latency_duration_s,
        latency_warmup_s=args.latency_warmup_s,
        impressions_per_s=args.impressions_per_s,
        attribution_window_s=args.attribution_window_s,
        seed=args.seed,
        labels=args.labels,
        py_spy=args.py_spy,
        work_dir=args.work_dir,
        scale_out_events=args.scale_out_events,
        scale_out_partitions=args.scale_out_partitions,
    )
    report = run_kafka_bench(options)
    print(format_report(report), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report.as_dict(), indent=2))
    failed = [r.exit_code for r in report.latency] + [
        report.worker.exit_code if report.worker else 0
    ]
    if report.scale_out is not None:
        runs = (report.scale_out.single, report.scale_out.pair)
        failed += [w.exit_code for run in runs for w in run.workers]
    return 0 if all(code == 0 for code in failed) else 1


def _bench(args: argparse.Namespace) -> int:
    if getattr(args, "bench_target", None) == "kafka":
        return _bench_kafka(args)
    from stream_fm import bench
    from stream_fm.features import FeatureHasher

    settings = _settings(args)
    hasher = FeatureHasher(
        settings.hash_bits, settings.hash_seed, settings.numeric_transform, settings.max_features
    )
    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    unknown = set(streams) - {"simulated", "ipinyou", "talkingdata"}
    if unknown:
        raise StreamFMError(f"unknown bench stream(s): {', '.join(sorted(unknown))}")
    results: list[bench.StreamResult] = []

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    throughput = bench.engine_only_throughput()
    print(
        f"engine only (compiled kernel, 20 fields, k={settings.model.k}, score+learn): {throughput:,.0f} examples/s"
    )
    for stream in streams:
        if stream == "simulated":
            batches, bayes_ll, bayes_ne = bench.simulated_stream(
                args.events, args.sim_seed, settings.attribution_window_s, hasher
            )
            outcome = bench.compare(
                "simulated", batches, settings, hasher, args.river_events, say, (bayes_ll, bayes_ne)
            )
        elif stream == "ipinyou":
            folder = args.data_dir / "ipinyou_deepctr"
            batches = bench.file_stream(folder / "train.fm.txt", "libsvm", hasher)
            batches += bench.file_stream(folder / "test.fm.txt", "libsvm", hasher)
            outcome = bench.compare(
                "ipinyou train+test", batches, settings, hasher, args.river_events, say
            )
        else:
            path = args.data_dir / "talkingdata" / "train_sample.sorted.csv"
            batches = bench.file_stream(path, "talkingdata", hasher)
            outcome = bench.compare(
                "talkingdata", batches, settings, hasher, args.river_events, say
            )
        for result in outcome:
            print(bench.format_table(result), flush=True)
        results += outcome
    if args.json:
        payload = {
            "engine_only_examples_per_second": throughput,
            "streams": [r.as_dict() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=lambda v: None))
    return 0
