"""The protocol every FM engine follows, and the batch of operations the fast path runs.

An engine learns from hashed sparse examples (``SparseExample``: bucket indices and their
values). One-example methods follow river (``predict_proba_one``, ``learn_one``); the batch
method runs a list of score/learn operations strictly in order in one call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

OP_SCORE = 0
OP_LEARN = 1
#: Learn with fake-negative weights (Ktena et al., RecSys 2019): the kernel weighs the step
#: by ``1 + p`` for a positive and ``(1 - p)(1 + p)`` for a negative, ``p`` the model's own
#: current prediction, so that learning every impression at once as a negative, and again as
#: a positive when its click comes, converges to the unbiased click probability.
OP_LEARN_FNW = 2
LEARN_KINDS = (OP_LEARN, OP_LEARN_FNW)

StateValue = npt.NDArray[np.generic] | int | float | str


class SparseExample(NamedTuple):
    """A hashed example: ``indices`` (int32 buckets) and ``values`` (float64 x_i)."""

    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class OpBatch:
    """Examples in CSR form plus the operations to run on them, in order.

    Operation ``j`` is ``op_kind[j]`` (``OP_SCORE``, ``OP_LEARN`` or ``OP_LEARN_FNW``) on
    example row ``op_row[j]`` (features ``indices[indptr[r]:indptr[r+1]]``) with label
    ``op_label[j]`` and importance weight ``op_weight[j]`` (both ignored for scores; no
    weights means 1 for every op).
    """

    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    op_kind: npt.NDArray[np.int8]
    op_row: npt.NDArray[np.int64]
    op_label: npt.NDArray[np.int8]
    op_weight: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.op_kind)

    def weights(self) -> npt.NDArray[np.float64]:
        """Every op's importance weight (ones when none were given)."""
        if self.op_weight is None:
            return np.ones(len(self.op_kind))
        return self.op_weight


@runtime_checkable
class Engine(Protocol):
    """What the joiner, the replay, the bench and the worker need from a model."""

    @property
    def n_learned(self) -> int:
        """Examples learned so far: the ``model_version`` served with predictions."""
        ...

    @property
    def refused_updates(self) -> int:
        """Learn steps the numeric guard refused (they would have made the model non-finite)."""
        ...

    @property
    def nonfinite_outputs(self) -> int:
        """Scores whose raw output was not a number (served as p = 0.5)."""
        ...

    def predict_proba_one(self, x: SparseExample) -> float:
        """P(click) for one example; never changes the model."""
        ...

    def learn_one(self, x: SparseExample, y: int) -> None:
        """One optimizer step on one example with label 0 or 1."""
        ...

    def run_batch(self, batch: OpBatch) -> npt.NDArray[np.float64]:
        """Run every operation in order; return, for each, p before it ran."""
        ...

    def state(self, into: Mapping[str, StateValue] | None = None) -> dict[str, StateValue]:
        """Everything needed to restore the engine: arrays and plain values only (copies).
        ``into``: an earlier ``state`` whose arrays may be written over (a checkpoint's pause
        is then a memory copy, not fresh pages); engines may ignore it."""
        ...

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        """Restore what ``state`` returned, bit for bit. Not ``strict``: step sizes and
        regularisation may differ from the saved ones (an operator retuning across a
        restart); the structure (buckets, k, optimizer) must match."""
        ...
