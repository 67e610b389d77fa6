"""Increments and their exchange: one worker alone is untouched, workers in step are one model
bit for bit, and each combine rule does what it says per kind of state."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from stream_fm.model import FastFM, FMParams, SparseExample, kernel
from stream_fm.model.delta import Delta, DeltaTracker, combine, exchange
from stream_fm.tools.bench.sync import PRECISION, served_logloss

OPTIMIZERS = ("sgd", "adagrad", "ftrl", "adaptive", "adam", "adaptive+crosses")


def params(optimizer: str) -> FMParams:
    if optimizer.endswith("+crosses"):
        return replace(params(optimizer.removesuffix("+crosses")), interactions="all")
    return FMParams(n_buckets=256, k=3, optimizer=optimizer, seed=3, init_std=0.05)


def examples(n: int, seed: int) -> list[tuple[SparseExample, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.choice(256, size=6, replace=False).astype(np.int32)
        vals = np.where(rng.random(6) < 0.8, 1.0, rng.uniform(0.5, 3.0, 6))
        out.append((SparseExample(idx, vals), int(rng.random() < 0.3)))
    return out


def arrays(tracker: DeltaTracker) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in tracker.engine.live_arrays().items()}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_worker_without_peers_is_the_engine_bit_for_bit(optimizer: str) -> None:
    alone, tracked = FastFM(params(optimizer)), DeltaTracker(FastFM(params(optimizer)))
    for round_ in range(5):
        for x, y in examples(40, seed=round_):
            assert alone.predict_proba_one(x) == tracked.predict_proba_one(x)
            alone.learn_one(x, y)
            tracked.learn_one(x, y)
        exchange([tracked], "scaled")
    for name, array in alone.live_arrays().items():
        assert np.array_equal(array, tracked.engine.live_arrays()[name]), name


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("rule", ["share", "scaled", "average", "sum"])
def test_workers_in_step_hold_one_model_bit_for_bit(optimizer: str, rule: str) -> None:
    workers = [DeltaTracker(FastFM(params(optimizer))) for _ in range(3)]
    for round_ in range(6):
        for w, worker in enumerate(workers):
            for x, y in examples(15, seed=100 * round_ + w):
                worker.learn_one(x, y)
        exchange(workers, rule)
        first = arrays(workers[0])
        for other in workers[1:]:
            for name, array in arrays(other).items():
                assert np.array_equal(array, first[name]), (round_, name)
    assert workers[0].n_learned == 3 * 6 * 15  # every worker's examples, counted once


def test_sum_adds_every_move_and_average_takes_the_mean_move_of_shared_weights() -> None:
    a, b = (DeltaTracker(FastFM(params("adagrad"))) for _ in range(2))
    x = SparseExample(np.array([7], dtype=np.int32), np.ones(1))
    a.learn_one(x, 1)
    b.learn_one(x, 1)
    da, db = a.take(), b.take()
    summed = combine([da, db], "sum", a.max_columns, a.has_acc)
    mean = combine([da, db], "average", a.max_columns, a.has_acc)
    w, n = kernel.LIN_W, kernel.LIN_N
    assert summed.lin[0, w] == da.lin[0, w] + db.lin[0, w]
    assert mean.lin[0, w] == (da.lin[0, w] + db.lin[0, w]) / 2
    assert mean.lin[0, n] == summed.lin[0, n] == da.lin[0, n] + db.lin[0, n]  # every gradient
    assert mean.bias[kernel.B_W0] == (da.bias[kernel.B_W0] + db.bias[kernel.B_W0]) / 2
    assert mean.learned == summed.learned == 2


def test_the_adaptive_scale_combines_by_maximum() -> None:
    a, b = (DeltaTracker(FastFM(params("adaptive"))) for _ in range(2))
    a.learn_one(SparseExample(np.array([5], dtype=np.int32), np.array([2.0])), 1)
    b.learn_one(SparseExample(np.array([5], dtype=np.int32), np.array([3.0])), 0)
    exchange([a, b], "average")
    assert a.engine.live_arrays()["lin"][5, kernel.LIN_S] == 3.0


def test_a_restored_model_is_the_new_base() -> None:
    a = DeltaTracker(FastFM(params("adaptive")))
    for x, y in examples(20, seed=1):
        a.learn_one(x, y)
    state = a.state()
    b = DeltaTracker(FastFM(params("adaptive")))
    b.load_state(state)
    assert len(b.take()) == 0 and b.take().learned == 0


def test_unknown_rule_is_refused() -> None:
    a = DeltaTracker(FastFM(params("sgd")))
    with pytest.raises(ValueError, match="rule"):
        combine([a.take()], "median")


def test_the_sync_bench_scores_every_prediction_of_every_worker() -> None:
    from stream_fm.config import build_settings
    from stream_fm.events import Labeled

    rng = np.random.default_rng(4)
    events = [
        (p, Labeled(f"r{i}", i, int(rng.random() < 0.2), [f"f{i % 7}", f"g{i % 3}"], [1.0, 1.0]))
        for i, p in enumerate(rng.integers(0, 8, 400).tolist())
    ]
    settings = build_settings({"hash_bits": 12, "k": 2})
    one, none_sent = served_logloss(events, settings, 1, 400, None)
    assert np.isfinite(one) and none_sent == 0
    for rule in ("average", "sum", None):
        two, _ = served_logloss(events, settings, 2, 50, rule)
        assert 0.0 < two < 1.0
    small, large = (served_logloss(events, settings, 2, 50, way) for way in PRECISION)
    assert 0 < small[1] < 0.7 * large[1]  # bfloat16 rows, a tiny model: headers weigh more
    assert abs(small[0] / large[0] - 1) < 0.01


def shared_and_lone(lone: int) -> tuple[DeltaTracker, Delta, Delta]:
    """Two AdaGrad workers move bucket 7 alike; worker ``lone`` alone moves bucket 9 too.
    Returns the first worker and both deltas."""
    a, b = (DeltaTracker(FastFM(params("adagrad"))) for _ in range(2))
    shared = SparseExample(np.array([7], dtype=np.int32), np.ones(1))
    a.learn_one(shared, 1)
    b.learn_one(shared, 1)
    (a, b)[lone].learn_one(SparseExample(np.array([9], dtype=np.int32), np.ones(1)), 0)
    return a, a.take(), b.take()


def test_scaled_keeps_a_lone_move_and_gives_a_shared_fresh_one_sqrt_n_moves() -> None:
    a, da, db = shared_and_lone(lone=0)
    out = combine([da, db], "scaled", a.max_columns, a.has_acc, a.base_rows)
    w = kernel.LIN_W
    rows = {int(bucket): i for i, bucket in enumerate(out.buckets)}
    lone = np.searchsorted(da.buckets, 9)
    assert out.lin[rows[9], w] == da.lin[lone, w]  # one mover: its whole move
    moved = da.lin[np.searchsorted(da.buckets, 7), w]
    assert out.lin[rows[7], w] == pytest.approx(np.sqrt(2) * moved)  # two alike: sqrt(2) moves


def test_scaled_needs_the_base() -> None:
    a = DeltaTracker(FastFM(params("adagrad")))
    with pytest.raises(ValueError, match="base"):
        combine([a.take()], "scaled")


def test_share_gives_a_shared_fresh_move_the_gradient_weighted_mean() -> None:
    a, da, db = shared_and_lone(lone=1)
    out = combine([da, db], "share", a.max_columns, a.has_acc, a.base_rows)
    w, n = kernel.LIN_W, kernel.LIN_N
    rows = {int(bucket): i for i, bucket in enumerate(out.buckets)}
    ia, ib = np.searchsorted(da.buckets, 7), np.searchsorted(db.buckets, 7)
    ga, gb = da.lin[ia, n], db.lin[ib, n]
    expected = (ga * da.lin[ia, w] + gb * db.lin[ib, w]) / (ga + gb)
    assert out.lin[rows[7], w] == pytest.approx(expected)
    assert out.lin[rows[9], w] == db.lin[np.searchsorted(db.buckets, 9), w]
