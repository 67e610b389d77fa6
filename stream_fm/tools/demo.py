"""``stream-fm demo``: a real Apache Kafka broker, the simulator and the worker together.

The broker runs as a child JVM (KRaft mode, jars from Maven Central); the worker and the
simulator are child processes, exactly as an operator would run them, each writing to its own
log file in the demo's directory. The demo supervises them: a child that exits is reported
at once with its log's last lines, and the demo stops the others and exits 1. Every few
seconds it reads the worker's own /metrics and prints progressive log loss and NE since start
and over the recent window, AUC and throughput. Ctrl-C (or ``--duration-s``) stops every
child in order; every child also dies with the demo if it is killed outright.

``--secure`` starts Kafka with SASL_SSL, mutual TLS and the StandardAuthorizer; the worker
logs in with SCRAM from a password file, holding only the ACLs it needs.

``--prometheus`` adds a real Prometheus server scraping the worker with the alert rules of
deploy/prometheus/alerts.yml; ``--snapshot PNG`` then draws the dashboard's key panels from it.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stream_fm.config import load_settings
from stream_fm.errors import StreamFMError
from stream_fm.kafka.acls import required_acls
from stream_fm.tools.broker import KafkaBroker
from stream_fm.tools.broker.secure import SecuredBroker
from stream_fm.tools.dashboard import render_snapshot
from stream_fm.tools.process import Child, free_ports, port_is_free, sigterm_as_interrupt
from stream_fm.tools.prometheus import JOB, PrometheusServer, repo_rule_files
from stream_fm.tools.scratch import scratch_dir

TOPICS = {
    "events": "ad-events",
    "predictions": "ad-predictions",
    "dead_letters": "ad-events-dlq",
    "labels": "ad-labels",
}
# Simulated event time runs at 1,000 impressions/s, so a 10 s window closes within seconds
# of wall time: the demo shows labels, learning and NE moving within its first minute.
EVENT_TIME_IMPRESSIONS_PER_S = 1000
ATTRIBUTION_WINDOW_S = 10
SUPERVISE_EVERY_S = 0.5
# What a demo in a temp dir removes when it ends: hundreds of MB per run otherwise.
DEMO_BULK = ("checkpoints", "kafka", "prometheus/data")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    rate: float = 5000.0
    duration_s: float | None = None
    metrics_port: int = 9464
    partitions: int = 2
    work_dir: Path | None = None
    prometheus: bool = False
    snapshot: Path | None = None
    every_s: float = 5.0
    secure: bool = False  # the worker logs in over SASL_SSL with only the ACLs it needs


class ChildExited(StreamFMError):
    """A child of the demo exited while it should have been running."""


def scrape(url: str) -> dict[str, float]:
    """Metric samples of a /metrics page, summed over labels, by sample name."""
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _say(line: str) -> None:
    print(line, flush=True)


def _metrics_port(requested: int) -> int:
    if requested and port_is_free("127.0.0.1", requested):
        return requested
    port = free_ports()[0]
    if requested:
        _say(f"demo: port {requested} is taken; the worker's metrics go to port {port} instead")
    return port


def _secured_worker(broker: SecuredBroker, work: Path) -> dict[str, str]:
    """SASL_SSL with SCRAM-SHA-512 as user ``worker``, the password in a 0600 file, the
    throwaway CA trusted, and exactly the ACLs the worker's settings need granted."""
    values = broker.client_settings("SASL_SSL", "SCRAM-SHA-512")
    password = work / "sasl-password"
    password.write_text(values.pop("sasl_password") + "\n")
    password.chmod(0o600)
    env = {f"STREAM_FM_{name.upper()}": str(value) for name, value in values.items()}
    env["STREAM_FM_SASL_PASSWORD_FILE"] = str(password)
    broker.grant("worker", required_acls(load_settings(env={**_DEMO_SETTINGS, **env})))
    return env


_DEMO_SETTINGS = {
    "STREAM_FM_INPUT_TOPICS": TOPICS["events"],
    "STREAM_FM_PREDICTIONS_TOPIC": TOPICS["predictions"],
    "STREAM_FM_DEAD_LETTER_TOPIC": TOPICS["dead_letters"],
    "STREAM_FM_LABELS_TOPIC": TOPICS["labels"],
    "STREAM_FM_GROUP_ID": "stream-fm-demo",
}


def _worker_env(
    broker: KafkaBroker, work: Path, port: int, secured: dict[str, str] | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "STREAM_FM_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            **_DEMO_SETTINGS,
            "STREAM_FM_CHECKPOINT_DIR": str(work / "checkpoints"),
            "STREAM_FM_CHECKPOINT_INTERVAL_S": "10",
            "STREAM_FM_METRICS_PORT": str(port),
            "STREAM_FM_ATTRIBUTION_WINDOW_S": str(ATTRIBUTION_WINDOW_S),
            "STREAM_FM_LOG_LEVEL": "WARNING",
        }
    )
    env.update(secured or {})
    return env


def _simulator_command(broker: KafkaBroker, options: DemoOptions) -> list[str]:
    command = [
        sys.executable, "-m", "stream_fm", "simulate",
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", TOPICS["events"],
        "--rate", str(options.rate),
        "--impressions-per-s", str(EVENT_TIME_IMPRESSIONS_PER_S),
        "--attribution-window-s", str(ATTRIBUTION_WINDOW_S),
        "--click-delay-median-s", "2", "--fields", "20",
    ]  # fmt: skip
    if options.duration_s is not None:
        return [*command, "--duration-s", str(options.duration_s)]
    return [*command, "--impressions", "0"]  # no end: until the demo stops it


class _Progress:
    """The progress line from the worker's /metrics, and whether traffic flows yet."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started = time.monotonic()
        self.first_traffic_s: float | None = None
        self.last: dict[str, float] = {}
        self._previous: tuple[float, float] | None = None

    def line(self) -> str | None:
        try:
            m = scrape(self.url)
        except OSError:
            return None
        now = time.monotonic()
        events = m.get("stream_fm_events_total", 0.0)
        since, before = self._previous or (self.started, 0.0)
        rate = (events - before) / max(now - since, 1e-9)
        self._previous = (now, events)
        self.last = m
        if events > 0 and self.first_traffic_s is None:
            self.first_traffic_s = now - self.started

        def get(name: str) -> str:
            # NE and AUC need both labels: until the first window closes only clicks are final.
            value = m.get(name, math.nan)
            return f"{value:.4f}" if math.isfinite(value) else "-"

        return (
            f"t={now - self.started:5.0f}s events={events:,.0f} ({rate:,.0f}/s) "
            f"predictions={m.get('stream_fm_predictions_total', 0):,.0f} "
            f"learned={m.get('stream_fm_examples_learned_total', 0):,.0f} "
            f"logloss={get('stream_fm_progressive_logloss')} "
            f"(window {get('stream_fm_logloss_window')}) "
            f"NE={get('stream_fm_normalized_entropy')} "
            f"(window {get('stream_fm_normalized_entropy_window')}) "
            f"AUC={get('stream_fm_auc_window')} "
            f"pending={m.get('stream_fm_pending_impressions', 0):,.0f}"
        )


def _supervise(children: list[Child], broker: KafkaBroker) -> None:
    """Raise ChildExited naming the first child that is gone, with its log's last lines."""
    if not broker.is_running():
        raise ChildExited(f"Apache Kafka exited; its log {broker.log_path}:\n{broker.log_tail(15)}")
    for child in children:
        code = child.exit_code()
        if code is not None:
            raise ChildExited(
                f"the {child.name} exited with code {code}; its log {child.log_path}:\n"
                f"{child.tail(15)}"
            )


def run_demo(options: DemoOptions) -> int:
    """The demo in ``--work-dir``, or in a temp dir whose checkpoints go when it ends."""
    with scratch_dir(options.work_dir, "stream-fm-demo-", DEMO_BULK) as work:
        code, quality = _run_demo_in(options, work)
    removed = "" if options.work_dir else " (its checkpoints removed)"
    _say(
        f"demo: stopped every child it started (Kafka included){quality}; "
        f"logs are in {work}{removed}"
    )
    return code


def _run_demo_in(options: DemoOptions, work: Path) -> tuple[int, str]:
    """Broker, worker, simulator (and Prometheus) until Ctrl-C; the exit code and last NE."""
    _say(
        f"demo: logs in {work}: kafka.log, worker.log, simulator.log"
        + (", prometheus/prometheus.log" if options.prometheus else "")
    )
    _say("demo: starting Apache Kafka (KRaft); the first run fetches its jars with Maven ...")
    code = 0
    kind = SecuredBroker if options.secure else KafkaBroker
    with (
        sigterm_as_interrupt(),
        kind(
            data_dir=_fresh(work / "kafka"),
            log_path=work / "kafka.log",
            partitions=options.partitions,
        ) as broker,
    ):
        _say(f"demo: Kafka {broker.kafka_version} on {broker.bootstrap_servers} (pid {broker.pid})")
        broker.create_topics(TOPICS.values(), partitions=options.partitions)
        secured = _secured_worker(broker, work) if isinstance(broker, SecuredBroker) else None
        if secured is not None:
            _say(
                f"demo: secured: the worker logs in on {secured['STREAM_FM_BOOTSTRAP_SERVERS']} "
                "over SASL_SSL (SCRAM-SHA-512) as 'worker', with only the ACLs it needs "
                f"(password file {secured['STREAM_FM_SASL_PASSWORD_FILE']})"
            )
        port = _metrics_port(options.metrics_port)
        children: list[Child] = []
        prom: PrometheusServer | None = None
        progress: _Progress | None = None  # Ctrl-C can come before the first progress line
        try:
            worker = Child(
                "worker",
                [sys.executable, "-m", "stream_fm", "run"],
                work / "worker.log",
                env=_worker_env(broker, work, port, secured),
            )
            children.append(worker)
            simulator = Child(
                "simulator", _simulator_command(broker, options), work / "simulator.log"
            )
            children.append(simulator)
            url = f"http://127.0.0.1:{port}/metrics"
            _say(
                f"demo: worker (pid {worker.pid}) metrics on {url}; simulator (pid "
                f"{simulator.pid}) at {options.rate:,.0f} events/s; Ctrl-C stops"
            )
            if options.prometheus:
                prom = PrometheusServer(
                    work / "prometheus",
                    [f"127.0.0.1:{port}"],
                    scrape_interval_s=2.0,
                    rule_files=repo_rule_files(),
                ).start()
                _say(
                    f"demo: Prometheus on {prom.url} (job {JOB!r}, alert rules loaded); try "
                    f"{prom.url}/graph?g0.expr=rate(stream_fm_events_total[1m])"
                )
            progress = _Progress(url)
            code = _watch(options, children, broker, progress, prom)
        except KeyboardInterrupt:
            _say("\ndemo: stopping")
        except ChildExited as error:
            print(f"demo: {error}", file=sys.stderr, flush=True)
            code = 1
        finally:
            code = _stop_children(children, prom, work, code)
    return code, _quality(progress)


def _fresh(path: Path) -> Path:
    """An empty directory at ``path``: every demo starts a new cluster, even in --work-dir."""
    shutil.rmtree(path, ignore_errors=True)
    return path


def _quality(progress: _Progress | None) -> str:
    """The model's quality at the last progress line, for the demo's last line."""
    m = progress.last if progress is not None else {}
    ne = m.get("stream_fm_normalized_entropy_window", math.nan)
    if math.isnan(ne):
        return ""
    learned = m.get("stream_fm_examples_learned_total", 0)
    verdict = "better than" if ne < 1 else "not yet better than"
    return (
        f"; rolling NE {ne:.3f} over the last {min(learned, 100_000):,.0f} examples "
        f"({verdict} serving the average click rate)"
    )


def _watch(
    options: DemoOptions,
    children: list[Child],
    broker: KafkaBroker,
    progress: _Progress,
    prom: PrometheusServer | None,
) -> int:
    """Supervise and print progress until the duration is over (or Ctrl-C)."""
    started_wall_s = time.time()
    next_line = time.monotonic() + options.every_s
    while options.duration_s is None or time.monotonic() - progress.started < options.duration_s:
        time.sleep(SUPERVISE_EVERY_S)
        # A bounded simulator that finished is done, not dead.
        running = [
            c
            for c in children
            if not (c.name == "simulator" and options.duration_s and c.exit_code() == 0)
        ]
        _supervise(running, broker)
        if time.monotonic() >= next_line:
            next_line += options.every_s
            had_traffic = progress.first_traffic_s is not None
            line = progress.line()
            if line is not None:
                _say(line)
            if not had_traffic and progress.first_traffic_s is not None:
                _say(
                    f"demo: events flowing {progress.first_traffic_s:.0f}s after the worker started"
                )
    if prom is not None and options.snapshot is not None:
        drawn = render_snapshot(prom, options.snapshot, start_s=started_wall_s)
        _say(f"demo: drew {drawn} series of the dashboard's panels into {options.snapshot}")
    return 0


def _stop_children(
    children: list[Child], prom: PrometheusServer | None, work: Path, code: int
) -> int:
    """Simulator first, then the worker (it drains and checkpoints), then Prometheus."""
    for child in reversed(children):
        exit_code = child.stop()
        if child.name == "worker":
            summary = [line for line in child.tail(50).splitlines() if "worker stopped" in line]
            if summary:
                _say(summary[-1])
            if exit_code != 0 and code == 0:
                print(f"demo: the worker exited with {exit_code}; see {child.log_path}")
                code = 1
    if prom is not None:
        prom.stop()
    return code


def main_demo(options: DemoOptions) -> int:
    try:
        return run_demo(options)
    except StreamFMError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
