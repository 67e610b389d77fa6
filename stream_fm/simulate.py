"""Synthetic impression/click traffic from a known ground-truth FM.

Impressions have ``n_fields`` categorical fields whose cardinalities range from tens to
``max_cardinality`` (geometrically) and whose values are Zipf-popular. The click probability
is a degree-2 FM over those values with a bias set for ``base_ctr``; a click follows after a
delay drawn from a log-normal body plus an exponential tail, so some clicks land beyond the
attribution window. Because the truth is known, the Bayes-optimal log loss of the labels a
joiner sees (a click within the window) is known too: no model can beat it on average.

>>> traffic = Simulator(SimulationParams(n_impressions=2000, n_fields=5, seed=3)).generate()
>>> 0.005 < traffic.stats.positives / traffic.stats.impressions < 0.12
True
>>> [e["type"] for e in traffic.events()][:2]
['impression', 'impression']
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_fm.errors import ConfigError

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class SimulationParams:
    n_impressions: int = 100_000
    n_fields: int = 20
    min_cardinality: int = 10
    max_cardinality: int = 100_000
    zipf_exponent: float = 1.1
    k: int = 4
    weight_std: float = 0.25
    latent_std: float = 0.2
    base_ctr: float = 0.03
    impressions_per_s: float = 10.0  # event-time rate: a stream spans many attribution windows
    start_ts_ms: int = 1_732_406_400_000
    click_delay_median_s: float = 30.0
    click_delay_sigma: float = 1.5
    long_tail_share: float = 0.05  # clicks from the slow exponential tail
    long_tail_mean_s: float = 7200.0
    attribution_window_s: float = 3600.0
    seed: int = 7

    def __post_init__(self) -> None:
        checks = [
            ("n_impressions", self.n_impressions >= 1),
            ("n_fields", self.n_fields >= 1),
            ("min_cardinality", 2 <= self.min_cardinality <= self.max_cardinality),
            ("zipf_exponent", self.zipf_exponent > 0),
            ("k", self.k >= 1),
            ("base_ctr", 0 < self.base_ctr < 0.5),
            ("impressions_per_s", self.impressions_per_s > 0),
            ("long_tail_share", 0 <= self.long_tail_share <= 1),
            ("attribution_window_s", self.attribution_window_s > 0),
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
class Traffic:
    """Generated traffic, kept columnar; ``events()`` yields the JSON-ready dicts in ts order."""

    params: SimulationParams
    field_names: list[str]
    values: IntArray  # (n_impressions, n_fields) value index per field
    impression_ts_ms: IntArray
    clicked: npt.NDArray[np.bool_]
    click_ts_ms: IntArray  # meaningful where clicked
    label_probability: FloatArray  # P(click within the window | features)
    stats: SimulationStats

    def events(self) -> Iterator[dict[str, Any]]:
        """Impressions and clicks merged in event-time order (impression first on ties)."""
        n = len(self.impression_ts_ms)
        clicked_rows = np.flatnonzero(self.clicked)
        ts = np.concatenate([self.impression_ts_ms, self.click_ts_ms[clicked_rows]])
        rows = np.concatenate([np.arange(n), clicked_rows])
        is_click = np.concatenate([np.zeros(n, np.int8), np.ones(len(clicked_rows), np.int8)])
        order = np.lexsort((is_click, ts))
        names = self.field_names
        value_labels = [[f"v{i}" for i in range(card)] for card in self._cardinalities()]
        values = self.values
        for i in order.tolist():
            row = int(rows[i])
            ident = f"imp-{row}"
            if is_click[i]:
                yield {"type": "click", "id": ident, "ts": int(ts[i])}
            else:
                row_values = values[row].tolist()
                features = {
                    name: value_labels[f][v]
                    for f, (name, v) in enumerate(zip(names, row_values, strict=True))
                }
                yield {"type": "impression", "id": ident, "ts": int(ts[i]), "features": features}

    def _cardinalities(self) -> list[int]:
        return cardinalities(self.params)


def cardinalities(params: SimulationParams) -> list[int]:
    if params.n_fields == 1:
        return [params.max_cardinality]
    ratio = params.max_cardinality / params.min_cardinality
    return [
        round(params.min_cardinality * ratio ** (f / (params.n_fields - 1)))
        for f in range(params.n_fields)
    ]


def _zipf_sample(rng: np.random.Generator, cardinality: int, exponent: float, n: int) -> IntArray:
    weights = 1.0 / np.arange(1, cardinality + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    # Shuffle which index is popular so that bucket order carries no signal.
    permutation: IntArray = rng.permutation(cardinality)
    ranks = np.searchsorted(cdf, rng.random(n), side="right").clip(0, cardinality - 1)
    chosen: IntArray = permutation[ranks]
    return chosen


def _binary_entropy(q: FloatArray) -> FloatArray:
    q = np.clip(q, 1e-15, 1 - 1e-15)
    out: FloatArray = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return out


class Simulator:
    def __init__(self, params: SimulationParams) -> None:
        self.params = params

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

    def generate(self) -> Traffic:
        p = self.params
        rng = np.random.default_rng(p.seed)
        n = p.n_impressions
        cards = cardinalities(p)
        values = np.empty((n, p.n_fields), dtype=np.int64)
        logit = np.zeros(n)
        latent_sum = np.zeros((n, p.k))
        latent_square_sum = np.zeros(n)
        for f, card in enumerate(cards):
            weights = rng.normal(0.0, p.weight_std, card)
            latents = rng.normal(0.0, p.latent_std, (card, p.k))
            column = _zipf_sample(rng, card, p.zipf_exponent, n)
            values[:, f] = column
            logit += weights[column]
            chosen = latents[column]
            latent_sum += chosen
            latent_square_sum += np.einsum("ij,ij->i", chosen, chosen)
        logit += 0.5 * (np.einsum("ij,ij->i", latent_sum, latent_sum) - latent_square_sum)
        logit += self._bias_for(logit, p.base_ctr)
        click_probability = 1.0 / (1.0 + np.exp(-logit))
        clicked = rng.random(n) < click_probability

        gaps_ms = rng.exponential(1000.0 / p.impressions_per_s, n)
        impression_ts = p.start_ts_ms + np.cumsum(gaps_ms).astype(np.int64)
        in_tail = rng.random(n) < p.long_tail_share
        delay_s = np.where(
            in_tail,
            rng.exponential(p.long_tail_mean_s, n),
            p.click_delay_median_s * np.exp(p.click_delay_sigma * rng.standard_normal(n)),
        )
        click_ts = impression_ts + np.maximum(1, np.round(delay_s * 1000)).astype(np.int64)
        window_ms = round(p.attribution_window_s * 1000)
        positive = clicked & (click_ts - impression_ts <= window_ms)

        label_probability = click_probability * self.delay_cdf(p.attribution_window_s)
        q = np.clip(label_probability, 1e-15, 1 - 1e-15)
        realised = float(-np.mean(np.where(positive, np.log(q), np.log1p(-q))))
        ctr = float(positive.mean())
        entropy = (
            -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr)) if 0 < ctr < 1 else math.nan
        )
        stats = SimulationStats(
            impressions=n,
            clicks=int(clicked.sum()),
            positives=int(positive.sum()),
            clicks_beyond_window=int((clicked & ~positive).sum()),
            bayes_logloss=realised,
            bayes_normalized_entropy=realised / entropy,
            expected_bayes_logloss=float(_binary_entropy(label_probability).mean()),
        )
        return Traffic(
            params=p,
            field_names=[f"f{f:02d}" for f in range(p.n_fields)],
            values=values,
            impression_ts_ms=impression_ts,
            clicked=clicked,
            click_ts_ms=click_ts,
            label_probability=label_probability,
            stats=stats,
        )

    @staticmethod
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
