"""``stream-fm demo``: a real Apache Kafka broker, the simulator and the worker together.

The broker runs as a child process (KRaft mode, jars from Maven Central); the worker and the
simulator are child processes of this one, exactly as an operator would run them. Every few
seconds the demo reads the worker's own /metrics and prints progressive log loss, NE and
throughput. Ctrl-C (or ``--duration-s``) stops every child cleanly.

``--prometheus`` adds a real Prometheus server scraping the worker with the alert rules of
deploy/prometheus/alerts.yml; ``--snapshot PNG`` then draws the dashboard's key panels from it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from stream_fm.broker import KafkaBroker, free_ports
from stream_fm.dashboard import render_snapshot
from stream_fm.errors import StreamFMError
from stream_fm.prometheus_server import JOB, PrometheusServer, repo_rule_files

TOPICS = {
    "events": "ad-events",
    "predictions": "ad-predictions",
    "dead_letters": "ad-events-dlq",
    "labels": "ad-labels",
}


def scrape(url: str) -> dict[str, float]:
    """Metric samples of a /metrics page, summed over labels, by sample name."""
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _stop(process: subprocess.Popen[bytes], name: str, timeout_s: float = 20.0) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"demo: {name} did not stop in {timeout_s:.0f}s; killing it", file=sys.stderr)
            process.kill()
            process.wait()
    return process.returncode


def run_demo(
    rate: float,
    duration_s: float | None,
    metrics_port: int,
    partitions: int,
    every_s: float = 5.0,
    *,
    prometheus: bool = False,
    snapshot: Path | None = None,
) -> int:
    work = Path(tempfile.mkdtemp(prefix="stream-fm-demo-"))
    print(
        "demo: starting Apache Kafka (KRaft) - the first run downloads its jars with Maven ...",
        flush=True,
    )
    with KafkaBroker(log_path=work / "kafka.log", partitions=partitions) as broker:
        print(
            f"demo: Kafka {broker.kafka_version} on {broker.bootstrap_servers}; log {broker.log_path}",
            flush=True,
        )
        broker.create_topics(TOPICS.values(), partitions=partitions)
        port = metrics_port or free_ports()[0]
        env = dict(os.environ)
        env.update(
            {
                "STREAM_FM_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                "STREAM_FM_INPUT_TOPICS": TOPICS["events"],
                "STREAM_FM_PREDICTIONS_TOPIC": TOPICS["predictions"],
                "STREAM_FM_DEAD_LETTER_TOPIC": TOPICS["dead_letters"],
                "STREAM_FM_LABELS_TOPIC": TOPICS["labels"],
                "STREAM_FM_GROUP_ID": "stream-fm-demo",
                "STREAM_FM_CHECKPOINT_DIR": str(work / "checkpoints"),
                "STREAM_FM_CHECKPOINT_INTERVAL_S": "10",
                "STREAM_FM_METRICS_PORT": str(port),
                # Simulated time runs at event rate / impressions-per-s: a 10 s window closes fast.
                "STREAM_FM_ATTRIBUTION_WINDOW_S": "10",
                "STREAM_FM_LOG_LEVEL": "WARNING",
            }
        )
        worker_log = (work / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "stream_fm", "run"],
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
        simulate_args = [
            sys.executable, "-m", "stream_fm", "simulate",
            "--bootstrap-servers", broker.bootstrap_servers, "--topic", TOPICS["events"],
            "--rate", str(rate), "--impressions-per-s", "1000", "--attribution-window-s", "10",
            "--click-delay-median-s", "2", "--fields", "20",
            "--duration-s", str(duration_s if duration_s is not None else 24 * 3600),
        ]  # fmt: skip
        simulator = subprocess.Popen(
            simulate_args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}/metrics"
        print(
            f"demo: worker metrics on {url}; worker log {work / 'worker.log'}; Ctrl-C stops",
            flush=True,
        )
        started = time.monotonic()
        started_wall_s = time.time()
        previous: tuple[float, float] | None = None
        code = 0
        prom: PrometheusServer | None = None
        try:
            if prometheus or snapshot is not None:
                prom = PrometheusServer(
                    work / "prometheus",
                    [f"127.0.0.1:{port}"],
                    scrape_interval_s=2.0,
                    rule_files=repo_rule_files(),
                ).start()
                print(
                    f"demo: Prometheus on {prom.url} (job {JOB!r}, alert rules loaded); "
                    f"try {prom.url}/graph?g0.expr=rate(stream_fm_events_total[1m])",
                    flush=True,
                )
            while duration_s is None or time.monotonic() - started < duration_s:
                time.sleep(every_s)
                if worker.poll() is not None:
                    print(
                        f"demo: the worker exited with {worker.returncode}; see {work / 'worker.log'}",
                        file=sys.stderr,
                    )
                    code = 1
                    break
                with contextlib.suppress(OSError):
                    m = scrape(url)
                    events = m.get("stream_fm_events_total", 0.0)
                    now = time.monotonic()
                    rate_now = (events - previous[1]) / (now - previous[0]) if previous else 0.0
                    previous = (now, events)
                    print(
                        f"t={now - started:5.0f}s events={events:,.0f} ({rate_now:,.0f}/s) "
                        f"predictions={m.get('stream_fm_predictions_total', 0):,.0f} "
                        f"learned={m.get('stream_fm_examples_learned_total', 0):,.0f} "
                        f"logloss={m.get('stream_fm_progressive_logloss', float('nan')):.4f} "
                        f"NE={m.get('stream_fm_normalized_entropy', float('nan')):.4f} "
                        f"AUC={m.get('stream_fm_auc_window', float('nan')):.4f} "
                        f"pending={m.get('stream_fm_pending_impressions', 0):,.0f}",
                        flush=True,
                    )
            if prom is not None and snapshot is not None and code == 0:
                drawn = render_snapshot(prom, snapshot, start_s=started_wall_s)
                print(f"demo: drew {drawn} series of the dashboard's panels into {snapshot}")
        except KeyboardInterrupt:
            print("\ndemo: stopping", flush=True)
        finally:
            if prom is not None:
                prom.stop()
            _stop(simulator, "simulator")
            worker_code = _stop(worker, "worker")
            worker_log.close()
            summary = [
                line
                for line in (work / "worker.log").read_text().splitlines()
                if "worker stopped" in line
            ]
            if summary:
                print(summary[-1])
            if worker_code not in (0, None) and code == 0:
                code = 1
    print("demo: stopped the worker, the simulator and Kafka", flush=True)
    return code


def main_demo(
    rate: float,
    duration_s: float | None,
    metrics_port: int,
    partitions: int,
    *,
    prometheus: bool = False,
    snapshot: Path | None = None,
) -> int:
    try:
        return run_demo(
            rate, duration_s, metrics_port, partitions, prometheus=prometheus, snapshot=snapshot
        )
    except StreamFMError as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
