"""Side-by-side benchmark, in one run, on the same stream: the fast engine, river's
FMClassifier and Vowpal Wabbit (linear, ``-q``, ``--lrq``).

Every engine goes through the same ``Pipeline`` (same join, same served-p-before-learning
evaluation) over the same pre-decoded events; only the engine differs. Engine time is the
time spent inside ``run_batch``; the ratio column compares examples/s against river.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_fm.config import Settings
from stream_fm.errors import StreamFMError
from stream_fm.events import Event, EventDecoder
from stream_fm.features import FeatureHasher
from stream_fm.model import FastFM, FMParams, RiverFM
from stream_fm.model.base import Engine, OpBatch, SparseExample, StateValue
from stream_fm.pipeline import Pipeline, Rejected, decoder_for
from stream_fm.replay import EventBatch, read_batches, replay
from stream_fm.tools.bench.vw import VW_VARIANTS, VowpalWabbit
from stream_fm.tools.simulate import SimulationParams, Simulator


class TimedEngine:
    """Wraps an engine to add up the seconds spent in ``run_batch``."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.seconds = 0.0

    @property
    def n_learned(self) -> int:
        return self.inner.n_learned

    @property
    def refused_updates(self) -> int:
        return self.inner.refused_updates

    @property
    def nonfinite_outputs(self) -> int:
        return self.inner.nonfinite_outputs

    def predict_proba_one(self, x: SparseExample) -> float:
        return self.inner.predict_proba_one(x)

    def learn_one(self, x: SparseExample, y: int) -> None:
        self.inner.learn_one(x, y)

    def run_batch(self, batch: OpBatch) -> npt.NDArray[np.float64]:
        started = time.perf_counter()
        out = self.inner.run_batch(batch)
        self.seconds += time.perf_counter() - started
        return out

    def state(self) -> dict[str, StateValue]:
        return self.inner.state()

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        self.inner.load_state(state, strict=strict)


@dataclass(slots=True)
class EngineResult:
    engine: str
    events: int
    examples: int
    logloss: float
    normalized_entropy: float
    auc: float
    calibration: float
    engine_seconds: float
    engine_examples_per_second: float
    pipeline_events_per_second: float
    logloss_last_10pct: float = math.nan
    excess_over_bayes: float = math.nan
    speedup_vs_river: float = math.nan


@dataclass(slots=True)
class StreamResult:
    stream: str
    events: int
    bayes_logloss: float = math.nan
    bayes_normalized_entropy: float = math.nan
    engines: list[EngineResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prefix(batches: Sequence[EventBatch], n_events: int) -> list[EventBatch]:
    out: list[EventBatch] = []
    seen = 0
    for events, rejected in batches:
        if seen >= n_events:
            break
        take = min(len(events), n_events - seen)
        out.append((events[:take], [r for r in rejected if r.position < take]))
        seen += take
    return out


def run_engine(
    name: str,
    engine: Engine,
    batches: Sequence[EventBatch],
    settings: Settings,
    hasher: FeatureHasher,
) -> EngineResult:
    """One engine through the pipeline over pre-decoded batches."""
    timed = TimedEngine(engine)
    pipeline = Pipeline(
        timed,
        EventDecoder(hasher),
        settings.attribution_window_ms,
        settings.max_pending_impressions,
        auc_window=settings.auc_window,
    )
    evaluator = pipeline.evaluator
    # Per-batch log-loss sums give the last-10% figure without storing every example.
    batch_sums: list[tuple[int, float]] = []

    def batches_with_marks() -> Iterator[EventBatch]:
        for batch in batches:
            yield batch
            batch_sums.append((evaluator.examples, evaluator.logloss_sum))

    report = replay(pipeline, batches_with_marks())
    batch_sums.append((evaluator.examples, evaluator.logloss_sum))
    last = _tail_logloss(batch_sums, 0.10)
    return EngineResult(
        engine=name,
        events=report.events,
        examples=report.examples,
        logloss=report.logloss,
        normalized_entropy=report.normalized_entropy,
        auc=report.auc,
        calibration=report.calibration,
        engine_seconds=timed.seconds,
        engine_examples_per_second=report.examples / timed.seconds if timed.seconds else math.nan,
        pipeline_events_per_second=report.events_per_second,
        logloss_last_10pct=last,
    )


def _tail_logloss(marks: list[tuple[int, float]], share: float) -> float:
    """Mean log loss over the last ``share`` of examples (from the last batch boundary
    at or before that point), from cumulative (examples, loss sum) marks."""
    total_examples, total_sum = marks[-1]
    start = total_examples * (1 - share)
    before = [(n, loss) for n, loss in marks if n <= start]
    examples, loss_sum = before[-1] if before else (0, 0.0)
    n = total_examples - examples
    return (total_sum - loss_sum) / n if n else math.nan


def simulated_stream(
    n_events: int, seed: int, window_s: float, hasher: FeatureHasher
) -> tuple[list[EventBatch], float, float]:
    """A simulated impression/click stream of about ``n_events`` events (20 fields)."""
    import orjson

    n_impressions = max(1, round(n_events / 1.03))
    # Event time spans 1000 attribution windows: the first window, where only positives can
    # be learned (negatives wait for the window to close), is 0.1% of the stream, as in a
    # worker that runs for days rather than the first hour of its life.
    params = SimulationParams(
        n_impressions=n_impressions,
        n_fields=20,
        seed=seed,
        attribution_window_s=window_s,
        impressions_per_s=n_impressions / (1000 * window_s),
    )
    simulator = Simulator(params)
    decoder = EventDecoder(hasher)
    events: list[tuple[Any, Event | None]] = []
    batches: list[EventBatch] = []
    for event in simulator.events():
        events.append((0, decoder.decode(orjson.dumps(event))))
        if len(events) >= 8192:
            batches.append((events, []))
            events = []
    if events:
        batches.append((events, []))
    stats = simulator.stats()
    return batches, stats.bayes_logloss, stats.bayes_normalized_entropy


def file_stream(path: Path, fmt: str, hasher: FeatureHasher) -> list[EventBatch]:
    return list(read_batches(path, fmt, EventDecoder(hasher)))


def compare(
    stream: str,
    batches: list[EventBatch],
    settings: Settings,
    hasher: FeatureHasher,
    river_events: int,
    log: Callable[[str], None],
    bayes: tuple[float, float] = (math.nan, math.nan),
) -> list[StreamResult]:
    """Run every engine on ``batches`` (river and the fast engine also on a short prefix)."""
    n_events = sum(len(events) for events, _ in batches)
    full = StreamResult(stream, n_events, *bayes)
    params = settings.model

    def add(result: StreamResult, name: str, engine: Engine, data: Sequence[EventBatch]) -> None:
        log(f"  {stream}: {name} ...")
        result.engines.append(run_engine(name, engine, data, settings, hasher))

    add(full, "stream-fm", FastFM(params), batches)
    for name, arguments in VW_VARIANTS.items():
        add(full, name, VowpalWabbit(arguments, settings.hash_bits), batches)
    prefix_result = StreamResult(
        f"{stream} (first {river_events:,} events)", min(river_events, n_events)
    )
    prefix = _prefix(batches, river_events)
    add(prefix_result, "stream-fm", FastFM(params), prefix)
    add(prefix_result, "river-fm", RiverFM(params), prefix)
    for name, arguments in VW_VARIANTS.items():
        add(prefix_result, name, VowpalWabbit(arguments, settings.hash_bits), prefix)
    river_speed = prefix_result.engines[1].engine_examples_per_second
    for result in (full, prefix_result):
        for engine_result in result.engines:
            engine_result.speedup_vs_river = engine_result.engine_examples_per_second / river_speed
            if not math.isnan(full.bayes_logloss) and result is full:
                engine_result.excess_over_bayes = engine_result.logloss - full.bayes_logloss
    return [full, prefix_result]


def format_table(result: StreamResult) -> str:
    lines = [f"== {result.stream}: {result.events:,} events"]
    if not math.isnan(result.bayes_logloss):
        lines.append(
            f"   Bayes-optimal log loss {result.bayes_logloss:.5f}, NE {result.bayes_normalized_entropy:.4f}"
        )
    lines.append(
        f"   {'engine':<10} {'examples':>9} {'logloss':>8} {'last10%':>8} {'NE':>7} {'AUC':>7} "
        f"{'calib':>6} {'excess':>8} {'engine ex/s':>12} {'x river':>9}"
    )
    for e in result.engines:
        lines.append(
            f"   {e.engine:<10} {e.examples:>9,} {e.logloss:>8.5f} {e.logloss_last_10pct:>8.5f} "
            f"{e.normalized_entropy:>7.4f} {e.auc:>7.4f} {e.calibration:>6.3f} {e.excess_over_bayes:>8.5f} "
            f"{e.engine_examples_per_second:>12,.0f} {e.speedup_vs_river:>9,.1f}"
        )
    return "\n".join(lines)


def engine_only_throughput(n_examples: int = 2_000_000) -> float:
    """Examples/s of the compiled kernel alone (score + learn), pre-hashed data."""
    from stream_fm.model.fast import engine_throughput

    return engine_throughput(n_examples, n_fields=20, k=8)


STREAMS = ("simulated", "ipinyou", "talkingdata")


def main_bench(
    settings: Settings,
    streams: Sequence[str],
    *,
    events: int,
    river_events: int,
    data_dir: Path,
    sim_seed: int,
    json_path: Path | None = None,
) -> int:
    """``stream-fm bench``: every engine on every stream, tables to stdout, progress to stderr."""
    import json
    import sys

    unknown = set(streams) - set(STREAMS)
    if unknown:
        raise StreamFMError(f"unknown bench stream(s): {', '.join(sorted(unknown))}")
    hasher = decoder_for(settings).hasher
    results: list[StreamResult] = []

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    throughput = engine_only_throughput()
    print(
        f"engine only (compiled kernel, 20 fields, k={settings.model.k}, score+learn): "
        f"{throughput:,.0f} examples/s"
    )
    for stream in streams:
        if stream == "simulated":
            batches, bayes_ll, bayes_ne = simulated_stream(
                events, sim_seed, settings.attribution_window_s, hasher
            )
            outcome = compare(
                "simulated", batches, settings, hasher, river_events, say, (bayes_ll, bayes_ne)
            )
        elif stream == "ipinyou":
            folder = data_dir / "ipinyou_deepctr"
            batches = file_stream(folder / "train.fm.txt", "libsvm", hasher)
            batches += file_stream(folder / "test.fm.txt", "libsvm", hasher)
            outcome = compare("ipinyou train+test", batches, settings, hasher, river_events, say)
        else:
            path = data_dir / "talkingdata" / "train_sample.sorted.csv"
            batches = file_stream(path, "talkingdata", hasher)
            outcome = compare("talkingdata", batches, settings, hasher, river_events, say)
        for result in outcome:
            print(format_table(result), flush=True)
        results += outcome
    if json_path:
        payload = {
            "engine_only_examples_per_second": throughput,
            "streams": [r.as_dict() for r in results],
        }
        json_path.write_text(json.dumps(payload, indent=2, default=lambda v: None))
    return 0


__all__ = [
    "FMParams",
    "Rejected",
    "StreamResult",
    "VowpalWabbit",
    "compare",
    "engine_only_throughput",
    "file_stream",
    "format_table",
    "main_bench",
    "simulated_stream",
]
