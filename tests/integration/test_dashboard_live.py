"""The dashboard and the alert rules against live data: real broker, worker, simulator, Prometheus.

The simulator (``stream-fm simulate --bootstrap-servers``) produces at a fixed rate while the
worker scores and learns; a few malformed, duplicate and orphan records are mixed in, as in
production. Prometheus (Debian package) scrapes the worker every second with the rules of
deploy/prometheus/alerts.yml loaded. Then every panel query of the dashboard must return data,
every rule must evaluate without error, and the scraped text must pass ``promtool check metrics``.
"""

from __future__ import annotations

import base64
import math
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import bcrypt
import orjson
import pytest
import yaml
from prometheus_client import CollectorRegistry

from stream_fm.tools.broker import KafkaBroker
from stream_fm.tools.broker.tls import CertificateAuthority
from stream_fm.tools.dashboard import load_dashboard, panel_queries
from stream_fm.tools.prometheus import PrometheusServer
from tests.integration.conftest import UniqueTopic
from tests.integration.kafka_helpers import WorkerThread, produce, worker_settings
from tests.prometheus_helpers import (
    ALERTS,
    DASHBOARD,
    DESIGN_COUNTERS,
    DESIGN_GAUGES,
    DESIGN_HISTOGRAMS,
    referenced_metrics,
    require_prometheus,
    require_promtool,
)

SIMULATE_S = 40


def _finite_values(result: list[dict[str, Any]]) -> list[float]:
    values = [float(series["value"][1]) for series in result]
    return [v for v in values if math.isfinite(v)]


def _lag(registry: CollectorRegistry) -> float:
    samples = [
        sample.value
        for family in registry.collect()
        if family.name == "stream_fm_consumer_lag"
        for sample in family.samples
    ]
    return sum(samples) if samples else math.inf


def _odd_records(start_ts_ms: int) -> list[tuple[bytes | None, bytes]]:
    """What production input also holds: garbage, duplicates, a click for no impression."""
    impression = {"type": "impression", "id": "dup-1", "ts": start_ts_ms, "features": {"f": "a"}}
    return [
        (None, b"{not json"),
        (b"x", orjson.dumps({"type": "impression", "id": "no-ts", "features": {}})),
        (b"dup-1", orjson.dumps(impression)),
        (b"dup-1", orjson.dumps(impression)),
        (b"orphan", orjson.dumps({"type": "click", "id": "never-shown", "ts": start_ts_ms})),
    ]


class SecuredMetrics:
    """A web config file (exporter-toolkit format) with a throwaway CA's server certificate
    and one bcrypt user, and what Prometheus needs to scrape through it."""

    def __init__(self, directory: Path, ca: CertificateAuthority, password: str) -> None:
        self.directory, self.ca, self.password = directory, ca, password
        self.config = directory / "web.yml"

    @classmethod
    def create(cls, directory: Path) -> SecuredMetrics:
        ca = CertificateAuthority.create(directory, "metrics-ca")
        server = ca.issue("metrics", hosts=("127.0.0.1",))
        password = uuid.uuid4().hex
        web = cls(directory, ca, password)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=10)).decode()
        web.config.write_text(
            yaml.safe_dump(
                {
                    "tls_server_config": {
                        "cert_file": server.cert.name,
                        "key_file": server.key.name,
                    },
                    "basic_auth_users": {"prometheus": hashed},
                }
            )
        )
        (directory / "password").write_text(password)
        return web

    def prometheus_scrape(self) -> dict[str, Any]:
        return {
            "scheme": "https",
            "tls_config": {"ca_file": str(self.ca.cert_path)},
            "basic_auth": {
                "username": "prometheus",
                "password_file": str(self.directory / "password"),
            },
        }

    def get(self, url: str, password: str | None = None) -> bytes:
        context = ssl.create_default_context(cafile=str(self.ca.cert_path))
        token = base64.b64encode(f"prometheus:{password or self.password}".encode()).decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return bytes(response.read())

    def assert_guarded(self, base_url: str) -> None:
        """/metrics wants the password; the probes' endpoints answer without it, over TLS."""
        assert base_url.startswith("https://")
        context = ssl.create_default_context(cafile=str(self.ca.cert_path))
        for headers in (
            {},
            {"Authorization": "Basic " + base64.b64encode(b"prometheus:x").decode()},
        ):
            request = urllib.request.Request(f"{base_url}/metrics", headers=headers)
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=5, context=context)
            assert refused.value.code == 401
        with urllib.request.urlopen(f"{base_url}/healthz", timeout=5, context=context) as response:
            assert response.status == 200
        with pytest.raises(OSError):  # plain HTTP on the TLS port gets nothing
            urllib.request.urlopen(base_url.replace("https", "http") + "/healthz", timeout=5)


def test_every_panel_and_rule_evaluates_on_live_data(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    prometheus_binary = require_prometheus()
    promtool = require_promtool()
    web = SecuredMetrics.create(tmp_path / "web")
    topics = {
        "input": (unique_topic("events", partitions=2),),
        "predictions": unique_topic("predictions", partitions=2),
        "dead_letters": unique_topic("dlq", partitions=1),
    }
    settings = worker_settings(
        kafka_broker,
        tmp_path / "ckpt",
        topics,
        attribution_window_s=10.0,
        checkpoint_interval_s=5.0,
        # Below the ~10k impressions a 10 s window holds here, so evictions happen too.
        max_pending_impressions=8000,
        # One model per group: a peer in the group, so the sync panels have data too.
        model_updates_topic=unique_topic("updates", partitions=1),
        model_sync_interval_ms=500,
        # /metrics over TLS with basic auth, as Prometheus scrapes a secured exporter.
        metrics_web_config=str(web.config),
    )
    with WorkerThread(settings) as running, WorkerThread(settings):
        running.wait_for(lambda w: w.server is not None and w.ready()[0], timeout_s=120)
        assert running.worker.server is not None
        metrics_url = f"{running.worker.server.url}/metrics"
        target = metrics_url.removeprefix("https://").removesuffix("/metrics")
        web.assert_guarded(running.worker.server.url)
        with PrometheusServer(
            tmp_path / "prometheus",
            [target],
            scrape_interval_s=1.0,
            rule_files=[ALERTS],
            binary=prometheus_binary,
            scrape=web.prometheus_scrape(),
        ) as prometheus:
            simulator = subprocess.Popen(
                [
                    sys.executable, "-m", "stream_fm", "simulate",
                    "--bootstrap-servers", kafka_broker.bootstrap_servers,
                    "--topic", topics["input"][0], "--rate", "1500",
                    "--impressions-per-s", "1000", "--attribution-window-s", "10",
                    "--click-delay-median-s", "2", "--fields", "10",
                    "--duration-s", str(SIMULATE_S),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                time.sleep(5)
                produce(kafka_broker, topics["input"][0], _odd_records(1_732_406_400_000))
                output, _ = simulator.communicate(timeout=SIMULATE_S + 120)
            finally:
                if simulator.poll() is None:
                    simulator.kill()
                    simulator.wait()
            assert simulator.returncode == 0, output.decode(errors="replace")[-3000:]
            # Let the worker drain and Prometheus take a few more scrapes and rule evaluations.
            running.wait_for(lambda w: w.totals["events"] > 0 and _lag(w.registry) == 0)
            time.sleep(5)
            prometheus.wait_for_scrapes(20)

            empty = []
            for query in panel_queries(load_dashboard(DASHBOARD), rate_interval="15s"):
                result = prometheus.query(query.expr)
                if not _finite_values(result):
                    empty.append(f"{query.title} [{query.ref_id}]: {query.expr} -> {result}")
            assert not empty, "panels without data:\n" + "\n".join(empty)

            groups = prometheus.api("rules")["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            expected = sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
            assert len(rules) == expected
            broken = [
                (rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"
            ]
            assert not broken, broken
            # A healthy run fires none of the page-worthy alerts.
            firing = [
                alert["labels"]["alertname"]
                for alert in prometheus.api("alerts")["alerts"]
                if alert["labels"].get("severity") == "critical"
            ]
            assert not firing, firing

            # The recorded quality series exist (they feed the degradation alerts).
            for record in ("job:stream_fm_logloss:rate1h", "job:stream_fm_calibration:rate1h"):
                assert _finite_values(prometheus.query(record)), record

        scraped = web.get(metrics_url).decode()

    # promtool's linter on exactly what Prometheus scraped.
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=scraped, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), (
        lint.stdout + lint.stderr
    )
    exported = {
        line.split("{")[0].split(" ")[0]
        for line in scraped.splitlines()
        if line and not line.startswith("#")
    }
    for name in DESIGN_COUNTERS + DESIGN_GAUGES:
        assert name in exported, f"{name} (docs/design.md) is not exported"
    for name in DESIGN_HISTOGRAMS:
        assert f"{name}_bucket" in exported, name
    dashboard_exprs = [q.expr for q in panel_queries(load_dashboard(DASHBOARD))]
    rule_exprs = [
        rule["expr"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    ]
    named = referenced_metrics("\n".join(dashboard_exprs + rule_exprs))
    assert named <= exported, (
        f"named by the dashboard or alerts but not exported: {named - exported}"
    )
