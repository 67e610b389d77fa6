"""Peers' increments added as they come, weighted like ``share`` within each round.

The asynchronous form of ``delta.combine(..., "share")``: workers publish their increments at
round boundaries (wall-clock aligned, so a round means the same interval everywhere), and each
worker adds every increment of a round as it arrives, its own included, without waiting for
the others. Within a round, a weight, a latent or the intercept ends at

    base + sum_i m_i (G0 + g_i) / (G0 + sum_i g_i)

over the increments that arrived so far: ``m_i`` a worker's move, ``g_i`` its part of the
squared-gradient sum, ``G0`` the sum before the round (the mean of what each worker had: it
travels with the increments, so every worker computes the same round). A fresh parameter several workers moved
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
>>> (da, ga), (db, gb) = a.publish(round_id=0), b.publish(round_id=0)
>>> a.absorb(db, gb, round_id=0); b.absorb(da, ga, round_id=0)
>>> w = lambda r: r.tracker.engine.live_arrays()["lin"][3, 0]
>>> bool(np.isclose(w(a), w(b))), a.tracker.n_learned  # the mean move, both examples counted
(True, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_fm.model import kernel
from stream_fm.model.delta import SCALED_OPTIMIZERS, Delta, DeltaTracker

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: How increments travel: the (delta, bases) a peer will read for the exact ones.
Rounder = Callable[[Delta, "Bases"], tuple[Delta, "Bases"]]
#: Rounds remembered: an increment of an older round is weighed against a fresh record.
KEEP_ROUNDS: Final = 4


@dataclass(frozen=True)
class Hold:
    """Which increments wait: a bucket's whose weight and latents moved less than
    ``threshold`` since they last went out, for at most ``rounds`` rounds (the
    significance filter of parameter servers, Li et al. 2014, and of Gaia, Hsieh et al.
    2017)."""

    threshold: float
    rounds: int  # at most 65,535

    def __post_init__(self) -> None:
        if not (self.threshold >= 0 and 1 <= self.rounds <= 0xFFFF):
            raise ValueError(f"a hold of {self.threshold} for {self.rounds} rounds")


@dataclass(frozen=True)
class Bases:
    """A worker's squared-gradient sums before its increments (its G0): per touched bucket
    the linear sum and the latents' mean sum, and the intercept's. They travel with the
    increments so every worker weighs a round alike."""

    lin: F64
    acc: F64
    bias: float


@dataclass
class _Share:
    """Per parameter of one round, over the increments that arrived: sum of moves, of move
    times sum, of sums, of G0s, their count, and what the round contributes to the model now."""

    m: F64
    mg: F64
    g: F64
    g0: F64
    n: F64
    cur: F64

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> _Share:
        return cls(*(np.zeros(shape) for _ in range(6)))

    def grow(self, merged: I64, old: I64) -> _Share:
        """Room for the buckets of sorted ``merged`` not in ``old`` (zeros)."""
        out = _Share.empty((len(merged), *self.m.shape[1:]))
        at = np.searchsorted(merged, old)
        for name in ("m", "mg", "g", "g0", "n", "cur"):
            getattr(out, name)[at] = getattr(self, name)
        return out

    def add(self, rows: I64 | slice, move: F64, g: F64, g0: F64, own: bool) -> F64:
        """One increment at ``rows``; returns how far the model must move. The round ends
        at ``(G0 sum m_i + sum m_i g_i) / (G0 + sum g_i)``, G0 the mean of the workers' G0s:
        the same on every worker once the same increments arrived."""
        if own:  # the worker's own move is in its model already
            self.cur[rows] += move
        self.m[rows] += move
        self.mg[rows] += move * g
        self.g[rows] += g
        self.g0[rows] += g0
        self.n[rows] += 1
        g0_mean = self.g0[rows] / self.n[rows]
        total = g0_mean + self.g[rows]
        weighted = g0_mean * self.m[rows] + self.mg[rows]
        before = self.cur[rows].copy()
        # No gradient at all (a sum of zero): the moves add up; one move stands as it is
        # (bit for bit: a worker without peers is the engine alone).
        after = np.divide(weighted, total, out=self.m[rows].copy(), where=total > 0)
        after = np.where(self.n[rows] == 1, self.m[rows], after)
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

    def __init__(
        self,
        tracker: DeltaTracker,
        keep: int = KEEP_ROUNDS,
        rounder: Rounder | None = None,
        hold: Hold | None = None,
    ) -> None:
        self.tracker = tracker
        self.keep = keep
        #: What the wire makes of the increments (``sync.wire.rounded``); None: exact.
        self.rounder = rounder
        self.hold = hold
        # Rounds each bucket's increments have waited (``hold``).
        self._age = np.zeros(tracker.engine.params.n_buckets if hold else 0, np.uint16)
        self.waiting = 0  # buckets held back at the last publish
        self.weighted = tracker.engine.params.optimizer in SCALED_OPTIMIZERS and tracker.has_acc
        self._rounds: dict[int, _Round] = {}

    def forget(self) -> None:
        """The model went back to a checkpoint: what the rounds contributed is gone with it."""
        self._rounds = {}

    def publish(self, round_id: int, flush: bool = False) -> tuple[Delta, Bases]:
        """This worker's increments since its last publish, counted in round ``round_id``,
        and its G0s, as the wire carries them (``rounder``). What the rounding leaves out
        stays in the tracker and goes with the bucket's next increment (error feedback), and
        so do the rows ``hold`` keeps back (all go with ``flush``)."""
        taken = self.tracker.take()
        if self.hold is not None and len(taken):
            taken = self._hold_back(taken, flush)
        if self.weighted:
            before = self.tracker.base_rows(taken.buckets)
            bases = Bases(
                before["lin"][:, kernel.LIN_N].astype(np.float64),
                before["v_acc"].mean(axis=1),
                float(before["bias"][kernel.B_N0]),
            )
        else:  # the moves add up: no sums to weigh them by
            bases = Bases(np.zeros(len(taken)), np.zeros(len(taken)), 0.0)
        delta = taken
        if self.rounder is not None and len(taken):
            delta, bases = self.rounder(taken, bases)
            self.tracker.keep_back(taken, delta)
        if self.weighted and len(delta):
            self._merge(round_id, delta, bases, own=True)
        return delta, bases

    def _hold_back(self, taken: Delta, flush: bool) -> Delta:
        """Rows whose weight and latents moved less than ``hold.threshold`` (in logit units:
        times the feature's largest |x| where the optimizer keeps it) wait, at most
        ``hold.rounds`` rounds: the many small moves a frequent feature gets go out summed,
        every so often; what moves a prediction goes at once."""
        assert self.hold is not None
        rows = taken.buckets.astype(np.int64)
        age = self._age[rows]
        if flush:
            wait = np.zeros(len(rows), dtype=bool)
        else:
            move = np.maximum(np.abs(taken.lin[:, kernel.LIN_W]), np.abs(taken.v).max(axis=1))
            if kernel.LIN_S in self.tracker.max_columns:  # adaptive: w x is the logit's part
                move *= np.maximum(np.abs(taken.lin[:, kernel.LIN_S]), 1.0)
            wait = (move < self.hold.threshold) & (age < self.hold.rounds)
        self._age[rows] = np.where(wait, age + 1, 0)
        self.waiting = int(np.count_nonzero(wait))
        return self.tracker.hold_back(taken, wait) if wait.any() else taken

    def absorb(self, delta: Delta, bases: Bases, round_id: int) -> None:
        """A peer's increments of round ``round_id``, added to the model (and its base)."""
        rows = delta.buckets.astype(np.int64)
        if self.weighted:
            self._merge(round_id, delta, bases, own=False)
        else:
            self._move(rows, delta.lin[:, kernel.LIN_W], delta.v, float(delta.bias[kernel.B_W0]))
        self._add_sums(rows, delta)

    def _merge(self, round_id: int, delta: Delta, bases: Bases, own: bool) -> None:
        rnd = self._round(round_id, delta.buckets.astype(np.int64))
        at = np.searchsorted(rnd.buckets, delta.buckets)
        lin, bias = delta.lin, delta.bias
        d_lin = rnd.lin.add(at, lin[:, kernel.LIN_W], lin[:, kernel.LIN_N], bases.lin, own)
        d_v = rnd.v.add(at, delta.v, delta.v_acc, bases.acc[:, None], own)
        d_bias = rnd.bias.add(
            slice(0, 1), bias[[kernel.B_W0]], bias[[kernel.B_N0]], np.array([bases.bias]), own
        )
        self._move(delta.buckets.astype(np.int64), d_lin, d_v, float(d_bias[0]))

    def _round(self, round_id: int, buckets: I64) -> _Round:
        rnd = self._rounds.get(round_id)
        if rnd is None:
            k = self.tracker.engine.params.k
            rnd = _Round(np.zeros(0, np.int64), _Share.empty((0,)), _Share.empty((0, k)),
                         _Share.empty((1,)))  # fmt: skip
            self._rounds[round_id] = rnd
            while len(self._rounds) > self.keep:
                del self._rounds[min(self._rounds)]
        fresh = ~np.isin(buckets, rnd.buckets, assume_unique=True)
        if fresh.any():
            merged = np.union1d(rnd.buckets, buckets[fresh])
            rnd.lin = rnd.lin.grow(merged, rnd.buckets)
            rnd.v = rnd.v.grow(merged, rnd.buckets)
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
