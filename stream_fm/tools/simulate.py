"""Synthetic impression/click traffic from a known ground-truth FM, generated as a stream.

Impressions have ``n_fields`` categorical fields whose cardinalities range from tens to
``max_cardinality`` (geometrically) and whose values are Zipf-popular. The click probability
is a degree-2 FM over those values with a bias set for ``base_ctr``; a click follows after a
delay drawn from a log-normal body plus an exponential tail, so some clicks land beyond the
attribution window. Because the truth is known, the Bayes-optimal log loss of the labels a
joiner sees (a click within the window) is known too: no model can beat it on average.
With ``drift_at`` > 0 a second, independent ground truth takes over from that impression on
(the popularity of values stays), which prices a model's staleness.

The stream is generated in chunks with bounded memory, whatever its length (``n_impressions``
0 is unbounded). Every random draw of impression ``i`` comes from a counter-based generator
(Philox) at a counter derived from ``i``, so the events depend on the seed only, never on the
chunk size; clicks wait in a buffer bounded by the click delays, not by the stream length.

>>> simulator = Simulator(SimulationParams(n_impressions=2000, n_fields=5, seed=3))
>>> events = list(simulator.events(chunk_impressions=512))
>>> [e["type"] for e in events][:2]
['impression', 'impression']
>>> events == list(simulator.events(chunk_impressions=1999))
True
>>> stats = simulator.stats()  # of the last stream generated
>>> 0.005 < stats.positives / stats.impressions < 0.12
True
"""

from __future__ import annotations

import contextlib
import math
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt

from stream_fm.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

DEFAULT_CHUNK: Final = 32_768
# The bias is fitted on this many impressions drawn apart from the stream, so it does not
# depend on how long a stream is asked for.
_CALIBRATION_SAMPLE: Final = 200_000
# Philox channels: independent counter streams per kind of draw.
_VALUES, _MISC, _CALIBRATION = 1, 2, 3
_MISC_WIDTH: Final = 8  # uniforms per impression: click, gap, tail, exponential, 2 normal, 2 spare


@dataclass(frozen=True, slots=True)
class SimulationParams:
    n_impressions: int = 100_000  # 0 = unbounded (stop by not asking for more)
    n_fields: int = 20
    min_cardinality: int = 10
    max_cardinality: int = 100_000
    zipf_exponent: float = 1.1
    k: int = 4
    weight_std: float = 0.25
    latent_std: float = 0.2
    base_ctr: float = 0.03
    impressions_per_s: float = 10.0  # event-time rate: sets how many windows a stream spans
    start_ts_ms: int = 1_732_406_400_000
    click_delay_median_s: float = 30.0
    click_delay_sigma: float = 1.5
    long_tail_share: float = 0.05  # clicks from the slow exponential tail
    long_tail_mean_s: float = 7200.0
    attribution_window_s: float = 3600.0
    drift_at: int = 0  # impression index where a second ground truth takes over; 0 = never
    seed: int = 7

    def __post_init__(self) -> None:
        checks = [
            ("n_impressions", self.n_impressions >= 0),
            ("n_fields", self.n_fields >= 1),
            ("min_cardinality", 2 <= self.min_cardinality <= self.max_cardinality),
            ("zipf_exponent", self.zipf_exponent > 0),
            ("k", self.k >= 1),
            ("base_ctr", 0 < self.base_ctr < 0.5),
            ("impressions_per_s", self.impressions_per_s > 0),
            ("click_delay_median_s", self.click_delay_median_s > 0),
            ("long_tail_share", 0 <= self.long_tail_share <= 1),
            ("attribution_window_s", self.attribution_window_s > 0),
            ("drift_at", self.drift_at >= 0),
            ("seed", 0 <= self.seed < 2**63),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(name, f"invalid simulation value {getattr(self, name)!r}")


@dataclass(frozen=True, slots=True)
class SimulationStats:
    impressions: int
    clicks: int
    positives: int  # clicks inside the attribution window
    clicks_beyond_window: int
    bayes_logloss: float  # realised on these labels with the true label probabilities
    bayes_normalized_entropy: float
    expected_bayes_logloss: float  # mean binary entropy of the true label probabilities

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive impressions ``start .. start + len - 1``, columnar."""

    start: int
    values: IntArray  # (m, n_fields) value index per field
    impression_ts_ms: IntArray
    clicked: BoolArray
    click_ts_ms: IntArray  # meaningful where clicked
    label_probability: FloatArray  # P(click within the window | features)

    def __len__(self) -> int:
        return len(self.impression_ts_ms)


@dataclass(frozen=True, slots=True)
class Traffic:
    """A whole generated stream held in memory (small streams and tests)."""

    params: SimulationParams
    field_names: list[str]
    values: IntArray
    impression_ts_ms: IntArray
    clicked: BoolArray
    click_ts_ms: IntArray
    label_probability: FloatArray
    stats: SimulationStats

    def events(self) -> Iterator[dict[str, Any]]:
        """Impressions and clicks merged in event-time order (impression first on ties)."""
        chunk = Chunk(
            0,
            self.values,
            self.impression_ts_ms,
            self.clicked,
            self.click_ts_ms,
            self.label_probability,
        )
        return _Merger(self.params).events(iter([chunk]))


def cardinalities(params: SimulationParams) -> list[int]:
    if params.n_fields == 1:
        return [params.max_cardinality]
    ratio = params.max_cardinality / params.min_cardinality
    return [
        round(params.min_cardinality * ratio ** (f / (params.n_fields - 1)))
        for f in range(params.n_fields)
    ]


def _binary_entropy(q: FloatArray) -> FloatArray:
    q = np.clip(q, 1e-15, 1 - 1e-15)
    out: FloatArray = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return out


def _uniforms(seed: int, channel: int, start: int, m: int, width: int) -> FloatArray:
    """``(m, width)`` uniforms in [0, 1) for items ``start .. start + m - 1`` of a channel.

    Philox is counter-based: each counter step gives 4 draws, so item ``i`` starts at counter
    ``i * width / 4`` and its draws are the same however the items are split into calls.
    """
    width4 = -(-width // 4) * 4
    key = np.random.SeedSequence([seed, channel]).generate_state(2, np.uint64)
    generator = np.random.Generator(np.random.Philox(key=key, counter=start * (width4 // 4)))
    return generator.random(m * width4).reshape(m, width4)[:, :width]


@dataclass(frozen=True, slots=True)
class _Truth:
    weights: list[FloatArray]  # per field, per value
    latents: list[FloatArray]  # per field, (cardinality, k)
    bias: float


class Simulator:
    def __init__(self, params: SimulationParams) -> None:
        self.params = params
        p = params
        rng = np.random.default_rng(p.seed)
        self._cards = cardinalities(p)
        self._field_names = [f"f{f:02d}" for f in range(p.n_fields)]
        # Popularity: a Zipf CDF per field, with the popular indices shuffled so that bucket
        # order carries no signal.
        self._cdfs: list[FloatArray] = []
        self._permutations: list[IntArray] = []
        for card in self._cards:
            weights = 1.0 / np.arange(1, card + 1, dtype=np.float64) ** p.zipf_exponent
            cdf = np.cumsum(weights)
            self._cdfs.append(cdf / cdf[-1])
            self._permutations.append(rng.permutation(card))
        calibration = self._values(_CALIBRATION, 0, _CALIBRATION_SAMPLE)
        self._truths = [self._draw_truth(rng, calibration)]
        if p.drift_at:
            self._truths.append(self._draw_truth(rng, calibration))
        self._stats = _StatsAccumulator()

    @property
    def field_names(self) -> list[str]:
        return list(self._field_names)

    def delay_cdf(self, delay_s: float) -> float:
        """P(click delay <= delay_s) under the mixture the simulator draws from."""
        p = self.params
        body = 0.5 * (
            1
            + math.erf(
                math.log(delay_s / p.click_delay_median_s) / (p.click_delay_sigma * math.sqrt(2))
            )
        )
        tail = 1 - math.exp(-delay_s / p.long_tail_mean_s)
        return (1 - p.long_tail_share) * body + p.long_tail_share * tail

    def stats(self) -> SimulationStats:
        """Ground-truth figures of what the latest ``chunks``/``events`` call generated."""
        return self._stats.snapshot()

    # -- generation ----------------------------------------------------------------------

    def chunks(self, chunk_impressions: int = DEFAULT_CHUNK) -> Iterator[Chunk]:
        """The stream's impressions, ``chunk_impressions`` at a time (the last may be shorter)."""
        if chunk_impressions < 1:
            raise ConfigError("chunk_impressions", f"must be >= 1, got {chunk_impressions}")
        p = self.params
        self._stats = _StatsAccumulator()
        window_ms = round(p.attribution_window_s * 1000)
        label_share = self.delay_cdf(p.attribution_window_s)
        elapsed_us = 0  # integer microseconds: the sum does not depend on the chunking
        start = 0
        while p.n_impressions == 0 or start < p.n_impressions:
            m = chunk_impressions
            if p.n_impressions:
                m = min(m, p.n_impressions - start)
            values = self._values(_VALUES, start, m)
            misc = _uniforms(p.seed, _MISC, start, m, _MISC_WIDTH)
            click_probability = self._click_probability(values, start)
            clicked = misc[:, 0] < click_probability
            gaps_us = np.round(-np.log1p(-misc[:, 1]) * (1e6 / p.impressions_per_s))
            elapsed = elapsed_us + np.cumsum(gaps_us.astype(np.int64))
            elapsed_us = int(elapsed[-1])
            impression_ts = p.start_ts_ms + elapsed // 1000
            normal = np.sqrt(-2.0 * np.log1p(-misc[:, 4])) * np.cos(2.0 * np.pi * misc[:, 5])
            delay_s = np.where(
                misc[:, 2] < p.long_tail_share,
                -np.log1p(-misc[:, 3]) * p.long_tail_mean_s,
                p.click_delay_median_s * np.exp(p.click_delay_sigma * normal),
            )
            click_ts = impression_ts + np.maximum(1, np.round(delay_s * 1000)).astype(np.int64)
            chunk = Chunk(
                start, values, impression_ts, clicked, click_ts, click_probability * label_share
            )
            self._stats.add(chunk, clicked & (click_ts - impression_ts <= window_ms))
            yield chunk
            start += m

    def events(self, chunk_impressions: int = DEFAULT_CHUNK) -> Iterator[dict[str, Any]]:
        """Impressions and clicks merged in event-time order (impression first on ties)."""
        return _Merger(self.params).events(self.chunks(chunk_impressions))

    def generate(self) -> Traffic:
        """The whole (bounded) stream in memory."""
        if self.params.n_impressions == 0:
            raise ConfigError("n_impressions", "an unbounded stream cannot be held in memory")
        parts = list(self.chunks())
        return Traffic(
            params=self.params,
            field_names=self.field_names,
            values=np.concatenate([c.values for c in parts]),
            impression_ts_ms=np.concatenate([c.impression_ts_ms for c in parts]),
            clicked=np.concatenate([c.clicked for c in parts]),
            click_ts_ms=np.concatenate([c.click_ts_ms for c in parts]),
            label_probability=np.concatenate([c.label_probability for c in parts]),
            stats=self.stats(),
        )

    # -- internals -----------------------------------------------------------------------

    def _values(self, channel: int, start: int, m: int) -> IntArray:
        u = _uniforms(self.params.seed, channel, start, m, self.params.n_fields)
        values = np.empty((m, self.params.n_fields), dtype=np.int64)
        for f, (cdf, permutation) in enumerate(zip(self._cdfs, self._permutations, strict=True)):
            ranks = np.searchsorted(cdf, u[:, f], side="right").clip(0, len(cdf) - 1)
            values[:, f] = permutation[ranks]
        return values

    def _draw_truth(self, rng: np.random.Generator, calibration: IntArray) -> _Truth:
        p = self.params
        weights = [rng.normal(0.0, p.weight_std, card) for card in self._cards]
        latents = [rng.normal(0.0, p.latent_std, (card, p.k)) for card in self._cards]
        truth = _Truth(weights, latents, 0.0)
        return _Truth(weights, latents, _bias_for(_logits(truth, calibration), p.base_ctr))

    def _click_probability(self, values: IntArray, start: int) -> FloatArray:
        logit = _logits(self._truths[0], values)
        drift_at = self.params.drift_at
        if drift_at and start + len(values) > drift_at:
            after = max(0, drift_at - start)
            logit[after:] = _logits(self._truths[1], values[after:])
        out: FloatArray = 1.0 / (1.0 + np.exp(-logit))
        return out


def _logits(truth: _Truth, values: IntArray) -> FloatArray:
    n, k = len(values), truth.latents[0].shape[1]
    logit = np.full(n, truth.bias)
    latent_sum = np.zeros((n, k))
    latent_square_sum = np.zeros(n)
    for f, (weights, latents) in enumerate(zip(truth.weights, truth.latents, strict=True)):
        column = values[:, f]
        logit += weights[column]
        chosen = latents[column]
        latent_sum += chosen
        latent_square_sum += np.einsum("ij,ij->i", chosen, chosen)
    logit += 0.5 * (np.einsum("ij,ij->i", latent_sum, latent_sum) - latent_square_sum)
    return logit


def _bias_for(logit: FloatArray, base_ctr: float) -> float:
    """The bias that makes the mean click probability ``base_ctr`` (bisection)."""
    low, high = -30.0, 30.0
    for _ in range(60):
        middle = (low + high) / 2
        mean = float(np.mean(1.0 / (1.0 + np.exp(-(logit + middle)))))
        if mean < base_ctr:
            low = middle
        else:
            high = middle
    return (low + high) / 2


class _StatsAccumulator:
    """Running ground-truth figures, one chunk at a time."""

    def __init__(self) -> None:
        self.impressions = self.clicks = self.positives = 0
        self.realised_sum = self.entropy_sum = 0.0

    def add(self, chunk: Chunk, positive: BoolArray) -> None:
        q = np.clip(chunk.label_probability, 1e-15, 1 - 1e-15)
        self.impressions += len(chunk)
        self.clicks += int(chunk.clicked.sum())
        self.positives += int(positive.sum())
        self.realised_sum += float(-np.sum(np.where(positive, np.log(q), np.log1p(-q))))
        self.entropy_sum += float(_binary_entropy(chunk.label_probability).sum())

    def snapshot(self) -> SimulationStats:
        n = self.impressions
        realised = self.realised_sum / n if n else math.nan
        ctr = self.positives / n if n else math.nan
        entropy = (
            -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else math.nan
        )
        return SimulationStats(
            impressions=n,
            clicks=self.clicks,
            positives=self.positives,
            clicks_beyond_window=self.clicks - self.positives,
            bayes_logloss=realised,
            bayes_normalized_entropy=realised / entropy,
            expected_bayes_logloss=self.entropy_sum / n if n else math.nan,
        )


class _Merger:
    """Merges chunks of impressions and their clicks into one event-time-ordered stream.

    Order is (ts, impression before click, impression row): a click waits in a buffer until
    no later chunk can hold an impression at or before its ts, so the buffer is bounded by
    the click delays, never by the stream length.
    """

    def __init__(self, params: SimulationParams) -> None:
        self._names = [f"f{f:02d}" for f in range(params.n_fields)]
        self._labels = [[f"v{i}" for i in range(card)] for card in cardinalities(params)]

    def events(self, chunks: Iterator[Chunk]) -> Iterator[dict[str, Any]]:
        waiting_ts = np.zeros(0, dtype=np.int64)
        waiting_rows = np.zeros(0, dtype=np.int64)
        for chunk in chunks:
            rows = np.flatnonzero(chunk.clicked)
            waiting_ts = np.concatenate([waiting_ts, chunk.click_ts_ms[rows]])
            waiting_rows = np.concatenate([waiting_rows, chunk.start + rows])
            # Clicks at or after this chunk's last impression wait: the next chunk may hold
            # impressions with that same ts, which come first.
            due = waiting_ts < chunk.impression_ts_ms[-1]
            yield from self._merge(chunk, waiting_ts[due], waiting_rows[due])
            waiting_ts, waiting_rows = waiting_ts[~due], waiting_rows[~due]
        order = np.lexsort((waiting_rows, waiting_ts))
        for ts, row in zip(waiting_ts[order].tolist(), waiting_rows[order].tolist(), strict=True):
            yield {"type": "click", "id": f"imp-{row}", "ts": ts}

    def _merge(
        self, chunk: Chunk, click_ts: IntArray, click_rows: IntArray
    ) -> Iterator[dict[str, Any]]:
        m = len(chunk)
        ts = np.concatenate([chunk.impression_ts_ms, click_ts])
        rows = np.concatenate([np.arange(m) + chunk.start, click_rows])
        is_click = np.concatenate([np.zeros(m, np.int8), np.ones(len(click_ts), np.int8)])
        order = np.lexsort((rows, is_click, ts))
        names, labels = self._names, self._labels
        values = chunk.values
        for i, t, row, click in zip(
            order.tolist(),
            ts[order].tolist(),
            rows[order].tolist(),
            is_click[order].tolist(),
            strict=True,
        ):
            ident = f"imp-{row}"
            if click:
                yield {"type": "click", "id": ident, "ts": t}
            else:
                features = {
                    name: labels[f][v]
                    for f, (name, v) in enumerate(zip(names, values[i].tolist(), strict=True))
                }
                yield {"type": "impression", "id": ident, "ts": t, "features": features}


class _StopFlag:
    """Set by SIGTERM/SIGINT: the stream ends after the current event, then flushes."""

    def __init__(self) -> None:
        self.set = False

    def __call__(self, _signum: int, _frame: object) -> None:
        self.set = True


def _file_sink(stack: contextlib.ExitStack, out: str) -> Callable[[str, str, bytes], None]:
    import gzip
    import sys

    file: IO[bytes]
    if out == "-":
        file = sys.stdout.buffer
        stack.callback(file.flush)
    else:
        # Closed by the stack; ruff's SIM115 cannot see that.
        opened = gzip.open(out, "wb") if out.endswith(".gz") else open(out, "wb")  # noqa: SIM115
        file = typing.cast(IO[bytes], stack.enter_context(opened))
    write = file.write

    def emit(_kind: str, _key: str, value: bytes) -> None:
        write(value + b"\n")

    return emit


def _kafka_sink(
    stack: contextlib.ExitStack,
    bootstrap_servers: str,
    topic: str,
    clicks_topic: str | None,
    kafka_client: str,
) -> Callable[[str, str, bytes], None]:
    from stream_fm.kafka.admin import event_producer

    producer = event_producer(bootstrap_servers, kafka_client)
    stack.callback(producer.close)
    stack.callback(producer.flush)  # callbacks run last-in first-out: flush, then close

    def emit(kind: str, key: str, value: bytes) -> None:
        producer.send(
            clicks_topic if clicks_topic and kind == "click" else topic, key.encode(), value
        )

    return emit


def write_jsonl(params: SimulationParams, path: Path) -> int:
    """The whole stream of ``params`` into a JSONL file, as ``stream-fm simulate --out`` writes
    it; returns the number of events (benchmarks replay the file)."""
    import orjson

    events = 0
    with path.open("wb") as out:
        for event in Simulator(params).events():
            out.write(orjson.dumps(event) + b"\n")
            events += 1
    return events


def run_simulation(
    params: SimulationParams,
    *,
    out: str | None = None,
    bootstrap_servers: str | None = None,
    topic: str = "ad-events",
    clicks_topic: str | None = None,
    rate: float = 0.0,
    summary_path: str | None = None,
    kafka_client: str = "kafka-python",
) -> int:
    """``stream-fm simulate``: stream the events to a JSONL file (``-`` = stdout, ``.gz``
    compresses) or to Kafka, paced at ``rate`` events/s (0 = as fast as possible), until the
    stream ends or SIGTERM/SIGINT; then print the ground truth's figures. Memory stays flat
    however long the stream."""
    import json
    import signal
    import sys
    import time

    import orjson

    if (out is None) == (bootstrap_servers is None):
        raise ConfigError("out", "give either --out PATH (- for stdout) or --bootstrap-servers")
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    simulator = Simulator(params)
    dumps = orjson.dumps
    started = time.monotonic()
    sent = 0
    with contextlib.suppress(BrokenPipeError), contextlib.ExitStack() as stack:
        # A reader like `head` that goes away ends the stream, like a signal.
        if bootstrap_servers is not None:
            emit = _kafka_sink(stack, bootstrap_servers, topic, clicks_topic, kafka_client)
            target = f"Kafka topic {topic}" + (f" and {clicks_topic}" if clicks_topic else "")
        else:
            assert out is not None
            emit = _file_sink(stack, out)
            target = "standard output" if out == "-" else out
        for event in simulator.events():
            if stop.set:
                break
            emit(event["type"], event["id"], dumps(event))
            sent += 1
            if rate > 0 and sent % 256 == 0:
                ahead_s = sent / rate - (time.monotonic() - started)
                if ahead_s > 0:
                    time.sleep(ahead_s)
    stats = simulator.stats()
    if summary_path:
        with open(summary_path, "w") as file:
            json.dump(stats.as_dict(), file, indent=2)
    print(
        f"wrote {sent:,} events in {time.monotonic() - started:.1f}s to {target}; ground truth "
        f"of the {stats.impressions:,} impressions generated: {stats.clicks:,} clicks, "
        f"{stats.positives:,} inside the {params.attribution_window_s:g}s window and "
        f"{stats.clicks_beyond_window:,} beyond it; Bayes-optimal log loss "
        f"{stats.bayes_logloss:.5f}, NE {stats.bayes_normalized_entropy:.4f}",
        file=sys.stderr if out == "-" else sys.stdout,
        flush=True,
    )
    return 0
