"""A real Prometheus server as a child process, scraping stream_fm workers on loopback.

Used by ``stream-fm demo --prometheus`` (so a newcomer can query the worker with PromQL and
see the alert rules evaluate) and by the tests that prove the dashboard and the alert rules
against live data. The binary is Debian's ``prometheus`` package (or ``PROMETHEUS_BINARY``).

    >>> config = scrape_config(["127.0.0.1:9464"], scrape_interval_s=2, rule_files=[])
    >>> '"targets": ["127.0.0.1:9464"]' in config and '"job_name": "stream_fm"' in config
    True
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from stream_fm.errors import StreamFMError
from stream_fm.tools.process import free_ports, parent_death_signal

JOB = "stream_fm"
REPO_DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


class PrometheusError(StreamFMError):
    """The Prometheus server could not start, or answered a query with an error."""


def find_binary() -> str:
    """``PROMETHEUS_BINARY``, else ``prometheus`` on PATH; a clear error when neither exists."""
    configured = os.environ.get("PROMETHEUS_BINARY")
    path = configured or shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(path, os.X_OK):
        raise PrometheusError(
            f"no Prometheus binary at {path}: install Debian's package "
            "(apt-get install prometheus) or set PROMETHEUS_BINARY"
        )
    return path


def repo_rule_files() -> list[Path]:
    """deploy/prometheus/alerts.yml of a source checkout (absent from an installed wheel)."""
    alerts = REPO_DEPLOY / "prometheus" / "alerts.yml"
    return [alerts] if alerts.exists() else []


def scrape_config(
    targets: Sequence[str],
    *,
    scrape_interval_s: float,
    rule_files: Sequence[Path | str],
    scrape: Mapping[str, Any] | None = None,
) -> str:
    """A prometheus.yml for job ``stream_fm`` (JSON, which is YAML) scraping ``targets``;
    ``scrape``: more of the scrape config (``scheme``, ``tls_config``, ``basic_auth``)."""
    interval = f"{max(1, round(scrape_interval_s))}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {
                "job_name": JOB,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
                **(scrape or {}),
            }
        ],
    }
    # Prometheus reads YAML; a JSON document is valid YAML and needs no YAML library here.
    return "\n".join(
        [
            "# written by stream_fm.tools.prometheus",
            *(f"{k}: {json.dumps(v)}" for k, v in config.items()),
            "",
        ]
    )


class PrometheusServer:
    """``with PrometheusServer(workdir, ["127.0.0.1:9464"]) as prom: prom.query("up")``.

    Listens on a free loopback port with its TSDB in ``workdir``; ``stop()`` (or leaving the
    ``with`` block) terminates it and waits.
    """

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str],
        *,
        scrape_interval_s: float = 1.0,
        rule_files: Sequence[Path | str] = (),
        binary: str | None = None,
        start_timeout_s: float = 60.0,
        scrape: Mapping[str, Any] | None = None,
    ) -> None:
        self.scrape = dict(scrape or {})
        self.workdir = Path(workdir)
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.rule_files = list(rule_files)
        self.binary = binary
        self.start_timeout_s = start_timeout_s
        self.log_path = self.workdir / "prometheus.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> PrometheusServer:
        binary = self.binary or find_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(
            scrape_config(
                self.targets,
                scrape_interval_s=self.scrape_interval_s,
                rule_files=self.rule_files,
                scrape=self.scrape,
            )
        )
        self.port = free_ports()[0]
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not it
                preexec_fn=parent_death_signal(),  # and it dies with us, even by kill -9
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise PrometheusError(
                    f"prometheus exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise PrometheusError(
            f"prometheus not ready after {self.start_timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # HTTP API
    def api(self, path: str, **params: str | float) -> Any:
        """GET ``/api/v1/<path>``; returns ``data`` or raises PrometheusError with its message."""
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                payload = json.load(response)
        except urllib.error.HTTPError as error:
            payload = json.load(error)
        except (urllib.error.URLError, OSError) as error:
            raise PrometheusError(f"{url}: {error}") from error
        if payload.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {payload.get('error', payload)}")
        return payload["data"]

    def query(self, expr: str, at_s: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, str | float] = {"query": expr}
        if at_s is not None:
            params["time"] = at_s
        result: list[dict[str, Any]] = self.api("query", **params)["result"]
        return result

    def query_range(
        self, expr: str, start_s: float, end_s: float, step_s: float
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api(
            "query_range", query=expr, start=start_s, end=end_s, step=step_s
        )["result"]
        return result

    def wait_for_scrapes(self, count: int = 2, timeout_s: float = 60.0) -> None:
        """Until every target was scraped healthily ``count`` times (``up`` seen that often)."""
        expr = f'count_over_time(up{{job="{JOB}"}}[10m])'
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = self.query(f"min({expr}) and min(up{{job='{JOB}'}}) == 1")
            if result and float(result[0]["value"][1]) >= count:
                return
            time.sleep(self.scrape_interval_s / 2)
        targets = self.api("targets")
        raise PrometheusError(f"targets not scraped {count} times in {timeout_s:.0f}s: {targets}")
