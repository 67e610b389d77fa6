"""Model increments: what an engine learned since it last gave them away, and how the
increments of several workers combine into one model.

The first piece of one model per consumer group (issue 20): each worker learns from its own
partitions and the workers exchange what they learned, so each holds the group's model.
``DeltaTracker`` wraps a ``FastFM`` (it is an Engine like any other: the pipeline runs it) and
notes the buckets each learn op touches. ``take()`` returns a ``Delta``: for the touched
buckets, the increments since the last ``take`` of every state value that adds up (weights,
latents, the optimizer's squared-gradient sums, FTRL's ``z``) and the value itself where the
optimizer combines by maximum (the adaptive optimizer's largest |x| per feature); plus the
intercept's state and the learned-example count.

``combine`` merges the deltas of one interval under a rule, and ``exchange`` moves every
worker to the same model: the base they shared plus the combined increments (synchronously,
like Vowpal Wabbit's allreduce). ``stream-fm bench sync`` measures the rules; none is within
1% of one worker on every stream yet (docs/benchmarks.md):

- ``sum`` adds every increment (Downpour SGD, Hogwild): right for a parameter one worker moved
  or one that moves a little per example, wrong for one that several workers moved to the
  same place (a young model's intercept, moved by N workers at once, moves N times too far).
- ``average`` takes the mean move of each weight, latent and the intercept over the workers
  that moved it, and adds the optimizer's sums (every gradient did happen).
- ``share`` weighs each worker's move by its share of the squared-gradient sum, counted from
  the shared base: (G0 + g_i) / (G0 + sum g). A fresh parameter several workers moved gets the
  gradient-weighted mean of their moves (it would have ended near each of them); a mature one
  (G0 large) gets their sum, one worker's move stays whole (adagrad and adaptive; the other
  optimizers have no sums to read and combine by ``sum``).
- ``scaled``: the same weights' square roots, AdaGrad's 1/sqrt(G) rate over N times the
  examples (a fresh parameter N workers moved alike moves sqrt(N) times one move).

>>> import numpy as np
>>> from stream_fm.model import FastFM, FMParams, SparseExample
>>> a, b = (DeltaTracker(FastFM(FMParams(n_buckets=64, k=2, seed=1))) for _ in range(2))
>>> a.learn_one(SparseExample(np.array([3, 9], dtype=np.int32), np.ones(2)), 1)
>>> b.learn_one(SparseExample(np.array([9, 40], dtype=np.int32), np.ones(2)), 0)
>>> exchange([a, b], "scaled")
>>> bool(np.array_equal(a.engine.state()["lin"], b.engine.state()["lin"]))
True
>>> a.take().buckets.tolist(), a.n_learned  # nothing learned since; both examples counted
([], 2)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stream_fm.model import kernel
from stream_fm.model.base import LEARN_KINDS, OP_SCORE, OpBatch, SparseExample, StateValue
from stream_fm.model.fast import FastFM

F64 = npt.NDArray[np.float64]
I32 = npt.NDArray[np.int32]
Arrays = dict[str, npt.NDArray[Any]]

RULES: Final = ("share", "scaled", "average", "sum")
#: Optimizers whose squared-gradient sums ``share`` and ``scaled`` read (the others combine by
#: ``sum``).
SCALED_OPTIMIZERS: Final = ("adagrad", "adaptive")
#: Per optimizer, the ``lin`` columns that combine by maximum (the others add up).
MAX_COLUMNS: Final = {
    "sgd": (),
    "adagrad": (),
    "ftrl": (),
    "adaptive": (kernel.LIN_S,),
    "adam": (),  # moments and step counts add up like the weights
}
#: The ``lin`` and ``bias`` columns a worker's move of which ``average`` takes the mean of.
MOVED_LIN: Final = (kernel.LIN_W,)
MOVED_BIAS: Final = (kernel.B_W0,)


@dataclass(frozen=True)
class Delta:
    """Increments of one engine over one interval, touched buckets only (see the module)."""

    buckets: I32
    lin: F64
    v: F64
    v_acc: F64  # no rows without per-latent sums (SGD)
    bias: F64
    learned: int

    def __len__(self) -> int:
        return int(self.buckets.shape[0])


class DeltaTracker:
    """An engine whose learning can be taken as increments (see the module docstring)."""

    def __init__(self, engine: FastFM) -> None:
        self.engine = engine
        self.max_columns: tuple[int, ...] = MAX_COLUMNS[engine.params.optimizer]
        self.has_acc = self._live()["v_acc"].shape[0] > 0
        self._rows: tuple[str, ...] = ("lin", "v", "v_acc") if self.has_acc else ("lin", "v")
        # Buckets learned since the last take: a flag per bucket, so memory stays bounded
        # however long the interval.
        self._touched = np.zeros(engine.params.n_buckets, dtype=bool)
        self._crosses = engine.params.interactions == "all"
        self._base = _copy(self._live())
        #: False while records the model learned already (through updates from the topic)
        #: are processed again: they are scored and joined, their learn steps skipped.
        self.learning = True
        # The last take: its buckets, their rows before it, and what it counted as learned.
        self._taken: tuple[I32, Arrays, int] | None = None

    # -- the Engine protocol: the wrapped engine's, with the touched buckets noted -----------
    @property
    def n_learned(self) -> int:
        return self.engine.n_learned

    @property
    def refused_updates(self) -> int:
        return self.engine.refused_updates

    @property
    def nonfinite_outputs(self) -> int:
        return self.engine.nonfinite_outputs

    def predict_proba_one(self, x: SparseExample) -> float:
        return self.engine.predict_proba_one(x)

    def learn_one(self, x: SparseExample, y: int) -> None:
        if not self.learning:
            return
        features = np.ascontiguousarray(x.indices, dtype=np.int32)
        self._touched[features] = True
        self._note_crosses(features)
        self.engine.learn_one(x, y)

    def run_batch(self, batch: OpBatch) -> F64:
        learn = np.isin(batch.op_kind, LEARN_KINDS)
        if not self.learning:  # each learn step becomes the score it starts with
            kinds = np.where(learn, OP_SCORE, batch.op_kind).astype(np.int8)
            return self.engine.run_batch(replace(batch, op_kind=kinds))
        rows = batch.op_row[learn]
        if rows.size:  # the index positions inside the learned rows' ranges, vectorised
            edges = np.zeros(len(batch.indices) + 1, dtype=np.int64)
            np.add.at(edges, batch.indptr[rows], 1)
            np.add.at(edges, batch.indptr[rows + 1], -1)
            inside = np.cumsum(edges[:-1]) > 0
            self._touched[batch.indices[inside]] = True
            if self._crosses:
                indices, indptr = batch.indices, batch.indptr
                for r in np.unique(rows).tolist():
                    self._note_crosses(indices[indptr[r] : indptr[r + 1]])
        return self.engine.run_batch(batch)

    def _note_crosses(self, features: I32) -> None:
        """Flag the buckets of the crosses a learn step on these features moves."""
        if self._crosses:
            pairs = np.ascontiguousarray(features, dtype=np.int32)
            self._touched[kernel.cross_buckets(pairs, self.engine.params.n_buckets)] = True

    def state(self, into: Mapping[str, StateValue] | None = None) -> dict[str, StateValue]:
        return self.engine.state(into)

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        """A restored model is the new base."""
        self.engine.load_state(state, strict=strict)
        self._touched[:] = False
        self._taken = None
        self._base = _copy(self._live())

    def _live(self) -> Arrays:
        """The engine's own arrays (written in place)."""
        return dict(self.engine.live_arrays())

    # -- increments ------------------------------------------------------------------------
    def take(self) -> Delta:
        """What was learned since the last ``take`` (or the start, or a restore)."""
        live, base = self._live(), self._base
        buckets = np.flatnonzero(self._touched).astype(np.int32)
        self._touched[buckets] = False
        before = {name: base[name][buckets] for name in self._rows}
        before["bias"] = base["bias"].copy()
        learned = int(live["counters"][kernel.C_LEARNED] - base["counters"][kernel.C_LEARNED])
        lin = live["lin"][buckets] - before["lin"]
        for column in self.max_columns:  # the value itself: it combines by maximum
            lin[:, column] = live["lin"][buckets, column]
        delta = Delta(
            buckets,
            lin,
            live["v"][buckets] - before["v"],
            live["v_acc"][buckets] - before["v_acc"] if self.has_acc else live["v_acc"].copy(),
            live["bias"] - before["bias"],
            learned,
        )
        for name in self._rows:
            base[name][buckets] = live[name][buckets]
        base["bias"][:] = live["bias"]
        base["counters"][:] = live["counters"]
        self._taken = (buckets, before, learned)
        return delta

    def keep_back(self, taken: Delta, sent: Delta) -> None:
        """Only ``sent`` of the last ``take`` went out: the rest (``taken - sent``, rounding)
        stays between the model and its base, so the bucket's next ``take`` includes it.
        Maximum columns are values, not increments: nothing to keep."""
        base, rows = self._base, taken.buckets.astype(np.int64)
        width = taken.lin.shape[1]
        adds = np.array([c for c in range(width) if c not in self.max_columns], dtype=np.int64)
        base["lin"][np.ix_(rows, adds)] -= (taken.lin - sent.lin)[:, adds]
        base["v"][rows] -= taken.v - sent.v
        if self.has_acc:
            base["v_acc"][rows] -= taken.v_acc - sent.v_acc

    def hold_back(self, taken: Delta, rows: npt.NDArray[np.bool_]) -> Delta:
        """Keep ``rows`` of the last ``take`` for a later one (none of them went out): they
        stay between the model and its base and are taken again next time. Returns the
        rest."""
        held = self._select(taken, rows)
        nothing = replace(held, lin=np.zeros_like(held.lin), v=np.zeros_like(held.v),
                          v_acc=np.zeros_like(held.v_acc))  # fmt: skip
        self.keep_back(held, nothing)
        self._touched[held.buckets] = True
        return self._select(taken, ~rows)

    def _select(self, delta: Delta, rows: npt.NDArray[np.bool_]) -> Delta:
        """The delta of ``rows`` only (the intercept and the count stay whole)."""
        return replace(delta, buckets=delta.buckets[rows], lin=delta.lin[rows], v=delta.v[rows],
                       v_acc=delta.v_acc[rows] if self.has_acc else delta.v_acc)  # fmt: skip

    def base_rows(self, buckets: I32) -> Arrays:
        """The rows of ``buckets`` as they were before the last ``take`` (its shared base)."""
        base = self._base
        rows = {name: base[name][buckets] for name in self._rows}
        rows["bias"] = base["bias"].copy()
        if self._taken is not None:
            own, before, _ = self._taken
            at = np.minimum(np.searchsorted(own, buckets), max(len(own) - 1, 0))
            mine = own[at] == buckets if len(own) else np.zeros(len(buckets), dtype=bool)
            for name in self._rows:
                rows[name][mine] = before[name][at[mine]]
            rows["bias"] = before["bias"]
        return rows

    def rebase(self, combined: Delta) -> None:
        """Become the base the last ``take`` started from plus ``combined`` (which includes
        this worker's own delta). Workers that shared the base then hold the same model, bit
        for bit."""
        live, base = self._live(), self._base
        rows = combined.buckets.astype(np.int64)
        prev = {name: live[name][rows] for name in self._rows}
        prev["bias"] = live["bias"].copy()
        own_learned = 0
        if self._taken is not None:  # this worker's own rows: back to where they started
            own, before, own_learned = self._taken
            where = np.searchsorted(combined.buckets, own)
            for name in self._rows:
                prev[name][where] = before[name]
            prev["bias"] = before["bias"]
        lin = prev["lin"] + combined.lin
        for column in self.max_columns:
            lin[:, column] = np.maximum(prev["lin"][:, column], combined.lin[:, column])
        live["lin"][rows] = lin
        live["v"][rows] = prev["v"] + combined.v
        if self.has_acc:
            live["v_acc"][rows] = prev["v_acc"] + combined.v_acc
        live["bias"][:] = prev["bias"] + combined.bias
        live["counters"][kernel.C_LEARNED] += combined.learned - own_learned
        for name in self._rows:
            base[name][rows] = live[name][rows]
        base["bias"][:] = live["bias"]
        base["counters"][:] = live["counters"]
        self._taken = None

    def model_and_base(self) -> tuple[Arrays, Arrays]:
        """The engine's arrays and the base ``take`` measures from (``rounds`` moves both)."""
        return self._live(), self._base


def combine(
    deltas: Sequence[Delta],
    rule: str,
    max_columns: Sequence[int] = (),
    has_acc: bool = True,
    base: Callable[[I32], Arrays] | None = None,
) -> Delta:
    """One delta from the deltas of one interval under ``rule`` (see the module docstring);
    ``scaled`` reads the shared base's squared-gradient sums through ``base``."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    buckets = np.unique(np.concatenate([d.buckets for d in deltas])).astype(np.int32)
    if rule in ("share", "scaled"):
        if base is None:
            raise ValueError(f"rule {rule!r} needs the base's squared-gradient sums")
        power = 1.0 if rule == "share" else 0.5
        return _weighted(deltas, buckets, base(buckets), max_columns, has_acc, power)
    n, width, k = len(buckets), deltas[0].lin.shape[1], deltas[0].v.shape[1]
    lin, v = np.zeros((n, width)), np.zeros((n, k))
    v_acc = np.zeros((n if has_acc else 0, deltas[0].v_acc.shape[1]))
    movers = np.zeros(n)
    adds = np.array([c for c in range(width) if c not in max_columns], dtype=np.int64)
    for delta in deltas:
        where = np.searchsorted(buckets, delta.buckets)
        movers[where] += 1
        lin[np.ix_(where, adds)] += delta.lin[:, adds]
        for column in max_columns:
            lin[where, column] = np.maximum(lin[where, column], delta.lin[:, column])
        v[where] += delta.v
        if has_acc:
            v_acc[where] += delta.v_acc
    bias = np.sum([d.bias for d in deltas], axis=0)
    if rule == "average":
        share = np.maximum(movers, 1)
        for column in MOVED_LIN:
            lin[:, column] /= share
        v /= share[:, None]
        for column in MOVED_BIAS:
            bias[column] /= max(sum(1 for d in deltas if d.learned), 1)
    return Delta(buckets, lin, v, v_acc, bias, sum(d.learned for d in deltas))


def _weighted(
    deltas: Sequence[Delta],
    buckets: I32,
    base: Arrays,
    max_columns: Sequence[int],
    has_acc: bool,
    power: float,
) -> Delta:
    """Each worker's move of a weight, latent or the intercept, weighted by
    ((G0 + g_i) / (G0 + sum g)) ** power: G0 the shared squared-gradient sum, g_i this
    worker's part of the interval's; the sums themselves add up (``share``: power 1,
    ``scaled``: 1/2)."""
    n, width, k = len(buckets), deltas[0].lin.shape[1], deltas[0].v.shape[1]
    g_lin = np.zeros(n)
    g_acc = np.zeros((n if has_acc else 0, k))
    g_bias = sum(d.bias[kernel.B_N0] for d in deltas)
    for delta in deltas:
        where = np.searchsorted(buckets, delta.buckets)
        g_lin[where] += delta.lin[:, kernel.LIN_N]
        if has_acc:
            g_acc[where] += delta.v_acc
    lin, v = np.zeros((n, width)), np.zeros((n, k))
    v_acc = np.zeros((n if has_acc else 0, k))
    bias = np.zeros_like(deltas[0].bias)
    adds = np.array([c for c in range(width) if c not in max_columns], dtype=np.int64)
    n0 = float(base["bias"][kernel.B_N0])
    for delta in deltas:
        where = np.searchsorted(buckets, delta.buckets)
        base_n = base["lin"][where, kernel.LIN_N]
        own = _ratio(base_n + delta.lin[:, kernel.LIN_N], base_n + g_lin[where], power)
        moved = delta.lin.copy()
        moved[:, kernel.LIN_W] *= own
        lin[np.ix_(where, adds)] += moved[:, adds]
        for column in max_columns:
            lin[where, column] = np.maximum(lin[where, column], delta.lin[:, column])
        if has_acc:
            base_acc = base["v_acc"][where]
            v[where] += delta.v * _ratio(base_acc + delta.v_acc, base_acc + g_acc[where], power)
            v_acc[where] += delta.v_acc
        else:
            v[where] += delta.v
        step = delta.bias.copy()
        step[kernel.B_W0] *= float(
            _ratio(np.array(n0 + delta.bias[kernel.B_N0]), np.array(n0 + g_bias), power)
        )
        bias += step
    return Delta(buckets, lin, v, v_acc, bias, sum(d.learned for d in deltas))


def _ratio(own: F64, total: F64, power: float) -> F64:
    """(own / total) ** power, 1 where nothing was learned."""
    share = np.divide(own, total, out=np.ones_like(total), where=total > 0)
    return share if power == 1.0 else np.power(share, power)


def exchange(trackers: Sequence[DeltaTracker], rule: str) -> None:
    """Every worker takes its delta; each becomes the shared base plus the combined deltas."""
    deltas = [tracker.take() for tracker in trackers]
    if len(trackers) == 1:
        return  # no peer: the model stays bit for bit what it learned alone
    first = trackers[0]
    if rule in ("share", "scaled") and first.engine.params.optimizer not in SCALED_OPTIMIZERS:
        rule = "sum"  # no squared-gradient sums to scale by
    combined = combine(deltas, rule, first.max_columns, first.has_acc, first.base_rows)
    for tracker in trackers:
        tracker.rebase(combined)


def _copy(arrays: Mapping[str, npt.NDArray[Any]]) -> Arrays:
    return {name: array.copy() for name, array in arrays.items()}
