"""``stream-fm bench``: quality and speed on the streams users meet, side by side in one run.

Each stream is decoded once; every engine then sees the same events:

- **stream-fm** through the worker's own pipeline (same join, same progressive validation on
  the p served before learning), with each label policy on streams whose labels arrive late;
- **river**'s FMClassifier through the same pipeline, on a prefix (it is ~1,000x slower);
- **Vowpal Wabbit** (linear, ``-q ff``, ``--lrq ff8``) two ways. *Served*: through the same
  pipeline, predicting each impression when it is served and learning it when its label is
  final, like stream-fm; on labeled rows VW's prediction is the one it makes inside
  ``learn()`` (``predict()`` changes what ``--lrq`` learns next). *Driver*: VW's own file
  driver on the examples written out in the order their labels became final, its ``-p``
  output as the progressive loss and its speed; on streams with delayed labels this predicts
  each example only once its label is known, a hindsight no worker serving in real time has,
  so it is reported beside, not instead of, the served figure.

Figures per run: log loss over the whole stream, over the first attribution window (what a
fresh model serves) and the last tenth (what it converged to), NE, whole-stream AUC,
calibration, the excess over the Bayes-optimal log loss where the truth is known, and
examples/s (engine time for pipeline runs, wall time of the driver).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from stream_fm.config import Settings, build_settings
from stream_fm.errors import InvalidEvent, StreamFMError
from stream_fm.events import Click, Event, EventDecoder, Impression, Labeled
from stream_fm.join import CLICK_EARLY, LABEL_POLICIES, AttributionJoiner, PendingImpression
from stream_fm.model import FastFM, RiverFM
from stream_fm.model.base import Engine, OpBatch, SparseExample, StateValue
from stream_fm.pipeline import Pipeline, Rejected, decoder_for
from stream_fm.replay import BATCH_EVENTS, Batch, EventBatch, RecordBatch, read_batches, replay
from stream_fm.tools.bench.vw import VW_VARIANTS, VowpalWabbit, vw_driver
from stream_fm.tools.simulate import SimulationParams, Simulator

Say = Callable[[str], None]
HOUR_S = 3600.0
#: Adam's step sizes in the ``stream-fm/adam`` row: the best of seven tried on the real logs
#: and a 300k simulated stream (docs/benchmarks.md, "Adam"); the defaults are VW's adaptive
#: update's, ten to a hundred times too large for Adam.
ADAM_RATES: dict[str, Any] = {
    "optimizer": "adam",
    "learning_rate": 0.003,
    "latent_learning_rate": 0.001,
    "intercept_learning_rate": 0.01,
}


@dataclass(frozen=True, slots=True)
class Stream:
    name: str
    about: str
    batches: list[EventBatch]
    window_s: float
    delayed: bool  # impressions and clicks joined in event time (else labeled rows)
    bayes_logloss: float = math.nan
    bayes_normalized_entropy: float = math.nan

    @property
    def events(self) -> int:
        return sum(len(events) for events, _ in self.batches)


def _chunks(events: Iterator[tuple[Any, Any]]) -> list[EventBatch]:
    batches: list[EventBatch] = []
    chunk: list[tuple[Any, Any]] = []
    for item in events:
        chunk.append(item)
        if len(chunk) >= BATCH_EVENTS:
            batches.append((chunk, []))
            chunk = []
    if chunk:
        batches.append((chunk, []))
    return batches


def _decoded(batch: Batch, decoder: EventDecoder) -> EventBatch:
    """Events of a batch, decoded here if it holds records: engines then see the same events,
    and decoding is left out of their time."""
    if not isinstance(batch, RecordBatch):
        return batch
    events: list[tuple[Any, Event | None]] = []
    rejected: list[Rejected] = []
    for position, line in enumerate(batch.values):
        try:
            events.append((0, decoder.decode(line)))
        except InvalidEvent as error:
            rejected.append(Rejected(position, error.reason, error.detail))
            events.append((0, None))
    return events, rejected


def simulated(name: str, about: str, decoder: EventDecoder, **params: Any) -> Stream:
    simulator = Simulator(SimulationParams(n_fields=20, **params))
    decode = decoder.decode
    batches = _chunks((0, decode(orjson.dumps(e))) for e in simulator.events())
    stats = simulator.stats()
    window_s = float(params.get("attribution_window_s", HOUR_S))
    return Stream(
        name, about, batches, window_s, True, stats.bayes_logloss, stats.bayes_normalized_entropy
    )


def from_file(
    name: str, about: str, decoder: EventDecoder, files: Sequence[tuple[Path, str]]
) -> Stream:
    batches: list[EventBatch] = []
    delayed = False
    for path, fmt in files:
        if not path.is_file():
            raise StreamFMError(f"bench: {path} not found (--data-dir names the shared data)")
        batches += (_decoded(b, decoder) for b in read_batches(path, fmt, decoder))
        delayed |= fmt in ("jsonl", "talkingdata")
    return Stream(name, about, batches, HOUR_S, delayed)


#: The real logs of ``../shared/data``: per stream, what it is and its (path, format) files.
STREAM_FILES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "talkingdata": ("100k ad clicks joined with app downloads at their real delays",
                    (("talkingdata/train_sample.sorted.csv", "talkingdata"),)),
    "ipinyou": ("iPinYou train then test (the test has a quarter of the click rate)",
                (("ipinyou_deepctr/train.fm.txt", "libsvm"), ("ipinyou_deepctr/test.fm.txt", "libsvm"))),
    "criteo-10k": ("head of Criteo's Kaggle train.txt (22% clicks)",
                   (("criteo_kaggle_head10k/train.head10k.tsv", "criteo_tsv"),)),
    "avazu-9k": ("head of Avazu's Kaggle train.csv (17% clicks)",
                 (("avazu_head9k/train.head9k.csv", "avazu"),)),
    "criteo-2k": ("Criteo format sample (2k rows)", (("criteo_3idiots/train.tiny.csv", "criteo"),)),
    "avazu-3k": ("Avazu format sample (3k rows of one hour)", (("avazu_4idiots/tr.rx.csv", "avazu"),)),
    "xlearn": ("xLearn's libffm Criteo sample (400 rows)",
               (("xlearn_criteo/small_train.txt", "libsvm"), ("xlearn_criteo/small_test.txt", "libsvm"))),
}  # fmt: skip


def _file_builder(
    name: str, about: str, files: list[tuple[Path, str]]
) -> Callable[[EventDecoder], Stream]:
    return lambda dec: from_file(name, about, dec, files)


def stream_builders(
    data_dir: Path, long_events: int
) -> dict[str, Callable[[EventDecoder], Stream]]:
    """Every stream ``stream-fm bench`` knows, by name, in the order it runs them."""
    d = data_dir
    return {
        "simulated": lambda dec: simulated(
            "simulated",
            "`stream-fm simulate --impressions 400000 --seed 11`: 1 h window at 10 imp/s, "
            "11 windows (the first is 9% of the stream)",
            dec, n_impressions=400_000, seed=11,
        ),
        "simulated-100": lambda dec: simulated(
            "simulated-100",
            "the same at 100 impressions/s: the first window is 90% of the stream",
            dec, n_impressions=400_000, seed=12, impressions_per_s=100.0,
        ),
        "simulated-drift": lambda dec: simulated(
            "simulated-drift",
            "400k impressions at 10/s whose ground truth is replaced half way (staleness)",
            dec, n_impressions=400_000, seed=13, drift_at=200_000,
        ),
        "simulated-long": lambda dec: simulated(
            "simulated-long",
            f"{long_events:,} events at 10 imp/s ({long_events / 1.03 / 36_000:.0f} windows)",
            dec, n_impressions=round(long_events / 1.03), seed=7,
        ),
        **{
            name: _file_builder(name, about, [(d / path, fmt) for path, fmt in pairs])
            for name, (about, pairs) in STREAM_FILES.items()
        },
    }  # fmt: skip


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

    def state(self, into: Mapping[str, StateValue] | None = None) -> dict[str, StateValue]:
        return self.inner.state(into)

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        self.inner.load_state(state, strict=strict)


@dataclass(slots=True)
class EngineResult:
    engine: str
    protocol: str  # "served" (pipeline) or "driver" (VW's file driver, labels at once)
    examples: int
    logloss: float
    logloss_first_window: float
    logloss_last_10pct: float
    normalized_entropy: float
    auc: float
    calibration: float
    examples_per_second: float
    excess_over_bayes: float = math.nan
    last_10pct_over_bayes: float = math.nan


@dataclass(slots=True)
class StreamResult:
    stream: str
    about: str
    events: int
    bayes_logloss: float = math.nan
    bayes_normalized_entropy: float = math.nan
    engines: list[EngineResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pipeline(
    name: str, engine: Engine, stream: Stream, settings: Settings, limit: int | None = None
) -> EngineResult:
    """One engine through the worker's pipeline (served protocol)."""
    timed = TimedEngine(engine)
    pipeline = Pipeline.from_settings(settings, engine=timed)
    batches = stream.batches if limit is None else _prefix(stream.batches, limit)
    report = replay(pipeline, iter(batches))
    return EngineResult(
        engine=name,
        protocol="served",
        examples=report.examples,
        logloss=report.logloss,
        logloss_first_window=report.logloss_first_window if stream.delayed else math.nan,
        logloss_last_10pct=report.logloss_last_10pct,
        normalized_entropy=report.normalized_entropy,
        auc=report.auc,
        calibration=report.calibration,
        examples_per_second=report.examples / timed.seconds if timed.seconds else math.nan,
    )


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


def labeled_in_label_order(
    stream: Stream, settings: Settings, decoder: EventDecoder
) -> Iterator[tuple[npt.NDArray[np.int32], npt.NDArray[np.float64], int, int]]:
    """(buckets, values, label, impression ts) of every example, in the order its label
    became final: the attribution window joined in event time, as the worker joins it."""
    joiner = AttributionJoiner(settings.attribution_window_ms, settings.max_pending_impressions)
    hasher = decoder.hasher
    for events, _ in stream.batches:
        for _, event in events:
            kind = type(event)
            if kind is Labeled:
                assert isinstance(event, Labeled)
                yield hasher.buckets(event.keys), np.array(event.values), event.label, event.ts_ms
                continue
            if kind is Impression:
                assert isinstance(event, Impression)
                example = SparseExample(hasher.buckets(event.keys), np.array(event.values))
                due = joiner.add_impression(
                    PendingImpression(event.id, event.ts_ms, example, 0.5, 0)
                )
            elif kind is Click:
                assert isinstance(event, Click)
                due = joiner.add_click(event.id, event.ts_ms)
            else:
                continue
            for outcome in due:
                x = outcome.impression.example
                yield x.indices, x.values, outcome.label, outcome.impression.ts_ms
    for outcome in joiner.flush():
        x = outcome.impression.example
        yield x.indices, x.values, outcome.label, outcome.impression.ts_ms


def run_driver(
    name: str, arguments: str, stream: Stream, settings: Settings, decoder: EventDecoder
) -> EngineResult:
    """VW's file driver on the examples in label order; its -p output is the progressive loss."""
    with tempfile.TemporaryDirectory(prefix="stream-fm-vw-") as work:
        data = os.path.join(work, "examples.vw")
        labels, ts = [], []
        with open(data, "w") as sink:
            for indices, values, label, impression_ts in labeled_in_label_order(
                stream, settings, decoder
            ):
                features = " ".join(
                    f"{i}:{v:.9g}" for i, v in zip(indices.tolist(), values.tolist(), strict=True)
                )
                sink.write(f"{1 if label else -1} |f {features}\n")
                labels.append(label)
                ts.append(impression_ts)
        p, seconds = vw_driver(data, arguments, settings.hash_bits, work)
    order = np.argsort(np.array(ts), kind="stable")
    return _scored(name, "driver", p[order], np.array(labels, dtype=np.int8)[order],
                   np.array(ts)[order], stream, settings, seconds)  # fmt: skip


def _scored(
    name: str,
    protocol: str,
    p: npt.NDArray[np.float64],
    y: npt.NDArray[np.int8],
    ts: npt.NDArray[np.int64],
    stream: Stream,
    settings: Settings,
    seconds: float,
) -> EngineResult:
    from stream_fm.evaluate import auc, binary_entropy, log_loss

    def mean_loss(mask: npt.NDArray[np.bool_]) -> float:
        if not mask.any():
            return math.nan
        return float(
            np.mean([log_loss(float(q), int(t)) for q, t in zip(p[mask], y[mask], strict=True)])
        )

    everything = np.ones(len(p), dtype=bool)
    first = ts < ts[0] + settings.attribution_window_ms
    last = np.arange(len(p)) >= len(p) - len(p) // 10
    whole = mean_loss(everything)
    return EngineResult(
        engine=name,
        protocol=protocol,
        examples=len(p),
        logloss=whole,
        logloss_first_window=mean_loss(first) if stream.delayed else math.nan,
        logloss_last_10pct=mean_loss(last),
        normalized_entropy=whole / binary_entropy(float(np.mean(y))),
        auc=auc(p, y),
        calibration=float(p.sum() / max(1, int(y.sum()))),
        examples_per_second=len(p) / seconds if seconds else math.nan,
    )


def compare(
    stream: Stream, settings: Settings, decoder: EventDecoder, river_events: int, say: Say
) -> StreamResult:
    """Every engine on one stream."""
    result = StreamResult(
        stream.name,
        stream.about,
        stream.events,
        stream.bayes_logloss,
        stream.bayes_normalized_entropy,
    )

    def add(engine: EngineResult) -> None:
        if not math.isnan(stream.bayes_logloss):
            engine.excess_over_bayes = engine.logloss - stream.bayes_logloss
            engine.last_10pct_over_bayes = engine.logloss_last_10pct / stream.bayes_logloss
        result.engines.append(engine)
        say(f"  {stream.name}: {engine.engine} ({engine.protocol}) log loss {engine.logloss:.5f}")

    policies = LABEL_POLICIES if stream.delayed else (settings.label_policy,)
    for policy in policies:
        chosen = build_settings({**_flat(settings), "label_policy": policy})
        name = "stream-fm" if policy == settings.label_policy else f"stream-fm/{policy}"
        add(run_pipeline(name, FastFM(settings.model), stream, chosen))
    if settings.model.optimizer != "adam":
        adam = build_settings({**_flat(settings), **ADAM_RATES})
        add(run_pipeline("stream-fm/adam", FastFM(adam.model), stream, adam))
    if settings.model.interactions == "none":
        crossed = build_settings({**_flat(settings), "interactions": "all"})
        add(run_pipeline("stream-fm/crosses", FastFM(crossed.model), stream, crossed))
    vw_served = build_settings({**_flat(settings), "label_policy": CLICK_EARLY})
    for name, arguments in VW_VARIANTS.items():
        add(run_pipeline(name, VowpalWabbit(arguments, settings.hash_bits), stream, vw_served))
        add(run_driver(name, arguments, stream, settings, decoder))
    if river_events:
        limit = min(river_events, stream.events)
        river_params = settings.model
        if river_params.optimizer not in ("sgd", "adagrad", "ftrl"):
            river_params = replace(river_params, optimizer="adagrad")  # river has no such one
        for name, engine in (
            ("stream-fm", FastFM(settings.model)),
            (f"river ({river_params.optimizer})", RiverFM(river_params)),
        ):
            prefix = run_pipeline(f"{name} (first {limit:,})", engine, stream, settings, limit)
            add(prefix)
    return result


def _flat(settings: Settings) -> dict[str, Any]:
    from stream_fm.config import SPECS

    return {
        spec.name: getattr(settings.model if spec.in_model else settings, spec.name)
        for spec in SPECS.values()
    }


def format_table(result: StreamResult) -> str:
    lines = [f"== {result.stream}: {result.events:,} events; {result.about}"]
    if not math.isnan(result.bayes_logloss):
        lines.append(
            f"   Bayes-optimal log loss {result.bayes_logloss:.5f}, NE {result.bayes_normalized_entropy:.4f}"
        )
    lines.append(
        f"   {'engine':<28} {'protocol':<8} {'examples':>9} {'logloss':>8} {'1st win':>8} "
        f"{'last10%':>8} {'NE':>7} {'AUC':>7} {'calib':>6} {'x Bayes':>7} {'examples/s':>11}"
    )
    for e in result.engines:
        over = (
            e.logloss / result.bayes_logloss if not math.isnan(result.bayes_logloss) else math.nan
        )
        lines.append(
            f"   {e.engine:<28} {e.protocol:<8} {e.examples:>9,} {e.logloss:>8.5f} "
            f"{e.logloss_first_window:>8.5f} {e.logloss_last_10pct:>8.5f} "
            f"{e.normalized_entropy:>7.4f} {e.auc:>7.4f} {e.calibration:>6.3f} {over:>7.3f} "
            f"{e.examples_per_second:>11,.0f}"
        )
    return "\n".join(lines)


def engine_only_throughput(n_examples: int = 2_000_000) -> float:
    """Examples/s of the compiled kernel alone (score + learn), pre-hashed data."""
    from stream_fm.model.fast import engine_throughput

    return engine_throughput(n_examples, n_fields=20, k=8)


def chosen_streams(
    streams: Sequence[str], data_dir: Path, long_events: int
) -> dict[str, Callable[[EventDecoder], Stream]]:
    """The builders of the streams asked for; an unknown name stops the benchmark."""
    builders = stream_builders(data_dir, long_events)
    unknown = [s for s in streams if s not in builders]
    if unknown:
        raise StreamFMError(
            f"unknown bench stream(s) {', '.join(unknown)}; choose from {', '.join(builders)}"
        )
    return builders


def say(line: str) -> None:
    """Progress, on standard error (the tables go to standard output)."""
    print(line, file=sys.stderr, flush=True)


def main_bench(
    settings: Settings,
    streams: Sequence[str],
    *,
    long_events: int,
    river_events: int,
    data_dir: Path,
    json_path: Path | None = None,
) -> int:
    """``stream-fm bench``: every engine on every stream, tables to stdout, progress to stderr."""
    import json

    builders = chosen_streams(streams, data_dir, long_events)

    decoder = decoder_for(settings)
    throughput = engine_only_throughput()
    print(
        f"engine only (compiled kernel, 20 fields, k={settings.model.k}, score+learn): "
        f"{throughput:,.0f} examples/s",
        flush=True,
    )
    from stream_fm.tools.bench.speed import format_speed, replay_against_vw

    say("replay against VW's file driver on the same simulated data ...")
    speed = replay_against_vw(settings)
    print(format_speed(speed), flush=True)
    results: list[StreamResult] = []
    for name in streams:
        say(f"{name}: decoding")
        result = compare(builders[name](decoder), settings, decoder, river_events, say)
        print(format_table(result), flush=True)
        results.append(result)
    if json_path:
        payload = {
            "engine_only_examples_per_second": throughput,
            "replay_against_vw": speed.as_dict(),
            "streams": [r.as_dict() for r in results],
        }
        json_path.write_text(json.dumps(payload, indent=2, default=lambda v: None))
    return 0


__all__ = [
    "StreamResult",
    "chosen_streams",
    "compare",
    "format_table",
    "main_bench",
    "say",
    "stream_builders",
]
