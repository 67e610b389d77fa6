"""``FastFM``: the production engine, a thin Python shell around the numba kernels."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_fm.model import kernel
from stream_fm.model.base import OP_LEARN, OP_SCORE, OpBatch, SparseExample, StateValue
from stream_fm.model.params import FMParams, ModelStateMismatch, prior_logit

ENGINE_NAME: Final = "FastFM"
STATE_FORMAT: Final = 1

F64 = npt.NDArray[np.float64]
IndexLike = npt.ArrayLike


def _hyper(params: FMParams) -> F64:
    hp = np.zeros(kernel.N_HP)
    hp[kernel.HP_LR_W] = params.learning_rate
    hp[kernel.HP_LR_X] = params.cross_learning_rate
    hp[kernel.HP_LR_V] = params.latent_learning_rate
    hp[kernel.HP_LR_0] = params.intercept_learning_rate
    hp[kernel.HP_L1_W] = params.l1_w
    hp[kernel.HP_L2_W] = params.l2_w
    hp[kernel.HP_L2_V] = params.l2_v
    hp[kernel.HP_ALPHA] = params.ftrl_alpha
    hp[kernel.HP_BETA] = params.ftrl_beta
    hp[kernel.HP_EPS] = params.adagrad_eps
    hp[kernel.HP_CLIP] = params.clip_gradient
    return hp


def _array_shapes(params: FMParams) -> dict[str, tuple[tuple[int, ...], type[np.generic]]]:
    """Shape and dtype of every state array for these params (layout: see ``kernel``)."""
    b, k, opt = params.n_buckets, params.k, params.optimizer
    return {
        "bias": ((kernel.N_BIAS,), np.float64),
        "lin": ((b, kernel.LIN_WIDTH[opt]), np.float64),
        "v": ((b, k), np.float64),
        # Per-latent optimizer state: AdaGrad's sums, or Adam's two moments side by side.
        "v_acc": ((b if opt != "sgd" else 0, 2 * k if opt == "adam" else k), np.float64),
        "counters": ((kernel.N_COUNTERS,), np.int64),
    }


def _aligned_zeros(shape: tuple[int, ...]) -> F64:
    """Zeros whose data start on a 64-byte boundary, so a row of 8 doubles is one cache line.

    (numpy's large allocations start 16 bytes past a page boundary.)
    """
    size = int(np.prod(shape))
    buf = np.zeros(size + 8)
    start = (-buf.ctypes.data % 64) // 8
    return buf[start : start + size].reshape(shape)


class FastFM:
    """Factorization Machine engine backed by compiled numba kernels.

    >>> import numpy as np
    >>> from stream_fm.model import FastFM, FMParams, SparseExample
    >>> fm = FastFM(FMParams(n_buckets=1024, k=4, seed=1))
    >>> x = SparseExample(np.array([3, 17, 512], dtype=np.int32), np.array([1.0, 1.0, 0.5]))
    >>> p0 = fm.predict_proba_one(x)
    >>> 0.0 < p0 < 1.0
    True
    >>> fm.learn_one(x, 1)
    >>> fm.predict_proba_one(x) > p0
    True
    >>> fm.n_learned
    1
    """

    def __init__(self, params: FMParams | None = None) -> None:
        self._params = FMParams() if params is None else params
        p = self._params
        self._opt = kernel.OPTIMIZER_CODES[p.optimizer]
        self._hp = _hyper(p)
        self._crosses = p.interactions == "all"
        shapes = _array_shapes(p)
        self._bias = np.zeros(kernel.N_BIAS)
        self._lin = _aligned_zeros(shapes["lin"][0])
        self._v = _aligned_zeros(shapes["v"][0])
        np.random.default_rng(p.seed).standard_normal(out=self._v)
        self._v *= p.init_std
        self._v_acc = _aligned_zeros(shapes["v_acc"][0])
        # np.zeros maps zero pages lazily, so memory would creep up for weeks as new buckets
        # get touched. Written once now, the model is at its bound from the start: a memory
        # limit that is too small fails at start-up, and resident memory stays flat.
        self._lin.fill(0.0)
        self._v_acc.fill(0.0)
        self._counters = np.zeros(kernel.N_COUNTERS, dtype=np.int64)
        self.set_intercept(prior_logit(p))
        # Reused one-op batch for the one-example methods.
        self._indptr1 = np.zeros(2, dtype=np.int64)
        self._row1 = np.zeros(1, dtype=np.int64)
        self._score1 = np.full(1, OP_SCORE, dtype=np.int8)
        self._learn1 = np.full(1, OP_LEARN, dtype=np.int8)
        self._label1 = np.zeros(1, dtype=np.int8)
        self._weight1 = np.ones(1)

    # -- Engine protocol -------------------------------------------------------------------

    @property
    def params(self) -> FMParams:
        return self._params

    @property
    def n_learned(self) -> int:
        """Learn ops run so far (refused ones included: the example was consumed)."""
        return int(self._counters[kernel.C_LEARNED])

    @property
    def refused_updates(self) -> int:
        """Learn steps refused by the NaN/inf guard (the model was left unchanged)."""
        return int(self._counters[kernel.C_REFUSED])

    @property
    def nonfinite_outputs(self) -> int:
        """Scores whose raw output was NaN (served as p = 0.5)."""
        return int(self._counters[kernel.C_NONFINITE])

    def predict_proba_one(self, x: SparseExample) -> float:
        return float(self._run_one(x, self._score1, 0)[0])

    def learn_one(self, x: SparseExample, y: int) -> None:
        if y not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {y!r}")
        self._run_one(x, self._learn1, int(y))

    def run_batch(self, batch: OpBatch) -> npt.NDArray[np.float64]:
        indptr = np.ascontiguousarray(batch.indptr, dtype=np.int64)
        indices = np.ascontiguousarray(batch.indices, dtype=np.int32)
        values = np.ascontiguousarray(batch.values, dtype=np.float64)
        op_kind = np.ascontiguousarray(batch.op_kind, dtype=np.int8)
        op_row = np.ascontiguousarray(batch.op_row, dtype=np.int64)
        op_label = np.ascontiguousarray(batch.op_label, dtype=np.int8)
        op_weight = np.ascontiguousarray(batch.weights(), dtype=np.float64)
        return self._run(indptr, indices, values, op_kind, op_row, op_label, op_weight)

    def state(self, into: Mapping[str, StateValue] | None = None) -> dict[str, StateValue]:
        """Copies of every array plus the params; no pickle needed to store it. The arrays
        of ``into`` that fit (shape, dtype, writable) are written over instead of allocated:
        fresh pages cost this machine 15x a copy into touched ones."""
        out: dict[str, StateValue] = {"engine": ENGINE_NAME, "format": STATE_FORMAT}
        out.update(self._params.to_state())
        for name, array in self._arrays().items():
            buffer = into.get(name) if into is not None else None
            if (
                isinstance(buffer, np.ndarray)
                and buffer.shape == array.shape
                and buffer.dtype == array.dtype
                and buffer.flags.writeable
                and buffer.flags.c_contiguous
            ):
                np.copyto(buffer, array)
                out[name] = buffer
            else:
                out[name] = array.copy()
        return out

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        """Restore ``state()`` bit for bit.

        With ``strict`` every param must match; otherwise only the structural ones
        (``n_buckets``, ``k``, ``optimizer``) must, and this engine keeps its own step sizes
        and regularisation (an operator retuning across a restart).
        Raises ``ModelStateMismatch`` (a ``CheckpointError``) and leaves the engine unchanged
        if the state does not fit.
        """
        if state.get("engine") != ENGINE_NAME:
            raise ModelStateMismatch(
                f"model state is for engine {state.get('engine')!r}, not {ENGINE_NAME!r}"
            )
        if state.get("format") != STATE_FORMAT:
            raise ModelStateMismatch(
                f"model state format {state.get('format')!r} is not {STATE_FORMAT}"
            )
        self._params.check_restorable(FMParams.from_state(state), strict=strict)
        loaded: dict[str, npt.NDArray[np.generic]] = {}
        bias = state.get("bias")
        if isinstance(bias, np.ndarray) and bias.shape == (3,):
            # Written before the adaptive optimizer's two sums joined the intercept's state.
            state = {**state, "bias": np.concatenate([bias, np.zeros(kernel.N_BIAS - 3)])}
        for name, (shape, dtype) in _array_shapes(self._params).items():
            value = state.get(name)
            if not isinstance(value, np.ndarray):
                raise ModelStateMismatch(f"model state has no array {name!r}")
            if value.shape != shape or value.dtype != dtype:
                raise ModelStateMismatch(
                    f"model state array {name!r} is {value.dtype}{list(value.shape)}, "
                    f"expected {np.dtype(dtype)}{list(shape)}"
                )
            loaded[name] = value
        self._bias = np.array(loaded["bias"], dtype=np.float64)
        for name in ("lin", "v", "v_acc"):
            target = _aligned_zeros(loaded[name].shape)
            target[...] = loaded[name]
            setattr(self, f"_{name}", target)
        self._counters = np.array(loaded["counters"], dtype=np.int64)

    @classmethod
    def from_state(cls, state: dict[str, StateValue]) -> FastFM:
        """A new engine with the params and model saved in ``state``."""
        engine = cls(FMParams.from_state(state))
        engine.load_state(state)
        return engine

    # -- Direct access to parameters (tests, warm starts) ----------------------------------

    @property
    def intercept(self) -> float:
        return float(self._bias[kernel.B_W0])

    def set_intercept(self, value: float) -> None:
        """Set w0 (for FTRL, ``z0`` is set so the closed form gives it back)."""
        p = self._params
        if p.optimizer == "ftrl" and p.intercept_learning_rate > 0:
            n0 = float(self._bias[kernel.B_N0])
            lr_0 = p.intercept_learning_rate
            self._bias[kernel.B_Z0] = kernel.ftrl_z_for_weight(value, n0, lr_0, p.ftrl_beta, 0, 0)
        self._bias[kernel.B_W0] = value

    def get_weights(self, buckets: IndexLike) -> F64:
        """Linear weights of ``buckets`` (a copy)."""
        return np.array(self._lin[self._buckets(buckets), kernel.LIN_W], dtype=np.float64)

    def set_weights(self, buckets: IndexLike, values: npt.ArrayLike) -> None:
        """Set linear weights (for FTRL, ``z`` is set so the closed form gives them back)."""
        idx = self._buckets(buckets)
        vals = np.broadcast_to(np.asarray(values, dtype=np.float64), idx.shape)
        self._lin[idx, kernel.LIN_W] = vals
        if self._params.optimizer == "ftrl":
            p = self._params
            for j, wj in zip(idx.tolist(), vals.tolist(), strict=True):
                self._lin[j, kernel.LIN_Z] = kernel.ftrl_z_for_weight(
                    wj, float(self._lin[j, kernel.LIN_N]), p.ftrl_alpha, p.ftrl_beta, p.l1_w, p.l2_w
                )

    def get_latents(self, buckets: IndexLike) -> F64:
        """Latent vectors of ``buckets``, shape ``(len(buckets), k)`` (a copy)."""
        return self._v[self._buckets(buckets)].copy()

    def set_latents(self, buckets: IndexLike, vectors: npt.ArrayLike) -> None:
        """Set latent vectors of ``buckets`` from an array of shape ``(len(buckets), k)``."""
        idx = self._buckets(buckets)
        vecs = np.asarray(vectors, dtype=np.float64)
        if vecs.shape != (idx.shape[0], self._params.k):
            raise ValueError(f"vectors must have shape {(idx.shape[0], self._params.k)}")
        self._v[idx] = vecs

    def live_arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """The engine's own state arrays, not copies (``delta``: increments are read from and
        added to them in place); layout in ``kernel``."""
        return self._arrays()

    # -- internals -------------------------------------------------------------------------

    def _buckets(self, buckets: IndexLike) -> npt.NDArray[np.int64]:
        idx = np.asarray(buckets, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._params.n_buckets):
            raise ValueError(f"bucket outside [0, {self._params.n_buckets})")
        return idx

    def _arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        return {
            "bias": self._bias,
            "lin": self._lin,
            "v": self._v,
            "v_acc": self._v_acc,
            "counters": self._counters,
        }

    def _run_one(self, x: SparseExample, kind: npt.NDArray[np.int8], label: int) -> F64:
        indices = np.ascontiguousarray(x.indices, dtype=np.int32)
        values = np.ascontiguousarray(x.values, dtype=np.float64)
        self._indptr1[1] = indices.shape[0]
        self._label1[0] = label
        return self._run(
            self._indptr1, indices, values, kind, self._row1, self._label1, self._weight1
        )

    def _run(
        self,
        indptr: npt.NDArray[np.int64],
        indices: npt.NDArray[np.int32],
        values: F64,
        op_kind: npt.NDArray[np.int8],
        op_row: npt.NDArray[np.int64],
        op_label: npt.NDArray[np.int8],
        op_weight: F64,
    ) -> F64:
        code = kernel.check_batch(
            indptr, indices, values, op_kind, op_row, op_label, op_weight, self._params.n_buckets
        )
        if code != kernel.BATCH_OK:
            raise ValueError(f"invalid OpBatch: {kernel.BATCH_ERRORS[code]}")
        out = np.empty(op_kind.shape[0])
        if not (indices.flags.writeable and values.flags.writeable):
            # One compiled signature: the kernel's scratch arrays for crosses are writable.
            indices, values = indices.copy(), values.copy()
        kernel.run_ops(
            indptr, indices, values, op_kind, op_row, op_label, op_weight, self._opt, self._hp,
            self._bias, self._lin, self._v, self._v_acc, self._counters, out, self._crosses,
        )  # fmt: skip
        return out


def random_batches(
    n_examples: int,
    n_fields: int,
    n_buckets: int,
    *,
    batch_size: int = 4096,
    vocabulary: int = 0,
    seed: int = 0,
) -> list[OpBatch]:
    """Pre-hashed random one-hot examples, each scored then learned (progressive validation).

    ``vocabulary`` > 0 draws each field's value Zipf-like from that many values (as in real
    CTR logs, where a few values dominate); 0 draws buckets uniformly (worst case for caches).
    """
    rng = np.random.default_rng(seed)
    if vocabulary > 0:
        ranks = np.minimum(rng.zipf(1.2, size=(n_examples, n_fields)), vocabulary) - 1
        field_salt = rng.integers(0, n_buckets, size=n_fields)
        # A cheap multiplicative hash of (field, rank) spreads values over the table.
        mixed = (ranks * 2654435761 + field_salt[None, :] * 40503) % n_buckets
        buckets = mixed.astype(np.int32)
    else:
        buckets = rng.integers(0, n_buckets, size=(n_examples, n_fields), dtype=np.int32)
    labels = (rng.random(n_examples) < 0.03).astype(np.int8)
    batches = []
    for start in range(0, n_examples, batch_size):
        stop = min(start + batch_size, n_examples)
        m = stop - start
        rows = np.arange(m, dtype=np.int64)
        batches.append(
            OpBatch(
                indptr=np.arange(0, (m + 1) * n_fields, n_fields, dtype=np.int64),
                indices=np.ascontiguousarray(buckets[start:stop].reshape(-1)),
                values=np.ones(m * n_fields),
                op_kind=np.tile(np.array([OP_SCORE, OP_LEARN], dtype=np.int8), m),
                op_row=np.repeat(rows, 2),
                op_label=np.repeat(labels[start:stop], 2),
            )
        )
    return batches


def engine_throughput(
    n_examples: int,
    n_fields: int = 20,
    k: int = 8,
    *,
    optimizer: str = "adagrad",
    n_buckets: int = 1 << 20,
    vocabulary: int = 0,
    batch_size: int = 4096,
    seed: int = 0,
) -> float:
    """Examples/s of progressive score + learn through ``run_batch`` (JIT warm-up excluded).

    Data are pre-hashed one-hot rows (value 1.0), each scored then learned; by default the
    buckets are uniform at random (the cache worst case), ``vocabulary`` > 0 draws Zipf-like
    field values instead. Building the batches is not timed.
    """
    params = FMParams(n_buckets=n_buckets, k=k, optimizer=optimizer)
    batches = random_batches(
        n_examples, n_fields, n_buckets, batch_size=batch_size, vocabulary=vocabulary, seed=seed
    )
    # Warm-up on a throwaway engine so compilation (or cache loading) is not timed.
    warm = FastFM(FMParams(n_buckets=1024, k=k, optimizer=optimizer))
    warm.run_batch(random_batches(64, n_fields, 1024, seed=seed + 1)[0])
    engine = FastFM(params)
    started = time.perf_counter()
    for batch in batches:
        engine.run_batch(batch)
    return n_examples / (time.perf_counter() - started)
