"""Replay a file through the same pipeline as the worker: no Kafka, same numbers.

Formats:

- ``jsonl``: one event of docs/design.md per line (impressions, clicks, labeled), joined with the
  attribution window in event time;
- ``libsvm``: ``label idx:val ...`` (also libffm ``label field:idx:val ...``), labeled rows;
- ``criteo``: CSV ``Id,Label,I1..I13,C1..C26``, labeled rows;
- ``criteo_tsv``: Criteo's own ``train.txt`` layout (tab-separated, no header: label, 13
  integer counts, 26 hashed categoricals, empty when missing), labeled rows;
- ``avazu``: CSV ``id,click,hour,...``, labeled rows;
- ``talkingdata``: CSV ``ip,app,device,os,channel,click_time,attributed_time,is_attributed``;
  ``click_time`` is the impression, ``attributed_time`` the click, joined with real delays.

Files may be gzip-compressed (``.gz``).
"""

from __future__ import annotations

import csv
import gzip
import heapq
import io
import math
import time
import typing
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from stream_fm.config import Settings
from stream_fm.errors import StreamFMError
from stream_fm.evaluate import EPSILON, ProgressiveValidation, auc, binary_entropy
from stream_fm.events import Click, Event, EventDecoder, Impression, Labeled
from stream_fm.features import FeatureHasher
from stream_fm.pipeline import BatchResult, Evaluated, Pipeline, Rejected
from stream_fm.warmup import warm_up

FORMATS: Final = ("jsonl", "libsvm", "criteo", "criteo_tsv", "avazu", "talkingdata")
SERIES_EVERY: Final = 10_000  # examples between two points of the replay plot
BATCH_EVENTS: Final = 8192

EventBatch = tuple[list[tuple[Hashable, Event | None]], list[Rejected]]


class RecordBatch(NamedTuple):
    """Undecoded records of one partition: the pipeline decodes them (``Pipeline.decode``)."""

    values: list[bytes]


Batch = EventBatch | RecordBatch


def open_binary(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return typing.cast(IO[bytes], gzip.open(path, "rb"))
    return path.open("rb")


def open_text(path: Path) -> IO[str]:
    return io.TextIOWrapper(open_binary(path), encoding="utf-8", newline="")


def _chunks(items: Iterator[Event], size: int) -> Iterator[EventBatch]:
    batch: list[tuple[Hashable, Event | None]] = []
    for event in items:
        batch.append((0, event))
        if len(batch) >= size:
            yield batch, []
            batch = []
    if batch:
        yield batch, []


def read_jsonl(path: Path, size: int = BATCH_EVENTS) -> Iterator[RecordBatch]:
    """Lines in batches, as records: a bad line becomes a ``Rejected`` with its reason."""
    with open_binary(path) as stream:
        while True:
            lines = stream.readlines(size * 256)
            if not lines:
                return
            yield RecordBatch(lines)


def read_libsvm(path: Path, hasher: FeatureHasher) -> Iterator[Event]:
    """Rows ``label idx:val ...``; libffm's ``field:idx:val`` keeps the field in the key."""
    with open_text(path) as stream:
        for number, line in enumerate(stream):
            parts = line.split()
            if not parts:
                continue
            label = 1 if float(parts[0]) > 0 else 0
            keys: list[str] = []
            values: list[float] = []
            for item in parts[1:]:
                key, _, value = item.rpartition(":")
                keys.append(key)
                values.append(float(value))
            yield Labeled(f"row-{number}", number, label, keys, values)


def read_criteo(path: Path, hasher: FeatureHasher) -> Iterator[Event]:
    with open_text(path) as stream:
        reader = csv.DictReader(stream)
        for number, row in enumerate(reader):
            features: dict[str, Any] = {}
            for name, value in row.items():
                if name in ("Id", "Label") or value == "" or name is None:
                    continue
                features[name] = int(value) if name.startswith("I") else value
            yield _labeled(hasher, f"row-{number}", number, int(row["Label"]), features)


def read_criteo_tsv(path: Path, hasher: FeatureHasher) -> Iterator[Event]:
    names = [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    with open_text(path) as stream:
        for number, line in enumerate(stream):
            columns = line.rstrip("\r\n").split("\t")
            if len(columns) != 40:
                raise StreamFMError(
                    f"{path}:{number + 1}: {len(columns)} tab-separated columns, expected 40"
                )
            features: dict[str, Any] = {
                name: int(value) if name[0] == "I" else value
                for name, value in zip(names, columns[1:], strict=True)
                if value != ""
            }
            yield _labeled(hasher, f"row-{number}", number, int(columns[0]), features)


def read_avazu(path: Path, hasher: FeatureHasher) -> Iterator[Event]:
    with open_text(path) as stream:
        reader = csv.DictReader(stream)
        for number, row in enumerate(reader):
            hour = row.get("hour", "")
            features: dict[str, Any] = {
                name: value
                for name, value in row.items()
                if name not in ("id", "click", "hour") and value
            }
            if len(hour) == 8:  # YYMMDDHH: the hour of day generalises, the date does not
                features["hour_of_day"] = hour[6:]
            yield _labeled(
                hasher, row.get("id") or f"row-{number}", number, int(row["click"]), features
            )


def _labeled(
    hasher: FeatureHasher, ident: str, ts_ms: int, label: int, features: dict[str, Any]
) -> Labeled:
    keys: list[str] = []
    values: list[float] = []
    hasher.add_features(features, keys, values)
    return Labeled(ident, ts_ms, label, keys, values)


def _talkingdata_ts(text: str) -> int:
    moment = datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    return int(moment.timestamp() * 1000)


def read_talkingdata(path: Path, hasher: FeatureHasher) -> Iterator[Event]:
    """Each row's ``click_time`` is the impression, its ``attributed_time`` the click.

    Rows are in ``click_time`` order; clicks are held in a heap and emitted when the stream
    reaches their time, so the joiner sees the real delays.
    """
    clicks: list[tuple[int, int, str]] = []
    with open_text(path) as stream:
        reader = csv.DictReader(stream)
        for number, row in enumerate(reader):
            ts = _talkingdata_ts(row["click_time"])
            while clicks and clicks[0][0] < ts:
                click_ts, _, ident = heapq.heappop(clicks)
                yield Click(ident, click_ts)
            ident = f"td-{number}"
            features = {name: row[name] for name in ("ip", "app", "device", "os", "channel")}
            features["hour"] = row["click_time"][11:13]
            features["app_channel"] = row["app"] + "_" + row["channel"]
            keys: list[str] = []
            values: list[float] = []
            hasher.add_features(features, keys, values)
            yield Impression(ident, ts, keys, values)
            if row.get("attributed_time"):
                heapq.heappush(clicks, (_talkingdata_ts(row["attributed_time"]), number, ident))
    while clicks:
        click_ts, _, ident = heapq.heappop(clicks)
        yield Click(ident, click_ts)


ROW_READERS: Final[dict[str, Callable[[Path, FeatureHasher], Iterator[Event]]]] = {
    "libsvm": read_libsvm,
    "criteo": read_criteo,
    "criteo_tsv": read_criteo_tsv,
    "avazu": read_avazu,
    "talkingdata": read_talkingdata,
}


def read_batches(
    path: Path, fmt: str, decoder: EventDecoder, size: int = BATCH_EVENTS
) -> Iterator[Batch]:
    """Batches of a file in any supported format: records (JSONL) or decoded events."""
    if fmt == "jsonl":
        return read_jsonl(path, size)
    reader = ROW_READERS.get(fmt)
    if reader is None:
        raise StreamFMError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _chunks(reader(path, decoder.hasher), size)


@dataclass(slots=True)
class ReplayReport:
    """What ``stream-fm replay --report`` writes (docs/design.md names the first fields)."""

    examples: int = 0
    logloss: float = float("nan")
    normalized_entropy: float = float("nan")
    auc: float = float("nan")  # over the whole stream
    calibration: float = float("nan")
    examples_per_second: float = 0.0
    seconds: float = 0.0  # the stream only: compilation is in compile_seconds
    compile_seconds: float = 0.0  # compiling the kernels, or loading them from numba's cache
    events: int = 0
    events_per_second: float = 0.0
    positives: int = 0
    logloss_window: float = float("nan")  # the last auc_window examples
    auc_window: float = float("nan")
    # By impression order: the examples served in the stream's first attribution window (what
    # a fresh model serves) and the last tenth of the stream (what it converged to).
    logloss_first_window: float = float("nan")
    normalized_entropy_first_window: float = float("nan")
    logloss_last_10pct: float = float("nan")
    normalized_entropy_last_10pct: float = float("nan")
    # The worst of the rolling (auc_window) NE series: how bad a cold start ever got.
    max_normalized_entropy_window: float = float("nan")
    invalid_events: dict[str, int] = field(default_factory=dict)
    join: dict[str, int] = field(default_factory=dict)
    refused_updates: int = 0
    series: list[tuple[int, float, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: undefined figures (NaN) become null."""
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v)
            for k, v in asdict(self).items()
        }


def replay(
    pipeline: Pipeline,
    batches: Iterator[Batch],
    progress: Callable[[int], None] | None = None,
    flush: bool = True,
) -> ReplayReport:
    """Run every batch through ``pipeline``; at the end, close remaining windows if ``flush``."""
    report = ReplayReport()
    evaluator = pipeline.evaluator
    scores = StreamScores()
    started = time.perf_counter()
    for batch in batches:
        if isinstance(batch, RecordBatch):
            result = pipeline.process_values(batch.values)
        else:
            events, rejected = batch
            result = pipeline.process_events(events, rejected)
        n = len(batch[0])
        _account(report, result, scores)
        report.events += n
        if progress is not None:
            progress(n)
    if flush:
        result = pipeline.flush()
        _account(report, result, scores)
    report.seconds = time.perf_counter() - started
    whole = scores.figures(pipeline.window_ms)
    report.auc = whole.auc
    report.logloss_first_window = whole.logloss_first_window
    report.normalized_entropy_first_window = whole.normalized_entropy_first_window
    report.logloss_last_10pct = whole.logloss_last_10pct
    report.normalized_entropy_last_10pct = whole.normalized_entropy_last_10pct
    report.examples = evaluator.examples
    report.positives = evaluator.positives
    report.logloss = evaluator.logloss
    report.logloss_window = evaluator.logloss_window
    report.normalized_entropy = evaluator.normalized_entropy
    report.auc_window = evaluator.auc_window
    report.calibration = evaluator.calibration
    report.examples_per_second = report.examples / report.seconds if report.seconds else 0.0
    report.events_per_second = report.events / report.seconds if report.seconds else 0.0
    report.join = pipeline.join_counters()
    report.refused_updates = int(getattr(pipeline.engine, "refused_updates", 0))
    report.series = list(evaluator.series)
    windows = [ne for _, _, ne in report.series if not math.isnan(ne)]
    report.max_normalized_entropy_window = max(windows) if windows else math.nan
    return report


def _account(report: ReplayReport, result: BatchResult, scores: StreamScores) -> None:
    for rejected in result.invalid:
        report.invalid_events[rejected.reason] = report.invalid_events.get(rejected.reason, 0) + 1
    if result.evaluated is not None:
        scores.add(result.evaluated)


class WholeStream(NamedTuple):
    auc: float
    logloss_first_window: float
    normalized_entropy_first_window: float
    logloss_last_10pct: float
    normalized_entropy_last_10pct: float


class StreamScores:
    """Every example's served p, label and impression ts, for the figures that need them all:
    whole-stream AUC, and log loss by impression order (first window, last tenth)."""

    def __init__(self) -> None:
        self._parts: list[Evaluated] = []

    def add(self, evaluated: Evaluated) -> None:
        if len(evaluated.labels):
            self._parts.append(evaluated)

    def arrays(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int8], npt.NDArray[np.int64]]:
        """(p, labels, impression ts), sorted by impression ts (stable)."""
        if not self._parts:
            return np.zeros(0), np.zeros(0, dtype=np.int8), np.zeros(0, dtype=np.int64)
        p = np.concatenate([e.p_served for e in self._parts])
        y = np.concatenate([e.labels for e in self._parts])
        ts = np.concatenate([e.impression_ts_ms for e in self._parts])
        order = np.argsort(ts, kind="stable")
        return p[order], y[order], ts[order]

    def figures(self, window_ms: int) -> WholeStream:
        p, y, ts = self.arrays()
        nan = math.nan
        if not len(p):
            return WholeStream(nan, nan, nan, nan, nan)
        first = ts < ts[0] + window_ms
        last = np.arange(len(p)) >= len(p) - len(p) // 10
        return WholeStream(
            auc(p, y),
            *_logloss_and_ne(p[first], y[first]),
            *_logloss_and_ne(p[last], y[last]),
        )


def _logloss_and_ne(p: npt.NDArray[np.float64], y: npt.NDArray[np.int8]) -> tuple[float, float]:
    if not len(p):
        return math.nan, math.nan
    q = np.clip(p, EPSILON, 1 - EPSILON)
    loss = float(-np.mean(np.where(y == 1, np.log(q), np.log1p(-q))))
    return loss, loss / binary_entropy(float(np.mean(y)))


def plot_series(series: Sequence[tuple[int, float, float]], path: Path, title: str) -> None:
    """Rolling log loss and NE against examples seen (needs the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise StreamFMError("--plot needs matplotlib: pip install 'stream-fm[plot]'") from error
    points = [(n, ll, ne) for n, ll, ne in series if n > 0]
    figure, left = plt.subplots(figsize=(8, 4.5))
    left.plot(
        [p[0] for p in points], [p[1] for p in points], color="tab:blue", label="rolling log loss"
    )
    left.set_xlabel("examples seen")
    left.set_ylabel("rolling log loss", color="tab:blue")
    right = left.twinx()
    right.plot(
        [p[0] for p in points], [p[2] for p in points], color="tab:orange", label="rolling NE"
    )
    right.set_ylabel("rolling normalized entropy", color="tab:orange")
    left.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_replay(
    settings: Settings,
    path: Path,
    fmt: str,
    *,
    report_path: Path | None = None,
    plot_path: Path | None = None,
    progress: bool = True,
) -> int:
    """``stream-fm replay``: print the report's figures; write the report and plot if asked."""
    import json
    import sys

    from tqdm import tqdm

    if not path.is_file():
        raise StreamFMError(f"no such file: {path}")
    pipeline = Pipeline.from_settings(
        settings, evaluator=ProgressiveValidation(settings.auc_window, series_every=SERIES_EVERY)
    )
    compile_seconds = warm_up(settings)
    with tqdm(
        unit=" events", unit_scale=True, disable=not progress or None, file=sys.stderr
    ) as bar:
        report = replay(pipeline, read_batches(path, fmt, pipeline.decoder), progress=bar.update)
    report.compile_seconds = compile_seconds
    document = report.as_dict()
    print(json.dumps({k: v for k, v in document.items() if k != "series"}, indent=2))
    if report_path:
        report_path.write_text(json.dumps(document, indent=2))
    if plot_path:
        plot_series(report.series, plot_path, f"stream-fm replay: {path.name}")
    return 0
