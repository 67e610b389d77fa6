"""Vowpal Wabbit for the benchmark: behind the engine protocol (served like stream-fm), and
its own file driver (``-p`` progressive predictions and its native speed)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_fm.errors import StreamFMError
from stream_fm.model.base import OP_SCORE, OpBatch, SparseExample, StateValue

VW_VARIANTS: dict[str, str] = {
    "vw-linear": "",
    "vw-q": "-q ff",
    "vw-lrq": "--lrq ff8",
}
VW_BASE = "--quiet --loss_function logistic --link logistic"


def _workspace(arguments: str) -> Any:
    try:
        from vowpalwabbit import Workspace
    except ImportError as error:
        raise StreamFMError(
            "the VW baseline needs vowpalwabbit: pip install 'stream-fm[bench]'"
        ) from error
    return Workspace(arguments)


def vw_driver(
    data: str, arguments: str, bits: int, work: str
) -> tuple[npt.NDArray[np.float64], float]:
    """VW's own driver over a data file: (its -p predictions, wall seconds)."""
    predictions = os.path.join(work, "predictions.txt")
    started = time.perf_counter()
    vw = _workspace(f"{VW_BASE} -b {bits} -d {data} -p {predictions} {arguments}")
    vw.run_parser()
    vw.finish()
    seconds = time.perf_counter() - started
    return np.atleast_1d(np.loadtxt(predictions, usecols=0)), seconds


class VowpalWabbit:
    """Vowpal Wabbit (pyvw) behind the engine protocol: served like stream-fm.

    All hashed features go in one namespace ``f``; ``-q ff`` then crosses every pair, the
    same interactions an FM models. A score directly followed by a learn of the same example
    (labeled rows) uses the prediction VW makes inside ``learn()``, its true progressive
    prediction: ``predict()`` is not free of side effects under ``--lrq``.
    """

    def __init__(self, arguments: str, bits: int) -> None:
        self.arguments = arguments
        self._vw = _workspace(f"{VW_BASE} -b {bits} {arguments}")
        self._learned = 0

    @property
    def n_learned(self) -> int:
        return self._learned

    @property
    def refused_updates(self) -> int:
        return 0

    @property
    def nonfinite_outputs(self) -> int:
        return 0

    @staticmethod
    def _line(indices: Sequence[int], values: Sequence[float]) -> str:
        return "|f " + " ".join(f"{i}:{v:.9g}" for i, v in zip(indices, values, strict=True))

    def _learn(self, line: str, label: int, weight: float) -> float:
        vw = self._vw
        example = vw.example(
            ("1 " if label else "-1 ") + (f"{weight:.9g} " if weight != 1.0 else "") + line
        )
        vw.learn(example)
        p = float(example.get_simplelabel_prediction())
        vw.finish_example(example)
        self._learned += 1
        return p

    def predict_proba_one(self, x: SparseExample) -> float:
        return float(self._vw.predict(self._line(x.indices.tolist(), x.values.tolist())))

    def learn_one(self, x: SparseExample, y: int) -> None:
        self._learn(self._line(x.indices.tolist(), x.values.tolist()), y, 1.0)

    def run_batch(self, batch: OpBatch) -> npt.NDArray[np.float64]:
        out = np.empty(len(batch), dtype=np.float64)
        indptr = batch.indptr.tolist()
        indices = batch.indices.tolist()
        values = batch.values.tolist()
        kinds, rows, labels = batch.op_kind.tolist(), batch.op_row.tolist(), batch.op_label.tolist()
        weights = batch.weights().tolist()
        n = len(kinds)
        j = 0
        while j < n:
            row = rows[j]
            line = self._line(
                indices[indptr[row] : indptr[row + 1]], values[indptr[row] : indptr[row + 1]]
            )
            if kinds[j] == OP_SCORE:
                if j + 1 < n and kinds[j + 1] != OP_SCORE and rows[j + 1] == row:
                    out[j] = out[j + 1] = self._learn(line, labels[j + 1], weights[j + 1])
                    j += 2
                    continue
                out[j] = float(self._vw.predict(line))
            else:
                out[j] = self._learn(line, labels[j], weights[j])
            j += 1
        return out

    def state(self, into: Mapping[str, StateValue] | None = None) -> dict[str, StateValue]:
        raise StreamFMError("the VW baseline has no checkpoint state")

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        raise StreamFMError("the VW baseline has no checkpoint state")
