"""FM hyperparameters: one frozen, validated dataclass shared by every engine.

Each field's ``metadata["help"]`` is the one-line help the CLI shows; every field is a plain
``int``, ``float`` or ``str`` so the config layer can set it from TOML, env or flags.

>>> FMParams().optimizer
'adaptive'
>>> FMParams(k=0).k  # k=0 is plain logistic regression, handy as a baseline
0
>>> FMParams(n_buckets=1000)
Traceback (most recent call last):
...
stream_fm.errors.ConfigError: n_buckets: must be a power of two, got 1000
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from stream_fm.errors import CheckpointError, ConfigError

OPTIMIZERS: Final = ("sgd", "adagrad", "ftrl", "adaptive", "adam")
INTERACTIONS: Final = ("none", "all")
# Indices are int32 in SparseExample, so a bucket id must fit in one.
MAX_BUCKETS: Final = 1 << 31
MAX_K: Final = 1024


class ModelStateMismatch(CheckpointError):
    """A saved model state does not fit this engine (other engine, params or array shapes)."""


def help_text(text: str) -> dict[str, str]:
    """A setting's one-line help, as dataclass field metadata (the CLI shows it)."""
    return {"help": text}


@dataclass(frozen=True, slots=True)
class FMParams:
    """Hyperparameters of a Factorization Machine with logistic loss.

    The defaults were chosen on every stream ``stream-fm bench`` runs (simulated ones, and
    the real logs: Criteo, Avazu, iPinYou, TalkingData, with 0.2 % to 22 % clicks), for none
    in particular: the ``adaptive`` optimizer (Vowpal Wabbit's adaptive, normalized and
    importance-invariant update, extended to the latents) cannot overshoot however many
    features move at once, so its rates can be high enough for the intercept to find the
    base rate within a few hundred examples and for rare values to count. ``adagrad_eps``
    damps the first steps of features seen only a few times.
    """

    n_buckets: int = field(
        default=1 << 20, metadata=help_text("hashed feature buckets (power of two)")
    )
    k: int = field(
        default=8, metadata=help_text("latent dimension of the FM (0 = logistic regression)")
    )
    optimizer: str = field(
        default="adaptive",
        metadata=help_text(
            "adaptive (per-coordinate, normalized, importance-invariant: VW's update) | "
            "adagrad | sgd | ftrl (FTRL-Proximal for the linear part, AdaGrad for latents) | "
            "adam (lazy, per-coordinate bias correction; wants rates near 0.01)"
        ),
    )
    learning_rate: float = field(
        default=0.5,
        metadata=help_text("step size of the linear weights (adaptive, adagrad, sgd, adam)"),
    )
    latent_learning_rate: float = field(
        default=0.2, metadata=help_text("step size of the latent vectors")
    )
    intercept_learning_rate: float = field(
        default=0.5,
        metadata=help_text("step size of the intercept (ftrl: its alpha); 0 freezes it"),
    )
    l1_w: float = field(default=0.0, metadata=help_text("L1 on linear weights (ftrl only)"))
    l2_w: float = field(default=1e-5, metadata=help_text("L2 on linear weights"))
    l2_v: float = field(default=1e-5, metadata=help_text("L2 on latent vectors"))
    ftrl_alpha: float = field(
        default=0.1, metadata=help_text("FTRL-Proximal alpha (linear weights)")
    )
    ftrl_beta: float = field(default=1.0, metadata=help_text("FTRL-Proximal beta (linear weights)"))
    adagrad_eps: float = field(
        default=0.3,
        metadata=help_text(
            "added to every squared-gradient sum (adaptive, adagrad): damps rare features' "
            "first steps"
        ),
    )
    interactions: str = field(
        default="none",
        metadata=help_text(
            "explicit crosses beside the latents: none | all (every pair of an example's "
            "features, hashed into the same buckets as a linear-only weight: VW's -q)"
        ),
    )
    cross_learning_rate: float = field(
        default=0.5,
        metadata=help_text(
            "step size of the crosses' weights (adaptive, adagrad, sgd, adam; ftrl uses "
            "ftrl_alpha for them too)"
        ),
    )
    init_std: float = field(default=0.01, metadata=help_text("std of the normal latent init"))
    prior_ctr: float = field(
        default=0.02,
        metadata=help_text(
            "the intercept starts at logit(prior_ctr): a new model serves a plausible CTR "
            "instead of 0.5 while its first windows (positives only) are open"
        ),
    )
    seed: int = field(default=0, metadata=help_text("seed of the latent init"))
    clip_gradient: float = field(
        default=1e12,
        metadata=help_text("clip |dloss/dy| to this (logistic |g| <= 1, so >= 1 is off)"),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                # Accept ints for float knobs (TOML `l2_w = 0`), stored as float so states match.
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ConfigError(f.name, f"must be a number, got {value!r}")
                value = float(value)
                if not math.isfinite(value):
                    raise ConfigError(f.name, f"must be finite, got {value!r}")
                object.__setattr__(self, f.name, value)
            elif f.type in ("int", int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ConfigError(f.name, f"must be an integer, got {value!r}")
            elif not isinstance(value, str):
                raise ConfigError(f.name, f"must be a string, got {value!r}")

        def need(ok: bool, name: str, problem: str) -> None:
            if not ok:
                raise ConfigError(name, f"{problem}, got {getattr(self, name)!r}")

        n = self.n_buckets
        need(n >= 1 and n & (n - 1) == 0, "n_buckets", "must be a power of two")
        need(n <= MAX_BUCKETS, "n_buckets", f"must be at most 2**31 ({MAX_BUCKETS})")
        need(0 <= self.k <= MAX_K, "k", f"must be between 0 and {MAX_K}")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        need(
            self.interactions in INTERACTIONS,
            "interactions",
            f"must be one of {', '.join(INTERACTIONS)}",
        )
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.latent_learning_rate > 0, "latent_learning_rate", "must be > 0")
        need(self.cross_learning_rate > 0, "cross_learning_rate", "must be > 0")
        need(self.intercept_learning_rate >= 0, "intercept_learning_rate", "must be >= 0")
        need(self.l1_w >= 0, "l1_w", "must be >= 0")
        need(
            self.l1_w == 0 or self.optimizer == "ftrl",
            "l1_w",
            "is only supported with optimizer='ftrl' (set it to 0)",
        )
        need(self.l2_w >= 0, "l2_w", "must be >= 0")
        need(self.l2_v >= 0, "l2_v", "must be >= 0")
        need(self.ftrl_alpha > 0, "ftrl_alpha", "must be > 0")
        need(self.ftrl_beta >= 0, "ftrl_beta", "must be >= 0")
        # eps > 0 keeps the first AdaGrad step finite when the first gradient is 0.
        need(self.adagrad_eps > 0, "adagrad_eps", "must be > 0")
        need(self.init_std >= 0, "init_std", "must be >= 0")
        need(0 < self.prior_ctr < 1, "prior_ctr", "must be strictly between 0 and 1")
        need(0 <= self.seed < 2**63, "seed", "must be in [0, 2**63)")
        need(self.clip_gradient > 0, "clip_gradient", "must be > 0")

    def to_state(self) -> dict[str, int | float | str]:
        """The params as ``{"param.<name>": value}`` for an engine state."""
        return {f"param.{f.name}": getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FMParams:
        """Rebuild params saved by ``to_state``; raises ``ModelStateMismatch`` if unusable."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f"param.{f.name}"
            if key not in state and f.name in ADDED_PARAMS:
                values[f.name] = ADDED_PARAMS[f.name]
                continue
            if key not in state:
                raise ModelStateMismatch(f"model state has no {key!r}")
            value = state[key]
            # Checkpoint readers may hand back numpy scalars; params want plain Python values.
            values[f.name] = value.item() if hasattr(value, "item") else value
        try:
            return cls(**values)
        except ConfigError as error:
            raise ModelStateMismatch(f"model state has invalid params: {error}") from None

    def check_restorable(self, saved: FMParams, *, strict: bool) -> None:
        """Raise ``ModelStateMismatch`` unless a state saved with ``saved`` fits these params:
        all of them equal, or (not ``strict``) the structural ones (``STRUCTURAL_PARAMS``)."""
        diffs = saved.differences(self)
        if not strict:
            diffs = [d for d in diffs if d.split(":")[0] in STRUCTURAL_PARAMS]
        if diffs:
            raise ModelStateMismatch(
                "model state was saved with other params (saved != configured): " + "; ".join(diffs)
            )

    def differences(self, other: FMParams) -> list[str]:
        """Names of the fields whose values differ (``"k: 8 != 4"``)."""
        return [
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


# Params that fix the meaning or shape of the state arrays; the others are step sizes and
# regularisation an operator may change across a restart (``load_state(strict=False)``).
STRUCTURAL_PARAMS: Final = ("n_buckets", "k", "optimizer", "interactions")
# Params added after states were first written, with the value those states were learned with.
ADDED_PARAMS: Final[dict[str, Any]] = {"interactions": "none", "cross_learning_rate": 0.5}


def prior_logit(params: FMParams) -> float:
    """The intercept a fresh model starts from."""
    return math.log(params.prior_ctr / (1.0 - params.prior_ctr))
