"""Vowpal Wabbit behind the engine protocol, for the benchmark only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from stream_fm.errors import StreamFMError
from stream_fm.model.base import OP_LEARN, OpBatch, SparseExample, StateValue

VW_VARIANTS: dict[str, str] = {
    "vw-linear": "",
    "vw-q": "-q ff",
    "vw-lrq": "--lrq ff8",
}


class VowpalWabbit:
    """Vowpal Wabbit (pyvw) behind the engine protocol, for the benchmark only.

    All hashed features go in one namespace ``f``; ``-q ff`` then crosses every pair, the
    same interactions an FM models.
    """

    def __init__(self, arguments: str, bits: int) -> None:
        try:
            from vowpalwabbit import Workspace
        except ImportError as error:
            raise StreamFMError(
                "the VW baseline needs vowpalwabbit: pip install 'stream-fm[bench]'"
            ) from error
        self.arguments = arguments
        self._vw = Workspace(
            f"--quiet --loss_function logistic --link logistic -b {bits} {arguments}"
        )
        self._learned = 0

    @property
    def n_learned(self) -> int:
        return self._learned

    @staticmethod
    def _line(indices: Sequence[int], values: Sequence[float]) -> str:
        return "|f " + " ".join(f"{i}:{v:.9g}" for i, v in zip(indices, values, strict=True))

    def predict_proba_one(self, x: SparseExample) -> float:
        return float(self._vw.predict(self._line(x.indices.tolist(), x.values.tolist())))

    def learn_one(self, x: SparseExample, y: int) -> None:
        self._vw.learn(("1 " if y else "-1 ") + self._line(x.indices.tolist(), x.values.tolist()))
        self._learned += 1

    def run_batch(self, batch: OpBatch) -> npt.NDArray[np.float64]:
        out = np.empty(len(batch), dtype=np.float64)
        indptr = batch.indptr.tolist()
        indices = batch.indices.tolist()
        values = batch.values.tolist()
        for op, (kind, row, label) in enumerate(
            zip(batch.op_kind.tolist(), batch.op_row.tolist(), batch.op_label.tolist(), strict=True)
        ):
            line = self._line(
                indices[indptr[row] : indptr[row + 1]], values[indptr[row] : indptr[row + 1]]
            )
            out[op] = float(self._vw.predict(line))
            if kind == OP_LEARN:
                self._vw.learn(("1 " if label else "-1 ") + line)
                self._learned += 1
        return out

    @property
    def refused_updates(self) -> int:
        return 0

    @property
    def nonfinite_outputs(self) -> int:
        return 0

    def state(self) -> dict[str, StateValue]:
        raise StreamFMError("the VW baseline has no checkpoint state")

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        raise StreamFMError("the VW baseline has no checkpoint state")
