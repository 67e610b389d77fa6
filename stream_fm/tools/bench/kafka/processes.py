"""The worker as a child process (metrics, RSS, stop) and py-spy beside it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path

from stream_fm.errors import StreamFMError
from stream_fm.tools.bench.kafka.metrics import Scrape, scrape
from stream_fm.tools.bench.kafka.options import MIB, START_TIMEOUT_S
from stream_fm.tools.process import free_ports


def _status_kib(pid: int, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM); 0 when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


class WorkerProcess:
    """``python -m stream_fm run`` as a child, configured by STREAM_FM_* like the demo's."""

    def __init__(
        self,
        bootstrap_servers: str,
        topics: dict[str, str],
        work: Path,
        name: str,
        attribution_window_s: float,
        group_id: str | None = None,
        checkpoint_dir: Path | None = None,
        kafka_client: str = "kafka-python",
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """``group_id`` and ``checkpoint_dir`` default to ones of this worker alone (from
        ``name``); pass the same ones to several workers to run them as one group.
        ``extra_env``: more STREAM_FM_* settings."""
        self.name = name
        self.group_id = group_id or f"bench-{name}-{uuid.uuid4().hex[:8]}"
        self.checkpoint_dir = checkpoint_dir or work / f"{name}-checkpoints"
        self.port = free_ports()[0]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.pop("STREAM_FM_LABELS_TOPIC", None)
        env.update(
            {
                "STREAM_FM_BOOTSTRAP_SERVERS": bootstrap_servers,
                "STREAM_FM_INPUT_TOPICS": topics["input"],
                "STREAM_FM_PREDICTIONS_TOPIC": topics["predictions"],
                "STREAM_FM_DEAD_LETTER_TOPIC": topics["dead_letters"],
                "STREAM_FM_GROUP_ID": self.group_id,
                "STREAM_FM_CHECKPOINT_DIR": str(self.checkpoint_dir),
                "STREAM_FM_METRICS_HOST": "127.0.0.1",
                "STREAM_FM_METRICS_PORT": str(self.port),
                "STREAM_FM_ATTRIBUTION_WINDOW_S": str(attribution_window_s),
                "STREAM_FM_LOG_LEVEL": "WARNING",
                "STREAM_FM_KAFKA_CLIENT": kafka_client,
            }
        )
        if topics.get("labels"):
            env["STREAM_FM_LABELS_TOPIC"] = topics["labels"]
        env.update(extra_env or {})
        self.log_path = work / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._terminated = False
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stream_fm", "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise StreamFMError(
                f"bench kafka: the {self.name} worker exited with {self.process.returncode}:\n"
                + self.log_tail()
            )

    def scrape(self) -> Scrape | None:
        """The worker's /metrics, or None while its server does not answer yet."""
        self._check_alive()
        try:
            return scrape(self.url + "/metrics")
        except (OSError, urllib.error.URLError):
            return None

    def ready(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise StreamFMError(
                    f"bench kafka: the {self.name} worker was not ready after {timeout_s:.0f}s:\n"
                    + self.log_tail()
                )
            time.sleep(0.1)

    def rss_mib(self) -> float:
        return _status_kib(self.pid, "VmRSS") / MIB

    def peak_mib(self) -> float:
        return _status_kib(self.pid, "VmHWM") / MIB

    def terminate(self) -> None:
        """SIGTERM without waiting (``stop()`` then waits): several workers stop together."""
        if self.process.poll() is None and not self._terminated:
            self.process.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM (the worker drains, checkpoints, exits); kill after ``timeout_s``."""
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def summary(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        found = [line for line in text.splitlines() if "worker stopped" in line]
        return found[-1] if found else ""


class PySpy:
    """``py-spy record`` attached to a pid; ``stop()`` makes it write its file (SIGINT)."""

    def __init__(self, pid: int, out: Path, log: Path) -> None:
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(out.suffix, "raw")
        exe = Path(sys.executable).with_name("py-spy")
        command = [str(exe) if exe.exists() else "py-spy", "record", "--pid", str(pid)]
        # --idle and --threads: wall time, waits included, per thread (main loop vs client IO).
        # Blocking sampling (py-spy's default) pauses the worker briefly at each sample but
        # gives consistent stacks; --nonblocking garbles fast-changing ones.
        command += ["--rate", "100", "--idle", "--threads"]
        command += ["--format", fmt, "--output", str(out)]
        self.out = out
        self._log = log.open("wb")
        try:
            self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        except OSError as error:
            self._log.close()
            raise StreamFMError(f"bench kafka: cannot start py-spy ({error})") from error

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


# --- phases --------------------------------------------------------------------------------
