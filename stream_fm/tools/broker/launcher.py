"""A real single-node Apache Kafka broker (KRaft, combined broker+controller) as a child JVM.

Used by ``stream-fm demo``, the Makefile, the benchmarks and the integration tests. The broker
is Apache Kafka itself (``jars``), run with a Java 17+ (``java``) bound to 127.0.0.1; without
them the error says so in one line and names the Docker alternative.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from stream_fm.errors import BrokerError, BrokerStartError
from stream_fm.kafka.admin import Admin
from stream_fm.tools.broker.jars import classpath_version, kafka_classpath
from stream_fm.tools.broker.java import find_java
from stream_fm.tools.process import (
    accepts,
    free_ports,
    parent_death_signal,
    port_is_free,
    tail_file,
    tail_text,
)

_FORMAT_TIMEOUT_S = 120.0


def _cluster_id() -> str:
    # Kafka's Uuid string form (base64url, no padding); a leading "-" would be read as an option.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
# Each start dumps hundreds of config lines; keep the log tail about what went wrong.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""

_LIVE: set[KafkaBroker] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        brokers = list(_LIVE)
    for b in brokers:
        with contextlib.suppress(Exception):
            b.close()


# --------------------------------------------------------------------------------------------
# broker


class KafkaBroker:
    """One Apache Kafka process in KRaft combined mode (broker + controller, node id 1).

    ``with KafkaBroker() as kb: ... kb.bootstrap_servers`` starts it on free ports of
    127.0.0.1 in a temporary data directory and removes everything on exit. With ``data_dir``
    given, the data is kept (and reused on the next start). ``restart()`` keeps ports and data.
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        controller_port: int = 0,
        log_path: Path | None = None,
        partitions: int = 3,
        auto_create_topics: bool = True,
        startup_timeout_s: float = 120.0,
        stop_timeout_s: float = 30.0,
        heap: str = "512m",
        extra_properties: Mapping[str, str] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.host = host
        self._requested = (port, controller_port)
        self.port = port
        self.controller_port = controller_port
        self._log_path = log_path
        self.partitions = partitions
        self.auto_create_topics = auto_create_topics
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.heap = heap
        self.extra_properties = dict(extra_properties or {})
        self.cache_dir = cache_dir
        self.kafka_version = "unknown"
        self._classpath: str | None = None
        self._java: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # -- properties -------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        if not self.port:
            raise BrokerError("the broker has not been started yet")
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        if self._log_path is not None:
            return self._log_path
        if self.data_dir is None:
            raise BrokerError("the broker has not been started yet")
        return self.data_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> KafkaBroker:
        try:
            self.start()
        except BaseException:
            self.close()  # __exit__ will not run: remove the temporary data dir here
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the broker and wait until it answers a metadata request; idempotent."""
        if self.is_running():
            return
        if self._java is None:
            self._java = find_java()
        if self._classpath is None:
            self._classpath = kafka_classpath(self.cache_dir)
            self.kafka_version = classpath_version(self._classpath)
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="stream-fm-kafka-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        self._write_config()
        if not (self.data_dir / "kafka-data" / "meta.properties").is_file():
            self._format()
        with _LIVE_LOCK:
            _LIVE.add(self)
        self._spawn()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the JVM: SIGTERM to its process group, wait, then SIGKILL. Keeps the data."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=30)
            # The JVM forks nothing, but make sure no member of its group outlives it.
            self._signal_group(proc, signal.SIGKILL)
            self._proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def close(self) -> None:
        """Stop, and delete the data directory if it was a temporary one made by ``start``."""
        self.stop()
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def restart(self) -> None:
        """Stop and start again on the same ports and data directory."""
        self.stop()
        self.start()

    def log_tail(self, n_lines: int = 40) -> str:
        """The last ``n_lines`` of the broker's log (stdout and stderr of the JVM)."""
        try:
            return tail_file(self.log_path, n_lines)
        except BrokerError:
            return ""

    # -- admin ------------------------------------------------------------------------------

    def admin(self, request_timeout_ms: int = 30_000) -> Admin:
        """An admin client for this broker; the caller closes it (or uses ``with``)."""
        return Admin(self.bootstrap_servers, request_timeout_ms=request_timeout_ms)

    def create_topics(
        self,
        names: Iterable[str],
        partitions: int | None = None,
        replication: int = 1,
        configs: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        """Create the topics that do not exist yet and wait until every partition has a leader."""
        n = partitions if partitions is not None else self.partitions
        with self.admin() as admin:
            admin.create_topics(names, n, replication, configs, timeout_s)

    # -- internals --------------------------------------------------------------------------

    def _named_ports(self) -> dict[str, int]:
        """Every port the broker listens on, by what it is for (0: not chosen yet)."""
        return {"port": self.port, "controller port": self.controller_port}

    def _set_port(self, what: str, port: int) -> None:
        setattr(self, what.replace(" ", "_"), port)

    def _choose_ports(self) -> None:
        # Ports are chosen once; restart() must come back on the same ones.
        named = self._named_ports()
        missing = [what for what, p in named.items() if not p]
        for what, p in zip(missing, free_ports(self.host, len(missing)), strict=True):
            self._set_port(what, p)
        for what, p in self._named_ports().items():
            if not port_is_free(self.host, p):
                raise BrokerStartError(
                    f"cannot start Apache Kafka: {what} {self.host}:{p} is already in use"
                )

    def _properties(self) -> dict[str, str]:
        assert self.data_dir is not None
        h, p, c = self.host, self.port, self.controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # Static quorum: the voter is named by config, not stored at format time, so a kept
            # data_dir also works when a later run picks other ports.
            "controller.quorum.voters": f"1@{h}:{c}",
            "controller.listener.names": "CONTROLLER",
            "listeners": f"PLAINTEXT://{h}:{p},CONTROLLER://{h}:{c}",
            "advertised.listeners": f"PLAINTEXT://{h}:{p}",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "kafka-data"),
            "num.partitions": str(self.partitions),
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            # One node: internal topics cannot have more replicas than brokers.
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Fewer internal partitions: the first consumer group then starts in well under a
            # second instead of creating 50 partitions on a 2-core box.
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Lets tests use short consumer session timeouts (the default floor is 6 s).
            "group.min.session.timeout.ms": "500",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
        }
        props.update(self.extra_properties)
        return props

    def _write_config(self) -> None:
        assert self.data_dir is not None
        lines = [f"{k}={v}" for k, v in self._properties().items()]
        (self.data_dir / "server.properties").write_text("\n".join(lines) + "\n")
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)

    def _jvm(self, main: str, heap: str, *args: str) -> list[str]:
        assert self._java is not None and self._classpath is not None and self.data_dir
        return [
            self._java,
            f"-Xmx{heap}",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir}",
            "-cp",
            self._classpath,
            main,
            *args,
        ]

    def _format(self) -> None:
        assert self.data_dir is not None
        cmd = self._jvm(
            "kafka.tools.StorageTool", "256m",
            "format", "--ignore-formatted",
            "--cluster-id", _cluster_id(),
            "--config", str(self.data_dir / "server.properties"),
            *self._format_args(),
        )  # fmt: skip
        # Short-lived tool: tiered compilation off and a serial GC start faster.
        cmd[1:1] = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
        try:
            out = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                timeout=_FORMAT_TIMEOUT_S, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise BrokerStartError(
                f"formatting Kafka storage timed out after {_FORMAT_TIMEOUT_S:.0f}s"
            ) from exc
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(out.stdout + out.stderr)
        if out.returncode != 0:
            raise BrokerStartError(
                f"formatting Kafka storage failed (exit {out.returncode}):\n"
                f"{tail_text(out.stdout + out.stderr, 30)}"
            )

    def _format_args(self) -> list[str]:
        """More arguments for ``kafka-storage format`` (a secured broker's SCRAM users)."""
        return []

    def _spawn(self) -> None:
        assert self.data_dir is not None
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the JVM
        heap = self.heap
        cmd = self._jvm("kafka.Kafka", heap, str(self.data_dir / "server.properties"))
        cmd[1:1] = [f"-Xms{min(64, _mib(heap))}m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own process group: stop() signals the group, and Ctrl-C in a terminal
                # reaches only us, so the broker is stopped in order, after the worker.
                start_new_session=True,
                preexec_fn=parent_death_signal(),
            )
        except OSError as exc:
            raise BrokerStartError(f"cannot run {cmd[0]}: {exc}") from exc

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        last_error = "port not open yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                raise self._start_error(f"the broker process exited with code {code}")
            # TCP first: kafka-python logs loudly on refused connections.
            if accepts(self.host, self.port):
                try:
                    if self._answers_metadata():
                        return
                    last_error = "metadata lists no broker yet"
                except Exception as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise self._start_error(
                    f"no answer within {self.startup_timeout_s:.0f}s ({last_error})"
                )
            time.sleep(0.2)

    def _answers_metadata(self) -> bool:
        # Until the controller unfences it, the broker is absent (or flagged) in the metadata.
        with self.admin(request_timeout_ms=5000) as admin:
            return admin.live_brokers() > 0

    def _start_error(self, reason: str) -> BrokerStartError:
        tail = self.log_tail(40)
        hint = ""
        if "Address already in use" in tail:
            hint = f" (port {self.port} or {self.controller_port} is already in use)"
        return BrokerStartError(
            f"Apache Kafka {self.kafka_version} did not start on {self.host}:{self.port}: "
            f"{reason}{hint}; log {self.log_path}:\n{tail}"
        )

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _mib(heap: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", heap)
    if m is None:
        raise BrokerStartError(f"heap size {heap!r} is not a JVM size like 512m or 1g")
    n, unit = int(m.group(1)), m.group(2).lower()
    return {"k": n // 1024, "m": n, "g": n * 1024, "": n // (1024 * 1024)}[unit]
