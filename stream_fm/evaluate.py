"""Progressive validation: quality of the served predictions, each scored before it was learned.

One accumulator is shared by replay, bench and worker, so all report the same numbers:

* cumulative: log loss (mean over all examples, p clipped to [1e-15, 1 - 1e-15]), normalized
  entropy (log loss / entropy of the empirical CTR, He et al. 2014), calibration
  (sum p / sum y);
* over the last ``window`` examples (a ring buffer): log loss, NE, calibration and exact AUC
  (ties count 1/2), computed on demand;
* optionally a series of ``(examples, window log loss, window NE)`` every ``series_every``
  examples, for the replay's plot.

Undefined values (no examples, no positives, one class only) are NaN; ``report()`` turns
them into ``None`` so it can go straight to JSON.

>>> pv = ProgressiveValidation(window=4)
>>> for p, y in [(0.9, 1), (0.2, 0), (0.7, 0), (0.4, 1), (0.1, 0)]:
...     _ = pv.update(p, y)
>>> pv.examples, pv.positives, round(pv.logloss, 4), pv.window_examples
(5, 2, 0.5108, 4)
>>> pv.auc_window  # last 4: (0.2, 0) (0.7, 0) (0.4, 1) (0.1, 0): 0.4 beats 2 of 3 negatives
0.6666666666666666
>>> round(pv.calibration, 3)
1.15
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt

from stream_fm.errors import CheckpointCorrupt
from stream_fm.model.base import StateValue

__all__ = ["EPSILON", "ProgressiveValidation", "auc", "binary_entropy", "log_loss"]

EPSILON: Final = 1e-15
_STATE_FORMAT: Final = "stream_fm.evaluate/1"
_NAN: Final = math.nan
_Scalar = TypeVar("_Scalar", bound=np.generic)


def binary_entropy(ctr: float) -> float:
    """Entropy (nats) of a Bernoulli(ctr); NaN where NE would be undefined (ctr 0, 1 or NaN)."""
    if not 0.0 < ctr < 1.0:
        return _NAN
    return -(ctr * math.log(ctr) + (1.0 - ctr) * math.log1p(-ctr))


def log_loss(p: float, y: int) -> float:
    """Log loss (nats) of probability ``p`` for label ``y`` (0/1), p clipped to [1e-15, 1-1e-15].

    >>> round(log_loss(0.8, 1), 6), round(log_loss(0.8, 0), 6)
    (0.223144, 1.609438)
    """
    if y:
        return -math.log(max(p, EPSILON))
    return -math.log1p(-min(p, 1.0 - EPSILON))


def auc(p: npt.NDArray[np.float64], y: npt.NDArray[np.integer]) -> float:
    """Exact ROC AUC (ties between a positive and a negative count 1/2); NaN if a class is missing.

    >>> auc(np.array([0.1, 0.4, 0.4, 0.8]), np.array([0, 0, 1, 1]))
    0.875
    """
    labels = np.asarray(y) != 0
    n_pos = int(np.count_nonzero(labels))
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return _NAN
    order = np.argsort(p, kind="stable")
    sorted_p = np.asarray(p)[order]
    sorted_pos = labels[order].astype(np.int64)
    # Groups of equal scores: a positive beats every negative of a lower group, ties half.
    starts = np.concatenate(([0], np.flatnonzero(sorted_p[1:] != sorted_p[:-1]) + 1))
    pos_in_group = np.add.reduceat(sorted_pos, starts)
    size_of_group = np.diff(np.append(starts, len(sorted_p)))
    neg_in_group = size_of_group - pos_in_group
    neg_below = np.cumsum(neg_in_group) - neg_in_group
    wins_doubled = int(np.sum(pos_in_group * (2 * neg_below + neg_in_group)))  # exact integers
    return wins_doubled / (2.0 * n_pos * n_neg)


class ProgressiveValidation:
    """Accumulates (served p, label) pairs; see the module docstring for the metrics."""

    __slots__ = (
        "_examples",
        "_logloss_sum",
        "_next_series_at",
        "_positives",
        "_prediction_sum",
        "_ring_count",
        "_ring_loss",
        "_ring_p",
        "_ring_pos",
        "_ring_y",
        "_series_every",
        "_window",
        "_window_positives",
        "series",
    )

    def __init__(self, window: int = 100_000, series_every: int = 0) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if series_every < 0:
            raise ValueError(f"series_every must be >= 0, got {series_every}")
        self._window = window
        self._series_every = series_every
        self._examples = 0
        self._positives = 0
        self._prediction_sum = 0.0
        self._logloss_sum = 0.0
        self._ring_p = np.zeros(window, dtype=np.float64)
        self._ring_y = np.zeros(window, dtype=np.int8)
        self._ring_loss = np.zeros(window, dtype=np.float64)
        self._ring_pos = 0  # next slot to write
        self._ring_count = 0
        self._window_positives = 0
        self._next_series_at = series_every if series_every else -1
        #: ``(examples seen, window log loss, window NE)`` every ``series_every`` examples.
        self.series: list[tuple[int, float, float]] = []

    # --- updates --------------------------------------------------------------------------

    def update(self, p: float, y: int) -> float:
        """Add one served probability and its label; return the example's log loss."""
        if y != 0 and y != 1:
            raise ValueError(f"label must be 0 or 1, got {y!r}")
        p, y = float(p), int(y)  # numpy scalars would leak into sums and checkpoints
        if not 0.0 <= p <= 1.0:  # also catches NaN
            raise ValueError(f"p must be a probability, got {p!r}")
        loss = log_loss(p, y)
        self._examples += 1
        self._positives += y
        self._prediction_sum += p
        self._logloss_sum += loss
        pos = self._ring_pos
        if self._ring_count == self._window:
            self._window_positives -= int(self._ring_y[pos])
        else:
            self._ring_count += 1
        self._window_positives += y
        self._ring_p[pos] = p
        self._ring_y[pos] = y
        self._ring_loss[pos] = loss
        self._ring_pos = pos + 1 if pos + 1 < self._window else 0
        if self._examples == self._next_series_at:
            self._record_series_point()
        return loss

    def update_many(self, p: npt.ArrayLike, y: npt.ArrayLike) -> float:
        """Add many examples in order; return the sum of their log losses.

        The resulting state is bitwise the same as repeated ``update`` calls, however the
        examples are split into batches: each loss uses the same scalar ``math`` functions
        (numpy's SIMD log differs in the last bit) and sums are accumulated one by one.
        """
        p_array = np.asarray(p, dtype=np.float64).reshape(-1)
        y_array = np.asarray(y).reshape(-1)
        if len(p_array) != len(y_array):
            raise ValueError(f"{len(p_array)} probabilities but {len(y_array)} labels")
        if not np.all((p_array >= 0.0) & (p_array <= 1.0)):
            raise ValueError("p must be probabilities in [0, 1] (no NaN)")
        if not np.all((y_array == 0) | (y_array == 1)):
            raise ValueError("labels must be 0 or 1")
        labels = y_array.astype(np.int8)
        p_list: list[float] = p_array.tolist()
        log, log1p, low, high = math.log, math.log1p, EPSILON, 1.0 - EPSILON
        losses = [
            -log(q if q > low else low) if label else -log1p(-(q if q < high else high))
            for q, label in zip(p_list, labels.tolist(), strict=True)
        ]
        total = 0.0
        for loss in losses:
            total += loss
        start = 0
        n = len(p_list)
        while start < n:
            # Stop at the next series point so it sees exactly the examples before it.
            end = n
            if self._next_series_at > 0:
                end = min(n, start + self._next_series_at - self._examples)
            self._add_chunk(p_list, labels, losses, start, end)
            start = end
            if self._examples == self._next_series_at:
                self._record_series_point()
        return total

    def _add_chunk(
        self,
        p: list[float],
        y: npt.NDArray[np.int8],
        losses: list[float],
        start: int,
        end: int,
    ) -> None:
        prediction_sum = self._prediction_sum
        logloss_sum = self._logloss_sum
        for i in range(start, end):  # one by one, so batching cannot change the rounding
            prediction_sum += p[i]
            logloss_sum += losses[i]
        self._prediction_sum = prediction_sum
        self._logloss_sum = logloss_sum
        n = end - start
        self._examples += n
        self._positives += int(np.count_nonzero(y[start:end]))
        window = self._window
        kept = min(n, window)  # of a chunk longer than the ring, only its tail stays
        slots = (self._ring_pos + np.arange(n - kept, n)) % window
        self._ring_p[slots] = p[end - kept : end]
        self._ring_y[slots] = y[end - kept : end]
        self._ring_loss[slots] = losses[end - kept : end]
        self._ring_pos = (self._ring_pos + n) % window
        self._ring_count = min(window, self._ring_count + n)
        # A recount is O(window) but vectorised: microseconds, and obviously right.
        self._window_positives = int(np.count_nonzero(self._window_view(self._ring_y)))

    def _record_series_point(self) -> None:
        self.series.append((self._examples, self.logloss_window, self.normalized_entropy_window))
        self._next_series_at += self._series_every

    # --- cumulative metrics -----------------------------------------------------------------

    @property
    def examples(self) -> int:
        return self._examples

    @property
    def positives(self) -> int:
        return self._positives

    @property
    def label_sum(self) -> int:
        return self._positives

    @property
    def prediction_sum(self) -> float:
        return self._prediction_sum

    @property
    def logloss_sum(self) -> float:
        return self._logloss_sum

    @property
    def logloss(self) -> float:
        return self._logloss_sum / self._examples if self._examples else _NAN

    @property
    def ctr(self) -> float:
        return self._positives / self._examples if self._examples else _NAN

    @property
    def normalized_entropy(self) -> float:
        return (
            self.logloss / binary_entropy(self.ctr)
            if 0 < self._positives < self._examples
            else _NAN
        )

    @property
    def calibration(self) -> float:
        return self._prediction_sum / self._positives if self._positives else _NAN

    # --- window metrics ---------------------------------------------------------------------

    @property
    def window(self) -> int:
        return self._window

    @property
    def series_every(self) -> int:
        return self._series_every

    @property
    def window_examples(self) -> int:
        return self._ring_count

    @property
    def window_positives(self) -> int:
        return self._window_positives

    def _window_view(self, ring: npt.NDArray[_Scalar]) -> npt.NDArray[_Scalar]:
        # Slot order is irrelevant to every window metric, so no unrolling is needed.
        return ring if self._ring_count == self._window else ring[: self._ring_count]

    @property
    def logloss_window(self) -> float:
        if not self._ring_count:
            return _NAN
        return float(np.sum(self._window_view(self._ring_loss))) / self._ring_count

    @property
    def normalized_entropy_window(self) -> float:
        n, positives = self._ring_count, self._window_positives
        if not 0 < positives < n:
            return _NAN
        return self.logloss_window / binary_entropy(positives / n)

    @property
    def calibration_window(self) -> float:
        if not self._window_positives:
            return _NAN
        return float(np.sum(self._window_view(self._ring_p))) / self._window_positives

    @property
    def auc_window(self) -> float:
        """Exact AUC over the window; one sort, O(window log window), call it sparingly."""
        return auc(self._window_view(self._ring_p), self._window_view(self._ring_y))

    def report(self) -> dict[str, int | float | None]:
        """Every metric, JSON-ready (NaN as ``None``); ``auc`` is over the window."""
        values: dict[str, int | float] = {
            "examples": self._examples,
            "positives": self._positives,
            "ctr": self.ctr,
            "logloss": self.logloss,
            "normalized_entropy": self.normalized_entropy,
            "calibration": self.calibration,
            "prediction_mean": self._prediction_sum / self._examples if self._examples else _NAN,
            "auc": self.auc_window,
            "window_examples": self._ring_count,
            "logloss_window": self.logloss_window,
            "normalized_entropy_window": self.normalized_entropy_window,
            "calibration_window": self.calibration_window,
        }
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}

    # --- checkpointing ----------------------------------------------------------------------

    def state(self) -> dict[str, StateValue]:
        """Everything needed to resume exactly: arrays and plain values only."""
        series = self.series
        return {
            "format": _STATE_FORMAT,
            "window": self._window,
            "series_every": self._series_every,
            "examples": self._examples,
            "positives": self._positives,
            "prediction_sum": self._prediction_sum,
            "logloss_sum": self._logloss_sum,
            "ring_p": self._ring_p.copy(),
            "ring_y": self._ring_y.copy(),
            "ring_loss": self._ring_loss.copy(),
            "ring_pos": self._ring_pos,
            "ring_count": self._ring_count,
            "series_examples": np.array([s[0] for s in series], dtype=np.int64),
            "series_logloss": np.array([s[1] for s in series], dtype=np.float64),
            "series_normalized_entropy": np.array([s[2] for s in series], dtype=np.float64),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> ProgressiveValidation:
        """Rebuild from ``state()``; raises ``CheckpointCorrupt`` if it is malformed."""
        if state.get("format") != _STATE_FORMAT:
            raise CheckpointCorrupt(f"evaluator state: unknown format {state.get('format')!r}")
        window = _int(state, "window")
        series_every = _int(state, "series_every")
        try:
            pv = cls(window, series_every)
        except ValueError as error:
            raise CheckpointCorrupt(f"evaluator state: {error}") from error
        pv._examples = _int(state, "examples")
        pv._positives = _int(state, "positives")
        pv._prediction_sum = _float(state, "prediction_sum")
        pv._logloss_sum = _float(state, "logloss_sum")
        pv._ring_p[:] = _array(state, "ring_p", window)
        pv._ring_y[:] = _array(state, "ring_y", window)
        pv._ring_loss[:] = _array(state, "ring_loss", window)
        pv._ring_pos = _int(state, "ring_pos")
        pv._ring_count = _int(state, "ring_count")
        if not (0 <= pv._ring_pos < window and 0 <= pv._ring_count <= min(window, pv._examples)):
            raise CheckpointCorrupt("evaluator state: ring position or count out of range")
        pv._window_positives = int(np.count_nonzero(pv._window_view(pv._ring_y)))
        if series_every:
            pv._next_series_at = (pv._examples // series_every + 1) * series_every
        examples = _array(state, "series_examples", None).tolist()
        logloss = _array(state, "series_logloss", len(examples)).tolist()
        ne = _array(state, "series_normalized_entropy", len(examples)).tolist()
        pv.series = list(zip(examples, logloss, ne, strict=True))
        return pv


def _int(state: Mapping[str, object], key: str) -> int:
    value = state.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointCorrupt(f"evaluator state: {key} must be an int, got {value!r}")
    return value


def _float(state: Mapping[str, object], key: str) -> float:
    value = state.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointCorrupt(f"evaluator state: {key} must be a number, got {value!r}")
    return float(value)


def _array(state: Mapping[str, object], key: str, length: int | None) -> npt.NDArray[np.generic]:
    value = state.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in "biuf":
        raise CheckpointCorrupt(f"evaluator state: {key} must be a 1-d numeric array")
    if length is not None and len(value) != length:
        raise CheckpointCorrupt(
            f"evaluator state: {key} has {len(value)} entries, expected {length}"
        )
    return value
