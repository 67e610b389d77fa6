"""``RiverFM``: ``river.facto.FMClassifier`` behind the engine protocol, as a reference.

It is the oracle of the differential test (``optimizer="sgd"``) and the slow baseline of the
benchmarks. Features go to river as ``{str(bucket): value}`` (repeated buckets summed, as the
hasher does).

Mapping of ``FMParams`` to river:

* ``sgd``: ``optim.SGD(learning_rate)`` for weights, ``optim.SGD(latent_learning_rate)`` for
  latents, ``l2_weight=l2_w``, ``l2_latent=l2_v``.
* ``adagrad``: ``optim.AdaGrad(learning_rate, eps=adagrad_eps)`` for weights.
* ``ftrl``: ``optim.FTRLProximal(ftrl_alpha, ftrl_beta, l1_w, l2_w)`` for weights (river's
  FTRL applies its own L1/L2, so the FM's ``l2_weight`` is 0).
* For ``adagrad`` and ``ftrl`` the latents use ``optim.SGD(latent_learning_rate)``: river keys
  latent-optimizer state by factor index, so an AdaGrad there would share one accumulator
  per factor across all features, which is not AdaGrad.
* The intercept always uses river's plain ``intercept_lr`` step.

Two guarantees river alone does not give are added here: predicting never changes the model
(river draws the latents of unseen features while predicting; they are dropped again and the
initializer's random state restored), and a learn step that would leave a NaN or infinity in
the model is rolled back and counted in ``refused_updates``.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from river import facto, optim

from stream_fm.model.base import OP_LEARN_FNW, OP_SCORE, OpBatch, SparseExample, StateValue
from stream_fm.model.params import FMParams, ModelStateMismatch, prior_logit

ENGINE_NAME: Final = "RiverFM"
# river's sigmoid returns exactly 0 or 1 beyond |y| > 30; p is kept inside FastFM's range
# (sigmoid of +-36) so that log loss stays finite.
P_MAX: Final = 1.0 / (1.0 + math.exp(-36.0))
P_MIN: Final = math.exp(-36.0) / (1.0 + math.exp(-36.0))
STATE_FORMAT: Final = 1


def _features(indices: npt.NDArray[np.int32], values: npt.NDArray[np.float64]) -> dict[str, float]:
    x: dict[str, float] = {}
    for j, xj in zip(indices.tolist(), values.tolist(), strict=True):
        key = str(j)
        x[key] = x.get(key, 0.0) + xj
    return x


def _finite(value: Any) -> bool:
    return bool(np.all(np.isfinite(value)))


class RiverFM:
    """``river.facto.FMClassifier`` wrapped as an ``Engine`` (slow, Python per example)."""

    def __init__(self, params: FMParams | None = None) -> None:
        self._params = FMParams() if params is None else params
        # river's API is only partly typed; the model is used as Any on purpose.
        self._model: Any = self._build(self._params)
        self._n_learned = 0
        self._refused = 0

    @staticmethod
    def _build(p: FMParams) -> Any:
        l2_weight = p.l2_w
        weight_optimizer: optim.base.Optimizer
        if p.optimizer == "sgd":
            weight_optimizer = optim.SGD(p.learning_rate)
        elif p.optimizer == "adagrad":
            weight_optimizer = optim.AdaGrad(p.learning_rate, eps=p.adagrad_eps)
        else:
            weight_optimizer = optim.FTRLProximal(
                alpha=p.ftrl_alpha, beta=p.ftrl_beta, l1=p.l1_w, l2=p.l2_w
            )
            l2_weight = 0.0
        return facto.FMClassifier(
            n_factors=p.k,
            weight_optimizer=weight_optimizer,
            latent_optimizer=optim.SGD(p.latent_learning_rate),
            sample_normalization=False,
            l1_weight=0.0,
            l2_weight=l2_weight,
            l1_latent=0.0,
            l2_latent=p.l2_v,
            intercept=prior_logit(p),
            intercept_lr=p.intercept_learning_rate,
            latent_initializer=optim.initializers.Normal(mu=0.0, sigma=p.init_std, seed=p.seed),
            clip_gradient=p.clip_gradient,
            seed=p.seed,
        )

    # -- Engine protocol -------------------------------------------------------------------

    @property
    def params(self) -> FMParams:
        return self._params

    @property
    def model(self) -> Any:
        """The wrapped river model (read it, do not change it behind the engine's back)."""
        return self._model

    @property
    def n_learned(self) -> int:
        return self._n_learned

    @property
    def refused_updates(self) -> int:
        return self._refused

    @property
    def nonfinite_outputs(self) -> int:
        return 0  # river clamps its raw output itself

    def predict_proba_one(self, x: SparseExample) -> float:
        return self._predict(_features(x.indices, x.values))

    def learn_one(self, x: SparseExample, y: int) -> None:
        if y not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {y!r}")
        self._learn(_features(x.indices, x.values), int(y))

    def run_batch(self, batch: OpBatch) -> npt.NDArray[np.float64]:
        out = np.empty(len(batch))
        weights = batch.weights()
        rows: dict[int, dict[str, float]] = {}
        for j in range(len(batch)):
            r = int(batch.op_row[j])
            x = rows.get(r)
            if x is None:
                a, b = int(batch.indptr[r]), int(batch.indptr[r + 1])
                x = rows[r] = _features(batch.indices[a:b], batch.values[a:b])
            out[j] = p = self._predict(x)
            kind = batch.op_kind[j]
            if kind != OP_SCORE:
                label = int(batch.op_label[j])
                if label not in (0, 1):
                    raise ValueError(f"label must be 0 or 1, got {label!r}")
                w = float(weights[j])
                if kind == OP_LEARN_FNW:
                    w *= (1.0 + p) if label == 1 else (1.0 - p) * (1.0 + p)
                self._learn(x, label, w)
        return out

    def state(self, into: Mapping[str, StateValue] | None = None) -> dict[str, StateValue]:
        m = self._model
        out: dict[str, StateValue] = {"engine": ENGINE_NAME, "format": STATE_FORMAT}
        out.update(self._params.to_state())
        out["n_learned"] = self._n_learned
        out["refused"] = self._refused
        out["intercept"] = float(m.intercept)
        out["weight_keys"], out["weight_values"] = self._dict_arrays(m.weights)
        k = self._params.k
        out["latent_keys"] = np.array([int(key) for key in m.latents], dtype=np.int64)
        out["latent_values"] = np.array(
            [np.asarray(vec, dtype=np.float64) for vec in m.latents.values()], dtype=np.float64
        ).reshape(len(m.latents), k)
        _, keys, pos, has_gauss, gauss = m.latent_initializer._rng.get_state()
        out["rng_keys"] = np.array(keys, dtype=np.uint32)
        out["rng_pos"] = int(pos)
        out["rng_has_gauss"] = int(has_gauss)
        out["rng_gauss"] = float(gauss)
        out["weight_opt_iterations"] = int(m.weight_optimizer.n_iterations)
        out["latent_opt_iterations"] = int(m.latent_optimizer.n_iterations)
        for name, table in self._optimizer_tables().items():
            out[f"opt_{name}_keys"], out[f"opt_{name}_values"] = self._dict_arrays(table)
        return out

    def load_state(self, state: dict[str, StateValue], *, strict: bool = True) -> None:
        """Restore ``state()`` exactly; ``strict`` as in ``FastFM.load_state``."""
        if state.get("engine") != ENGINE_NAME or state.get("format") != STATE_FORMAT:
            raise ModelStateMismatch(
                f"model state is for engine {state.get('engine')!r} format "
                f"{state.get('format')!r}, not {ENGINE_NAME!r} format {STATE_FORMAT}"
            )
        self._params.check_restorable(FMParams.from_state(state), strict=strict)
        try:
            model = self._build(self._params)
            model.intercept = float(self._scalar(state, "intercept"))
            model.weights = collections.defaultdict(
                model.weight_initializer, self._dict_from(state, "weight")
            )
            latent_keys = self._array(state, "latent_keys")
            latent_values = self._array(state, "latent_values")
            if latent_values.shape != (latent_keys.shape[0], self._params.k):
                raise ModelStateMismatch("model state latent_values has the wrong shape")
            for key, vec in zip(latent_keys.tolist(), latent_values, strict=True):
                model.latents[str(key)] = np.array(vec, dtype=np.float64)
            rng_keys = self._array(state, "rng_keys")
            model.latent_initializer._rng.set_state(
                (
                    "MT19937",
                    rng_keys.astype(np.uint32),
                    int(self._scalar(state, "rng_pos")),
                    int(self._scalar(state, "rng_has_gauss")),
                    float(self._scalar(state, "rng_gauss")),
                )
            )
            model.weight_optimizer.n_iterations = int(self._scalar(state, "weight_opt_iterations"))
            model.latent_optimizer.n_iterations = int(self._scalar(state, "latent_opt_iterations"))
            previous = self._model
            self._model = model
            try:
                for name, table in self._optimizer_tables().items():
                    table.update(self._dict_from(state, f"opt_{name}"))
            except BaseException:
                self._model = previous
                raise
            self._n_learned = int(self._scalar(state, "n_learned"))
            self._refused = int(self._scalar(state, "refused"))
        except (KeyError, TypeError, ValueError) as error:
            raise ModelStateMismatch(f"model state is malformed: {error}") from None

    # -- Direct access to parameters (tests) -----------------------------------------------

    @property
    def intercept(self) -> float:
        return float(self._model.intercept)

    def get_latents(self, buckets: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Latent vectors of ``buckets`` river has already drawn (ValueError otherwise)."""
        keys = [str(b) for b in np.asarray(buckets, dtype=np.int64).reshape(-1).tolist()]
        missing = [key for key in keys if key not in self._model.latents]
        if missing:
            raise ValueError(f"river has not drawn latents for buckets {missing[:5]}")
        return np.array([self._model.latents[key] for key in keys], dtype=np.float64).reshape(
            len(keys), self._params.k
        )

    def set_latents(self, buckets: npt.ArrayLike, vectors: npt.ArrayLike) -> None:
        """Set the latent vectors of ``buckets`` (shape ``(len(buckets), k)``)."""
        idx = np.asarray(buckets, dtype=np.int64).reshape(-1)
        vecs = np.asarray(vectors, dtype=np.float64)
        if vecs.shape != (idx.shape[0], self._params.k):
            raise ValueError(f"vectors must have shape {(idx.shape[0], self._params.k)}")
        for key, vec in zip(idx.tolist(), vecs, strict=True):
            self._model.latents[str(key)] = vec.copy()

    def set_weights(self, buckets: npt.ArrayLike, values: npt.ArrayLike) -> None:
        idx = np.asarray(buckets, dtype=np.int64).reshape(-1)
        vals = np.broadcast_to(np.asarray(values, dtype=np.float64), idx.shape)
        for key, value in zip(idx.tolist(), vals.tolist(), strict=True):
            self._model.weights[str(key)] = value

    # -- internals -------------------------------------------------------------------------

    def _optimizer_tables(self) -> dict[str, Any]:
        """The per-feature optimizer state river keeps for the weights."""
        opt = self._model.weight_optimizer
        if isinstance(opt, optim.AdaGrad):
            return {"g2": opt.g2}
        if isinstance(opt, optim.FTRLProximal):
            return {"z": opt.z, "n": opt.n}
        return {}

    @staticmethod
    def _dict_arrays(
        table: dict[str, Any],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        # Insertion order is kept: river's dot product iterates the weights dict.
        keys = np.array([int(key) for key in table], dtype=np.int64)
        values = np.array([float(value) for value in table.values()], dtype=np.float64)
        return keys, values

    @staticmethod
    def _array(state: dict[str, StateValue], name: str) -> npt.NDArray[Any]:
        value = state[name]
        if not isinstance(value, np.ndarray):
            raise ModelStateMismatch(f"model state {name!r} is not an array")
        return value

    @staticmethod
    def _scalar(state: dict[str, StateValue], name: str) -> int | float:
        value = state[name]
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelStateMismatch(f"model state {name!r} is not a number")
        return value

    def _dict_from(self, state: dict[str, StateValue], prefix: str) -> dict[str, float]:
        keys = self._array(state, f"{prefix}_keys")
        values = self._array(state, f"{prefix}_values")
        if keys.shape != values.shape:
            raise ModelStateMismatch(f"model state {prefix}_keys and _values differ in length")
        return {str(key): value for key, value in zip(keys.tolist(), values.tolist(), strict=True)}

    def _predict(self, x: dict[str, float]) -> float:
        m = self._model
        unseen = [key for key in x if key not in m.latents]
        rng_state = m.latent_initializer._rng.get_state() if unseen else None
        with np.errstate(all="ignore"):
            p = float(m.predict_proba_one(x)[True])
        if math.isnan(p):
            p = 0.5  # as FastFM: an absurd input (x = 1e300) gets an uninformative p
        p = min(max(p, P_MIN), P_MAX)
        if unseen:
            # river drew latents for unseen features while predicting: undo that.
            for key in unseen:
                m.latents.pop(key, None)
            m.latent_initializer._rng.set_state(rng_state)
        return p

    def _learn(self, x: dict[str, float], y: int, w: float = 1.0) -> None:
        m = self._model
        tables = self._optimizer_tables()
        saved_intercept = m.intercept
        # None marks "absent": weights and optimizer state are floats, never None.
        saved_weights = {key: m.weights.get(key) for key in x}
        saved_latents = {key: m.latents[key].copy() if key in m.latents else None for key in x}
        saved_tables = {name: {key: table.get(key) for key in x} for name, table in tables.items()}
        saved_rng = m.latent_initializer._rng.get_state()
        saved_iterations = (m.weight_optimizer.n_iterations, m.latent_optimizer.n_iterations)
        self._n_learned += 1
        try:
            with np.errstate(all="ignore"):
                m.learn_one(x, y, w)
        except ArithmeticError:
            ok = False  # e.g. river's `x ** 2` raises OverflowError on Python floats
        else:
            ok = math.isfinite(m.intercept) and all(
                math.isfinite(m.weights.get(key, 0.0))
                and _finite(m.latents.get(key, 0.0))
                and all(math.isfinite(table.get(key, 0.0)) for table in tables.values())
                for key in x
            )
        if ok:
            return
        self._refused += 1
        m.intercept = saved_intercept
        for key, weight in saved_weights.items():
            if weight is None:
                m.weights.pop(key, None)
            else:
                m.weights[key] = weight
        for key, vec in saved_latents.items():
            if vec is None:
                m.latents.pop(key, None)
            else:
                m.latents[key] = vec
        for name, table in tables.items():
            for key, value in saved_tables[name].items():
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
        m.latent_initializer._rng.set_state(saved_rng)
        m.weight_optimizer.n_iterations, m.latent_optimizer.n_iterations = saved_iterations
