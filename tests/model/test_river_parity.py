"""Differential test: FastFM's "sgd" mode against river's FMClassifier, the oracle.

Same hyperparameters, distinct buckets (no hash collisions), river's latents set to FastFM's
initial ones; then both run the same progressive stream (score, then learn, per example) and
must serve the same p at every step.
"""

from __future__ import annotations

import numpy as np

from stream_fm.model import OP_LEARN, OP_SCORE, FastFM, FMParams, OpBatch, RiverFM

N_EXAMPLES = 5_000
UNIVERSE = 3_000  # distinct buckets the stream draws from
TOLERANCE = 1e-6


def synthetic_stream(n: int, n_buckets: int, seed: int) -> tuple[OpBatch, np.ndarray]:
    """10-20 distinct active features per example, values a mix of 1.0 and other floats."""
    rng = np.random.default_rng(seed)
    universe = rng.choice(n_buckets, UNIVERSE, replace=False).astype(np.int32)
    true_w = rng.normal(0.0, 1.0, UNIVERSE)
    rows, values, labels = [], [], []
    for _ in range(n):
        m = int(rng.integers(10, 21))
        chosen = rng.choice(UNIVERSE, m, replace=False)
        x = np.where(rng.random(m) < 0.6, 1.0, rng.uniform(-2.0, 2.0, m))
        logit = -1.0 + 0.3 * float(true_w[chosen] @ x)
        labels.append(int(rng.random() < 1.0 / (1.0 + np.exp(-logit))))
        rows.append(universe[chosen])
        values.append(x)
    batch = OpBatch(
        indptr=np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64),
        indices=np.concatenate(rows).astype(np.int32),
        values=np.concatenate(values),
        op_kind=np.tile(np.array([OP_SCORE, OP_LEARN], dtype=np.int8), n),
        op_row=np.repeat(np.arange(n, dtype=np.int64), 2),
        op_label=np.repeat(np.array(labels, dtype=np.int8), 2),
    )
    return batch, universe


def test_fast_sgd_matches_river_at_every_step() -> None:
    params = FMParams(
        n_buckets=1 << 16,
        k=8,
        optimizer="sgd",
        learning_rate=0.05,
        latent_learning_rate=0.04,
        intercept_learning_rate=0.03,
        l2_w=1e-3,
        l2_v=2e-3,
        clip_gradient=0.8,  # below 1, so the clip is exercised on confident mistakes
        init_std=0.1,
        seed=3,
    )
    batch, universe = synthetic_stream(N_EXAMPLES, params.n_buckets, seed=7)
    fast, river = FastFM(params), RiverFM(params)
    river.set_latents(universe, fast.get_latents(universe))

    p_fast = fast.run_batch(batch)
    p_river = river.run_batch(batch)

    delta = np.abs(p_fast - p_river)
    print(f"\nFastFM vs river over {N_EXAMPLES} examples: max |dp| = {delta.max():.3e}")
    assert np.all(p_fast[0::2] == p_fast[1::2])  # a learn serves the p of its score
    assert delta.max() <= TOLERANCE
    # The models themselves agree too, not only their outputs.
    assert abs(fast.intercept - river.intercept) <= TOLERANCE
    assert np.abs(fast.get_latents(universe) - river.get_latents(universe)).max() <= TOLERANCE
    weights = river.state()
    keys, values = weights["weight_keys"], weights["weight_values"]
    assert isinstance(keys, np.ndarray) and isinstance(values, np.ndarray)
    assert np.abs(fast.get_weights(keys) - values).max() <= TOLERANCE
    # Learning happened (the test is not vacuous): p moved well away from the start.
    assert np.ptp(p_fast) > 0.5
    assert fast.n_learned == river.n_learned == N_EXAMPLES
