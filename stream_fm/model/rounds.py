"""Peers' increments added as they come, weighted like ``share`` within each round.

The asynchronous form of ``delta.combine(..., "share")``: workers publish their increments at
round boundaries (wall-clock aligned, so a round means the same interval everywhere), and each
worker adds every increment of a round as it arrives, its own included, without waiting for
the others. Within a round, a weight, a latent or the intercept ends at

    base + sum_i m_i (G0 + g_i) / (G0 + sum_i g_i)

over the increments that arrived so far: ``m_i`` a worker's move, ``g_i`` its part of the
squared-gradient sum, ``G0`` the sum before the round. A fresh parameter several workers moved
alike gets the weighted mean of their moves, a mature one (G0 large) their sum, one moved by a
single worker that worker's move, and a peer that never publishes holds nobody up. The sums
themselves add up and the maximum columns take the maximum. Every adjustment also moves the
tracker's base, so the next ``take`` holds this worker's own learning only (nothing echoes).
Optimizers without squared-gradient sums (sgd, ftrl's linear part) add increments up.

>>> import numpy as np
>>> from stream_fm.model import FastFM, FMParams, SparseExample
>>> from stream_fm.model.delta import DeltaTracker
>>> a, b = (Rounds(DeltaTracker(FastFM(FMParams(n_buckets=64, k=2, seed=1)))) for _ in "ab")
>>> x = SparseExample(np.array([3, 9], dtype=np.int32), np.ones(2))
>>> a.tracker.learn_one(x, 1); b.tracker.learn_one(x, 1)  # both move buckets 3 and 9 alike
>>> da, db = a.publish(round_id=0), b.publish(round_id=0)
>>> a.absorb(db, round_id=0); b.absorb(da, round_id=0)
>>> w = lambda r: r.tracker.engine.live_arrays()["lin"][3, 0]
>>> bool(np.isclose(w(a), w(b))), a.tracker.n_learned  # the mean move, both examples counted
(True, 2)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_fm.model import kernel
from stream_fm.model.delta import SCALED_OPTIMIZERS, Delta, DeltaTracker

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: Rounds remembered: an increment of an older round is weighed against a fresh record.
KEEP_ROUNDS: Final = 4


@dataclass
class _Share:
    """Per parameter of one round: G0, sum m_i (G0 + g_i), G0 + sum g_i, and the part of the
    model this round contributes now (``cur``)."""

    g0: F64
    a: F64
    s: F64
    cur: F64

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> _Share:
        return cls(*(np.zeros(shape) for _ in range(4)))

    def grow(self, merged: I64, old: I64, new: I64, g0_new: F64) -> _Share:
        """Rows of ``new`` buckets (sorted ``merged`` = ``old`` + ``new``) start at G0."""
        shape = (len(merged), *self.g0.shape[1:])
        out = _Share.empty(shape)
        at_old, at_new = np.searchsorted(merged, old), np.searchsorted(merged, new)
        for name in ("g0", "a", "s", "cur"):
            getattr(out, name)[at_old] = getattr(self, name)
        out.g0[at_new] = g0_new
        out.s[at_new] = g0_new
        return out

    def add(self, rows: I64 | slice, move: F64, g: F64, own: bool) -> F64:
        """One increment's move and sum at ``rows``; returns how far the model must move."""
        if own:  # the worker's own move is in its model already
            self.cur[rows] += move
        self.a[rows] += move * (self.g0[rows] + g)
        self.s[rows] += g
        before = self.cur[rows].copy()
        summed = before if own else before + move  # no gradient at all: moves add up
        after = np.divide(self.a[rows], self.s[rows], out=summed, where=self.s[rows] > 0)
        self.cur[rows] = after
        return np.asarray(after - before, dtype=np.float64)


@dataclass
class _Round:
    buckets: I64
    lin: _Share  # LIN_W of each bucket
    v: _Share  # each latent (its per-latent sum in v_acc)
    bias: _Share  # the intercept, one row


class Rounds:
    """A ``DeltaTracker`` whose peers' increments are added per round (module docstring)."""

    def __init__(self, tracker: DeltaTracker, keep: int = KEEP_ROUNDS) -> None:
        self.tracker = tracker
        self.keep = keep
        self.weighted = tracker.engine.params.optimizer in SCALED_OPTIMIZERS and tracker.has_acc
        self._rounds: dict[int, _Round] = {}

    def publish(self, round_id: int) -> Delta:
        """This worker's increments since its last publish, counted in round ``round_id``."""
        delta = self.tracker.take()
        if self.weighted and len(delta):
            before = self.tracker.base_rows(delta.buckets)
            g0 = (
                before["lin"][:, kernel.LIN_N],
                before["v_acc"],
                float(before["bias"][kernel.B_N0]),
            )
            self._merge(round_id, delta, g0, own=True)
        return delta

    def absorb(self, delta: Delta, round_id: int) -> None:
        """A peer's increments of round ``round_id``, added to the model (and its base)."""
        live, _ = self.tracker.model_and_base()
        rows = delta.buckets.astype(np.int64)
        if self.weighted:
            g0 = (
                live["lin"][rows, kernel.LIN_N],
                live["v_acc"][rows],
                float(live["bias"][kernel.B_N0]),
            )
            self._merge(round_id, delta, g0, own=False)
        else:
            self._move(rows, delta.lin[:, kernel.LIN_W], delta.v, float(delta.bias[kernel.B_W0]))
        self._add_sums(rows, delta)

    def _merge(self, round_id: int, delta: Delta, g0: tuple[F64, F64, float], own: bool) -> None:
        rnd = self._round(round_id, delta.buckets.astype(np.int64), g0)
        at = np.searchsorted(rnd.buckets, delta.buckets)
        d_lin = rnd.lin.add(at, delta.lin[:, kernel.LIN_W], delta.lin[:, kernel.LIN_N], own)
        d_v = rnd.v.add(at, delta.v, delta.v_acc, own)
        bias = delta.bias
        d_bias = rnd.bias.add(slice(0, 1), bias[[kernel.B_W0]], bias[[kernel.B_N0]], own)
        self._move(delta.buckets.astype(np.int64), d_lin, d_v, float(d_bias[0]))

    def _round(self, round_id: int, buckets: I64, g0: tuple[F64, F64, float]) -> _Round:
        rnd = self._rounds.get(round_id)
        if rnd is None:
            k = self.tracker.engine.params.k
            rnd = _Round(np.zeros(0, np.int64), _Share.empty((0,)), _Share.empty((0, k)),
                         _Share.empty((1,)))  # fmt: skip
            rnd.bias.g0[0] = rnd.bias.s[0] = g0[2]
            self._rounds[round_id] = rnd
            while len(self._rounds) > self.keep:
                del self._rounds[min(self._rounds)]
        fresh = ~np.isin(buckets, rnd.buckets, assume_unique=True)
        if fresh.any():
            new = buckets[fresh]
            merged = np.union1d(rnd.buckets, new)
            rnd.lin = rnd.lin.grow(merged, rnd.buckets, new, g0[0][fresh])
            rnd.v = rnd.v.grow(merged, rnd.buckets, new, g0[1][fresh])
            rnd.buckets = merged
        return rnd

    def _move(self, rows: I64, d_lin: F64, d_v: F64, d_bias: float) -> None:
        """The model and its base move alike: the next ``take`` is unchanged by it."""
        for arrays in self.tracker.model_and_base():
            arrays["lin"][rows, kernel.LIN_W] += d_lin
            arrays["v"][rows] += d_v
            arrays["bias"][kernel.B_W0] += d_bias

    def _add_sums(self, rows: I64, delta: Delta) -> None:
        """The peer's other state: sums add up, maximum columns take the maximum."""
        tracker = self.tracker
        width = delta.lin.shape[1]
        adds = np.array(
            [c for c in range(width) if c != kernel.LIN_W and c not in tracker.max_columns],
            dtype=np.int64,
        )
        bias_adds = [c for c in range(len(delta.bias)) if c != kernel.B_W0]
        for arrays in tracker.model_and_base():
            arrays["lin"][np.ix_(rows, adds)] += delta.lin[:, adds]
            for column in tracker.max_columns:
                arrays["lin"][rows, column] = np.maximum(
                    arrays["lin"][rows, column], delta.lin[:, column]
                )
            if tracker.has_acc:
                arrays["v_acc"][rows] += delta.v_acc
            arrays["bias"][bias_adds] += delta.bias[bias_adds]
            arrays["counters"][kernel.C_LEARNED] += delta.learned
