"""Options of ``stream-fm bench kafka`` and the constants its phases share."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stream_fm.errors import StreamFMError

LATENCY_HISTOGRAM = "stream_fm_impression_to_prediction_seconds"
BATCH_HISTOGRAM = "stream_fm_batch_seconds"
PAUSE_HISTOGRAM = "stream_fm_checkpoint_pause_seconds"
LATENCY_MEASURES = (
    "input record's Kafka timestamp (CreateTime, set by the producer at send) -> the worker's "
    "prediction for it handed to its producer (acknowledgements are awaited before each "
    "checkpoint, not per batch); not the event's ts field"
)
EXACT_LATENCY_MEASURES = (
    "per record from the topics, end to end: the prediction's broker append time (its topic "
    "uses LogAppendTime) minus the input record's CreateTime; 1 ms resolution"
)
LAG_REFRESH_WAIT_S = 8.0  # the worker refreshes its lag gauge every 5 s
START_TIMEOUT_S = 300.0  # a first run compiles the numba kernels
STALL_TIMEOUT_S = 120.0
MIB = 1024.0

Say = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


#: kafka_client -> the module it needs (and the extra that installs it).
CLIENT_MODULES = {"kafka-python": ("kafka", ""), "confluent": ("confluent_kafka", "librdkafka")}
#: Three checkpoints at the default 30 s interval, and a warm-up before them.
DEFAULT_LATENCY_S = 100.0


def _require(module: str, what: str, extra: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise StreamFMError(f"bench kafka: {what} needs pip install 'stream-fm[{extra}]'")


@dataclass(frozen=True, slots=True)
class KafkaBenchOptions:
    """What ``stream-fm bench kafka`` runs; the load of the latency phases is produced with
    the last of ``clients`` (librdkafka offers 50k/s where kafka-python cannot)."""

    events: int = 5_000_000
    partitions: int = 2
    clients: tuple[str, ...] = ("kafka-python", "confluent")  # each: ceilings and worker
    quix: bool = True  # the bare Quix Streams application
    rates: tuple[float, ...] = (10_000.0, 50_000.0)
    latency_duration_s: float = DEFAULT_LATENCY_S
    latency_warmup_s: float = 10.0
    impressions_per_s: float = 10.0  # event time of the simulated data
    attribution_window_s: float = 3600.0
    seed: int = 7
    labels: bool = False  # also publish the worker's labels topic
    poll_interval_s: float = 0.1
    py_spy: Path | None = None  # profile the worker phase with py-spy into this file
    work_dir: Path | None = None
    scale_out_events: int = 1_000_000  # records of the scale-out phase; 0 = no such phase
    scale_out_partitions: int = 4
    kafka_python_versions: tuple[str, ...] = ()  # releases whose bare loops run side by side

    @property
    def load_client(self) -> str:
        """The client of the latency phases' simulator and of the scale-out workers."""
        return self.clients[-1]

    def __post_init__(self) -> None:
        if not self.clients or any(c not in CLIENT_MODULES for c in self.clients):
            raise StreamFMError(
                f"bench kafka: --clients must name some of {', '.join(CLIENT_MODULES)}"
            )
        for client in self.clients:
            module, extra = CLIENT_MODULES[client]
            if extra:
                _require(module, f"--clients {client}", extra)
        if self.quix:
            _require("quixstreams", "the Quix Streams phase (or --no-quix)", "bench")
        if self.events < 1:
            raise StreamFMError("bench kafka: --events must be >= 1")
        if self.partitions < 1:
            raise StreamFMError("bench kafka: --partitions must be >= 1")
        if any(r <= 0 for r in self.rates):
            raise StreamFMError("bench kafka: every rate must be > 0")
        if self.latency_duration_s <= 0 or self.latency_warmup_s < 0:
            raise StreamFMError("bench kafka: latency duration must be > 0, warm-up >= 0")
        if self.scale_out_events < 0:
            raise StreamFMError("bench kafka: --scale-out-events must be >= 0 (0: no scale-out)")
        if self.scale_out_partitions < 1:
            raise StreamFMError("bench kafka: --scale-out-partitions must be >= 1")


# --- results -------------------------------------------------------------------------------
