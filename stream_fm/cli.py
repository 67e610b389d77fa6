"""The ``stream-fm`` command: argument parsing only. Each subcommand builds its settings and
calls one function elsewhere: run, replay, simulate, bench (and bench kafka), demo."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Collection, Sequence
from pathlib import Path

from stream_fm.config import LEARNING_SETTINGS, SPECS, Settings, load_settings
from stream_fm.errors import StreamFMError

log = logging.getLogger("stream_fm")

# What ``bench sync`` reads beyond learning: how updates are rounded and held back.
SYNC_SETTINGS = ("model_sync_precision", "model_sync_hold_threshold", "model_sync_max_hold_ms")
BENCH_STREAMS = (
    "simulated", "simulated-100", "simulated-drift", "simulated-long", "talkingdata",
    "ipinyou", "criteo-10k", "avazu-9k", "criteo-2k", "avazu-3k", "xlearn",
)  # fmt: skip
# The real public ad logs: $STREAM_FM_DATA_DIR, else the shared folder beside the checkout.
DATA_DIR = Path(os.environ.get("STREAM_FM_DATA_DIR") or "../shared/data")
# Every stream with clicks that come late or labels from a real log; simulated-long is left out
# (N runs of it per row).
SYNC_STREAMS = ("simulated", "talkingdata", "ipinyou", "criteo-10k", "avazu-9k")
REPLAY_FORMATS = ("jsonl", "libsvm", "criteo", "criteo_tsv", "avazu", "talkingdata")


def _add_setting_flags(parser: argparse.ArgumentParser, names: Collection[str] | None) -> None:
    """One flag per setting (``--attribution-window-s``) with its help and default;
    ``names`` limits them to the settings the command reads (None: every one)."""
    parser.add_argument(
        "--config", help="TOML settings file (then STREAM_FM_* env vars, then flags)"
    )
    group = parser.add_argument_group("settings (also STREAM_FM_<NAME> or a TOML key)")
    for spec in SPECS.values():
        if names is not None and spec.name not in names:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = ",".join(spec.default) if isinstance(spec.default, tuple) else spec.default
        help_text = f"{spec.help} (default: {default if default != '' else 'empty'})"
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


def _with_defaults(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, *flags: tuple[str, dict[str, object]]
) -> None:
    """Add flags whose help ends with their default, as the settings' do."""
    for flag, options in flags:
        default = options.get("default")
        help_text = str(options.pop("help"))
        if default is not None and options.get("action") != "store_true":
            help_text += f" (default: {default})"
        parser.add_argument(flag, help=help_text, **options)  # type: ignore[arg-type]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-fm", description="Streaming click prediction with a Factorization Machine."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the Kafka worker")
    _add_setting_flags(run, None)

    replay = commands.add_parser(
        "replay", help="the worker's model and progressive validation over a file, no Kafka"
    )
    replay.add_argument("path", type=Path, help="the file to replay (.gz is read compressed)")
    replay.add_argument(
        "--format",
        required=True,
        choices=REPLAY_FORMATS,
        help="jsonl: the design's events (impressions/clicks joined in event time); libsvm/libffm, "
        "criteo (CSV with header), criteo_tsv (Kaggle train.txt), avazu: labeled rows; "
        "talkingdata: impressions with their real conversion delays",
    )
    replay.add_argument("--report", type=Path, help="write the JSON report here")
    replay.add_argument("--plot", type=Path, help="draw rolling log loss and NE to this PNG")
    replay.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_setting_flags(replay, LEARNING_SETTINGS)

    compile_ = commands.add_parser(
        "compile",
        help="compile the kernels into numba's cache (NUMBA_CACHE_DIR, else __pycache__): "
        "install time, so no run pays for it",
    )
    _add_setting_flags(compile_, None)

    _simulate_parser(commands)
    _demo_parser(commands)
    _bench_parser(commands)
    return parser


def _simulate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate = commands.add_parser(
        "simulate", help="synthetic traffic from a ground-truth FM, streamed to a file or Kafka"
    )
    _with_defaults(
        simulate,
        ("--out", {"help": "JSONL file to write (.gz compresses; - = standard output)"}),
        ("--impressions", {"type": int, "default": 100_000, "help": "impressions (0 = no end)"}),
        ("--fields", {"type": int, "default": 20, "help": "categorical fields per impression"}),
        ("--max-cardinality", {"type": int, "default": 100_000, "help": "largest field's values"}),
        ("--k", {"type": int, "default": 4, "help": "latent dimension of the ground truth"}),
        ("--base-ctr", {"type": float, "default": 0.03, "help": "mean click probability"}),
        (
            "--impressions-per-s",
            {"type": float, "default": 10.0, "help": "event-time rate (sets windows spanned)"},
        ),
        ("--attribution-window-s", {"type": float, "default": 3600.0, "help": "label window"}),
        ("--click-delay-median-s", {"type": float, "default": 30.0, "help": "median delay"}),
        (
            "--drift-at",
            {"type": int, "default": 0, "help": "impression where a new truth starts (0: never)"},
        ),
        ("--seed", {"type": int, "default": 7, "help": "seed of the ground truth and draws"}),
        ("--summary", {"help": "write the ground-truth summary (JSON) here"}),
    )
    kafka = simulate.add_argument_group("to Kafka instead of a file")
    _with_defaults(
        kafka,
        ("--bootstrap-servers", {"help": "produce to this Kafka cluster"}),
        ("--topic", {"default": "ad-events", "help": "topic for impressions (and clicks)"}),
        ("--clicks-topic", {"help": "a separate topic for clicks (same partition count)"}),
        ("--rate", {"type": float, "default": 0.0, "help": "events/s (0 = as fast as possible)"}),
        ("--duration-s", {"type": float, "help": "produce for this long at --rate"}),
        (
            "--kafka-client",
            {
                "default": "kafka-python",
                "choices": ("kafka-python", "confluent"),
                "help": "the producer's client (confluent: librdkafka, for high rates)",
            },
        ),
    )


def _demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo", help="Kafka + simulator + worker on this machine, progress printed"
    )
    _with_defaults(
        demo,
        ("--rate", {"type": float, "default": 5000.0, "help": "simulated events per second"}),
        ("--duration-s", {"type": float, "help": "stop after this long (default: until Ctrl-C)"}),
        (
            "--metrics-port",
            {
                "type": int,
                "default": 9464,
                "help": "the worker's /metrics port; a free one if taken (0 = always a free one)",
            },
        ),
        ("--partitions", {"type": int, "default": 2, "help": "partitions of every topic"}),
        ("--work-dir", {"type": Path, "help": "logs and checkpoints (default: a new temp dir)"}),
        (
            "--secure",
            {
                "action": "store_true",
                "help": "Kafka with SASL_SSL, mTLS and ACLs; the worker logs in with SCRAM",
            },
        ),
        (
            "--prometheus",
            {
                "action": "store_true",
                "help": "also run a real Prometheus (Debian package) scraping the worker, "
                "with the alert rules",
            },
        ),
        (
            "--snapshot",
            {
                "type": Path,
                "help": "at the end, draw the dashboard's key panels from Prometheus into this "
                "PNG (implies --prometheus; needs --duration-s)",
            },
        ),
    )


def _bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench", help="stream-fm vs river vs Vowpal Wabbit on the same streams, side by side"
    )
    _with_defaults(
        bench,
        (
            "--streams",
            {
                "default": ",".join(BENCH_STREAMS),
                "help": "comma-separated, of: " + ", ".join(BENCH_STREAMS),
            },
        ),
        (
            "--events",
            {"type": int, "default": 2_000_000, "help": "events of the simulated-long stream"},
        ),
        (
            "--river-events",
            {"type": int, "default": 20_000, "help": "prefix every engine runs beside river"},
        ),
        ("--data-dir", {"type": Path, "default": DATA_DIR, "help": "real logs"}),
        ("--json", {"type": Path, "help": "write all figures as JSON here"}),
    )
    _add_setting_flags(bench, LEARNING_SETTINGS)
    targets = bench.add_subparsers(
        dest="bench_target",
        metavar="kafka|sync|scale|coldstart|hashsize",
        help="`stream-fm bench kafka --help`: the worker on a real broker; `stream-fm bench "
        "sync --help`: N workers as one model, offline; `stream-fm bench scale --help`: a group "
        "of N real workers with model sync; `stream-fm bench coldstart --help`: a fresh "
        "machine's first replay against a steady one; `stream-fm bench hashsize --help`: log "
        "loss, memory and checkpoint size by hash size (default: the model benchmark)",
    )
    hashsize = targets.add_parser(
        "hashsize",
        help="the default settings at each hash size on the 2M simulated stream and the real "
        "logs, each run its own process: log loss, peak RSS, checkpoint size",
    )
    _with_defaults(
        hashsize,
        ("--streams", {"default": "simulated-long,talkingdata,ipinyou,criteo-10k,avazu-9k,"
                       "criteo-2k,avazu-3k", "help": "streams (names of `stream-fm bench`)"}),
        ("--bits", {"default": "18,20,22,24", "help": "hash_bits values"}),
        ("--events", {"type": int, "default": 2_000_000, "help": "events of simulated-long"}),
        ("--data-dir", {"type": Path, "default": DATA_DIR, "help": "real logs"}),
        ("--json", {"type": Path, "help": "write the figures as JSON here"}),
    )  # fmt: skip
    coldstart = targets.add_parser(
        "coldstart",
        help="replay on an empty numba cache, `stream-fm compile`, then the first and a steady "
        "replay, each its own process: the first run after install against the steady one",
    )
    _with_defaults(
        coldstart,
        ("--impressions", {"type": int, "default": 300_000, "help": "simulated impressions"}),
        ("--json", {"type": Path, "help": "write the figures as JSON here"}),
    )
    scale = targets.add_parser(
        "scale",
        help="one group of N real `stream-fm run` processes on a local broker, with model sync "
        "and without: served log loss, events/s and update traffic against one worker",
    )
    _with_defaults(
        scale,
        ("--streams", {"default": ",".join(SYNC_STREAMS), "help": "comma-separated, of: "
                       + ", ".join(("simulated", *SYNC_STREAMS[1:]))}),
        ("--workers", {"default": "1,2,4", "help": "comma-separated numbers of workers (1 too)"}),
        ("--interval-ms", {"type": int, "default": 200, "help": "model_sync_interval_ms"}),
        ("--rate", {"type": float, "default": 0.0,
                    "help": "events/s the log arrives at (0: all at once, a backlog)"}),
        ("--no-independent", {"action": "store_true",
                              "help": "skip the groups without model sync"}),
        ("--kafka-client", {"default": "kafka-python", "help": "the workers' kafka_client"}),
        ("--data-dir", {"type": Path, "default": DATA_DIR, "help": "real logs"}),
        ("--work-dir", {"type": Path, "default": Path("bench-scale"),
                        "help": "broker log, worker logs, checkpoints"}),
        ("--json", {"type": Path, "help": "write all figures as JSON here"}),
    )  # fmt: skip
    sync = targets.add_parser(
        "sync",
        help="N workers of one group as independent models and as one model kept in step by "
        "exchanging increments, offline: served log loss against one worker",
    )
    _with_defaults(
        sync,
        (
            "--streams",
            {
                "default": ",".join(SYNC_STREAMS),
                "help": "comma-separated, of: " + ", ".join(BENCH_STREAMS),
            },
        ),
        ("--workers", {"default": "2,4", "help": "comma-separated numbers of workers"}),
        ("--every", {"default": "100,1000", "help": "comma-separated events between exchanges"}),
        ("--events", {"type": int, "default": 2_000_000, "help": "events of simulated-long"}),
        ("--data-dir", {"type": Path, "default": DATA_DIR, "help": "real logs"}),
        ("--json", {"type": Path, "help": "write all figures as JSON here"}),
    )
    _add_setting_flags(sync, (*LEARNING_SETTINGS, *SYNC_SETTINGS))
    kafka = targets.add_parser(
        "kafka",
        help="the worker against bare client loops and a bare Quix Streams application on a "
        "local Apache Kafka: throughput, latency at fixed rates, memory, scale-out",
    )
    _with_defaults(
        kafka,
        ("--events", {"type": int, "default": 5_000_000, "help": "records preloaded"}),
        ("--partitions", {"type": int, "default": 2, "help": "partitions per topic"}),
        (
            "--clients",
            {
                "default": "kafka-python,confluent",
                "help": "Kafka clients to measure (ceilings, worker, latency); the last one "
                "also produces the latency load and runs the scale-out",
            },
        ),
        ("--no-quix", {"action": "store_true", "help": "leave out the Quix Streams application"}),
        (
            "--rates",
            {
                "default": "10000,50000",
                "help": "comma-separated offered rates (events/s) of the latency phases; "
                "empty = none",
            },
        ),
        (
            "--latency-duration-s",
            {
                "type": float,
                "default": 100.0,
                "help": "seconds per rate (100: three checkpoints at the default interval)",
            },
        ),
        (
            "--latency-warmup-s",
            {"type": float, "default": 10.0, "help": "seconds left out of the latency quantiles"},
        ),
        (
            "--impressions-per-s",
            {"type": float, "default": 10.0, "help": "event-time rate of the simulated data"},
        ),
        ("--attribution-window-s", {"type": float, "default": 3600.0, "help": "label window"}),
        ("--seed", {"type": int, "default": 7, "help": "seed of the simulated data"}),
        ("--labels", {"action": "store_true", "help": "also publish the worker's labels topic"}),
        (
            "--py-spy",
            {
                "type": Path,
                "help": "profile the worker's throughput phase with py-spy into this file "
                "(.svg flame graph, .json speedscope, else raw collapsed stacks)",
            },
        ),
        (
            "--scale-out-events",
            {"type": int, "default": 1_000_000, "help": "records of the scale-out phase (0: none)"},
        ),
        (
            "--scale-out-partitions",
            {"type": int, "default": 4, "help": "partitions of the scale-out topics"},
        ),
        (
            "--kafka-python-versions",
            {
                "default": "",
                "help": "comma-separated kafka-python releases (e.g. 2.3.3,3.0.12; repeats "
                "allowed) whose bare loops run after the installed one's, each in a child "
                "process on the same topic (pip installs them into the work dir)",
            },
        ),
        ("--work-dir", {"type": Path, "help": "logs and checkpoints (default: a temp dir)"}),
        ("--json", {"type": Path, "help": "write all figures as JSON here"}),
    )


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
            "compile": _compile,
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
    from stream_fm.replay import run_replay

    return run_replay(
        _settings(args),
        args.path,
        args.format,
        report_path=args.report,
        plot_path=args.plot,
        progress=not args.no_progress,
    )


def _compile(args: argparse.Namespace) -> int:
    import os

    from stream_fm.warmup import warm_up

    seconds = warm_up(_settings(args))
    where = os.environ.get("NUMBA_CACHE_DIR") or "__pycache__ beside the sources"
    print(f"stream-fm: kernels compiled or loaded in {seconds:.1f} s (cache: {where})")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from stream_fm.tools.simulate import SimulationParams, run_simulation

    n_impressions = args.impressions
    if args.duration_s is not None:
        if args.rate <= 0:
            raise StreamFMError("simulate: --duration-s needs --rate")
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
        drift_at=args.drift_at,
        seed=args.seed,
    )
    return run_simulation(
        params,
        out=args.out,
        bootstrap_servers=args.bootstrap_servers,
        topic=args.topic,
        clicks_topic=args.clicks_topic,
        rate=args.rate,
        summary_path=args.summary,
        kafka_client=args.kafka_client,
    )


def _demo(args: argparse.Namespace) -> int:
    from stream_fm.tools.demo import DemoOptions, main_demo

    if args.snapshot is not None and args.duration_s is None:
        raise StreamFMError("demo: --snapshot needs --duration-s")
    return main_demo(
        DemoOptions(
            rate=args.rate,
            duration_s=args.duration_s,
            metrics_port=args.metrics_port,
            partitions=args.partitions,
            work_dir=args.work_dir,
            prometheus=args.prometheus or args.snapshot is not None,
            snapshot=args.snapshot,
            secure=args.secure,
        )
    )


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise StreamFMError(f"bench: {flag}: not whole numbers: {text!r}") from None


def _bench(args: argparse.Namespace) -> int:
    from stream_fm.tools.process import sigterm_as_interrupt

    with sigterm_as_interrupt():
        return _bench_target(args)


def _bench_target(args: argparse.Namespace) -> int:
    if getattr(args, "bench_target", None) == "hashsize":
        from stream_fm.tools.bench.hashsize import main_hashsize

        streams = [name for name in args.streams.split(",") if name.strip()]
        bits = _ints(args.bits, "--bits")
        return main_hashsize(streams, bits, args.data_dir, args.events, args.json)
    if getattr(args, "bench_target", None) == "coldstart":
        from stream_fm.tools.bench.coldstart import main_coldstart

        return main_coldstart(args.impressions, args.json)
    if getattr(args, "bench_target", None) == "kafka":
        from stream_fm.tools.bench.kafka import KafkaBenchOptions, main_kafka_bench

        try:
            rates = tuple(float(r) for r in args.rates.split(",") if r.strip())
        except ValueError:
            raise StreamFMError(f"bench kafka: --rates: not numbers: {args.rates!r}") from None
        options = KafkaBenchOptions(
            events=args.events,
            partitions=args.partitions,
            clients=tuple(c.strip() for c in args.clients.split(",") if c.strip()),
            quix=not args.no_quix,
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
            kafka_python_versions=tuple(
                v.strip() for v in args.kafka_python_versions.split(",") if v.strip()
            ),
        )
        return main_kafka_bench(options, args.json)
    if getattr(args, "bench_target", None) == "scale":
        from stream_fm.tools.bench.scale import main_scale_bench

        return main_scale_bench(
            [s.strip() for s in args.streams.split(",") if s.strip()],
            _ints(args.workers, "--workers"),
            interval_ms=args.interval_ms,
            rate=args.rate,
            independent=not args.no_independent,
            kafka_client=args.kafka_client,
            data_dir=args.data_dir,
            work_dir=args.work_dir,
            json_path=args.json,
        )
    if getattr(args, "bench_target", None) == "sync":
        from stream_fm.tools.bench.sync import main_sync_bench

        return main_sync_bench(
            _settings(args),
            [s.strip() for s in args.streams.split(",") if s.strip()],
            _ints(args.workers, "--workers"),
            _ints(args.every, "--every"),
            long_events=args.events,
            data_dir=args.data_dir,
            json_path=args.json,
        )
    from stream_fm.tools.bench.model import main_bench

    streams = [s.strip() for s in args.streams.split(",") if s.strip()]
    return main_bench(
        _settings(args),
        streams,
        long_events=args.events,
        river_events=args.river_events,
        data_dir=args.data_dir,
        json_path=args.json,
    )
