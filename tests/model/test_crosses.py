"""Explicit crosses (``interactions="all"``): every pair of an example's features as a
linear-only weight, hashed into the model's buckets, learned by the same optimizer."""

from __future__ import annotations

import numpy as np
import pytest

from stream_fm.errors import ConfigError
from stream_fm.model import FastFM, FMParams, SparseExample, kernel
from stream_fm.model.params import OPTIMIZERS

N_BUCKETS = 1 << 12


def examples(n: int, seed: int = 0, n_fields: int = 6) -> list[tuple[SparseExample, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        idx = rng.integers(0, N_BUCKETS, n_fields).astype(np.int32)
        vals = np.where(rng.random(n_fields) < 0.7, 1.0, rng.uniform(-1.5, 1.5, n_fields))
        out.append((SparseExample(idx, vals), int(i % 3 == 0)))
    return out


def spelled_out(x: SparseExample) -> SparseExample:
    """The example with its crosses written as ordinary features, in the kernel's order."""
    n = len(x.indices)
    values = [x.values[i] * x.values[m] for i in range(n) for m in range(i + 1, n)]
    return SparseExample(
        np.concatenate([x.indices, kernel.cross_buckets(x.indices, N_BUCKETS)]).astype(np.int32),
        np.concatenate([x.values, np.array(values, dtype=np.float64)]),
    )


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_without_latents_crosses_are_the_pairs_as_features_bit_for_bit(optimizer: str) -> None:
    # With k = 0 there is nothing linear-only about them: the kernel's crosses must be exactly
    # the pairs an ordinary model is given spelled out (VW's -q, the oracle of this feature).
    crossed = FastFM(
        FMParams(
            n_buckets=N_BUCKETS, k=0, optimizer=optimizer, interactions="all",
            cross_learning_rate=FMParams().learning_rate,
        )
    )  # fmt: skip
    plain = FastFM(FMParams(n_buckets=N_BUCKETS, k=0, optimizer=optimizer))
    for x, y in examples(200):
        assert crossed.predict_proba_one(x) == plain.predict_proba_one(spelled_out(x))
        crossed.learn_one(x, y)
        plain.learn_one(spelled_out(x), y)
    for name, array in plain.live_arrays().items():
        assert np.array_equal(array, crossed.live_arrays()[name]), name


def test_crosses_move_weights_only_and_the_features_keep_their_latents() -> None:
    params = FMParams(n_buckets=N_BUCKETS, k=4, seed=2, init_std=0.1, interactions="all")
    fm = FastFM(params)
    x = SparseExample(np.array([1, 2, 3], dtype=np.int32), np.ones(3))
    crosses = kernel.cross_buckets(x.indices, N_BUCKETS)
    assert len(set(crosses.tolist()) - {1, 2, 3}) == 3
    latents_before = fm.get_latents(crosses)
    p0 = fm.predict_proba_one(x)
    fm.learn_one(x, 1)
    assert fm.predict_proba_one(x) > p0
    assert np.all(fm.get_weights(crosses) > 0)  # every pair learned the click
    assert np.array_equal(fm.get_latents(crosses), latents_before)
    assert not np.array_equal(fm.get_latents([1, 2, 3]), FastFM(params).get_latents([1, 2, 3]))


@pytest.mark.parametrize("optimizer", ("adaptive", "adagrad", "sgd", "adam"))
def test_the_crosses_step_at_their_own_rate(optimizer: str) -> None:
    def trained(rate: float) -> FastFM:
        fm = FastFM(
            FMParams(
                n_buckets=N_BUCKETS, k=2, optimizer=optimizer, interactions="all",
                cross_learning_rate=rate,
            )
        )  # fmt: skip
        for x, y in examples(30):
            fm.learn_one(x, y)
        return fm

    slow, fast = trained(0.01), trained(0.5)
    x = examples(1, seed=3)[0][0]
    crosses = kernel.cross_buckets(x.indices, N_BUCKETS)
    fm = trained(0.01)
    fm.learn_one(x, 1)
    moved_slow = np.abs(fm.get_weights(crosses) - slow.get_weights(crosses)).sum()
    fm = trained(0.5)
    fm.learn_one(x, 1)
    moved_fast = np.abs(fm.get_weights(crosses) - fast.get_weights(crosses)).sum()
    assert 0 < moved_slow < moved_fast


def test_crosses_change_what_the_model_learns() -> None:
    crossed = FastFM(FMParams(n_buckets=N_BUCKETS, interactions="all"))
    plain = FastFM(FMParams(n_buckets=N_BUCKETS))
    for x, y in examples(50):
        crossed.learn_one(x, y)
        plain.learn_one(x, y)
    x = examples(1, seed=9)[0][0]
    assert crossed.predict_proba_one(x) != plain.predict_proba_one(x)


def test_a_cross_is_the_same_bucket_in_either_order_and_inside_the_table() -> None:
    forward = kernel.cross_buckets(np.array([7, 900], dtype=np.int32), N_BUCKETS)
    backward = kernel.cross_buckets(np.array([900, 7], dtype=np.int32), N_BUCKETS)
    assert forward.tolist() == backward.tolist()
    many = kernel.cross_buckets(np.arange(200, dtype=np.int32), N_BUCKETS)
    assert len(many) == 200 * 199 // 2
    assert many.min() >= 0 and many.max() < N_BUCKETS
    assert len(np.unique(many)) > 0.9 * N_BUCKETS  # spread over the table, not clustered


def test_interactions_is_checked_and_old_states_load_without_it() -> None:
    with pytest.raises(ConfigError, match="interactions"):
        FMParams(interactions="site:app")
    fm = FastFM(FMParams(n_buckets=N_BUCKETS))
    for x, y in examples(20):
        fm.learn_one(x, y)
    state = fm.state()
    del state["param.interactions"]  # a checkpoint written before crosses existed
    restored = FastFM.from_state(state)
    assert restored.params.interactions == "none"
    assert restored.predict_proba_one(examples(1, 5)[0][0]) == fm.predict_proba_one(
        examples(1, 5)[0][0]
    )
    crossed = FastFM(FMParams(n_buckets=N_BUCKETS, interactions="all"))
    with pytest.raises(Exception, match="interactions"):
        crossed.load_state(fm.state(), strict=False)  # the weights mean something else
