"""The compiled kernel, checked against plain-Python formulas (through ``FastFM``)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest

from stream_fm.errors import ConfigError
from stream_fm.model import OP_LEARN, OP_SCORE, FastFM, FMParams, OpBatch, SparseExample
from stream_fm.model.base import OP_LEARN_FNW
from stream_fm.model.fast import engine_throughput, random_batches

N_BUCKETS = 1 << 10


def example(indices: list[int], values: list[float]) -> SparseExample:
    return SparseExample(np.array(indices, dtype=np.int32), np.array(values, dtype=np.float64))


def naive_logit(fm: FastFM, x: SparseExample) -> float:
    """Rendle's definition, pair by pair; a repeated bucket counts as separate occurrences."""
    idx = x.indices.tolist()
    w = fm.get_weights(idx)
    v = fm.get_latents(idx)
    y = fm.intercept + float(np.dot(w, x.values))
    for a, b in itertools.combinations(range(len(idx)), 2):
        y += float(np.dot(v[a], v[b])) * x.values[a] * x.values[b]
    return y


def sigmoid(y: float) -> float:
    return 1.0 / (1.0 + math.exp(-y))


def logloss(fm: FastFM, x: SparseExample, label: int) -> float:
    p = fm.predict_proba_one(x)
    return -math.log(p) if label == 1 else -math.log(1.0 - p)


def trained(params: FMParams, n: int = 50, seed: int = 0) -> FastFM:
    fm = FastFM(params)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        idx = rng.choice(params.n_buckets, 6, replace=False).tolist()
        fm.learn_one(example(idx, rng.uniform(-1, 1, 6).tolist()), int(rng.random() < 0.5))
    return fm


@pytest.mark.parametrize("k", [0, 1, 3, 8, 16])
def test_forward_matches_the_pairwise_definition(k: int) -> None:
    fm = trained(FMParams(n_buckets=N_BUCKETS, k=k, init_std=0.3, seed=1))
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(1, 25))
        x = example(rng.choice(N_BUCKETS, n, replace=False).tolist(), rng.normal(0, 1, n).tolist())
        assert fm.predict_proba_one(x) == pytest.approx(sigmoid(naive_logit(fm, x)), abs=1e-12)


def test_empty_example_scores_the_intercept() -> None:
    fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=4))
    fm.set_intercept(-1.5)
    assert fm.predict_proba_one(example([], [])) == pytest.approx(sigmoid(-1.5), abs=1e-15)


def test_repeated_buckets_act_as_occurrences_and_do_not_corrupt() -> None:
    fm = trained(FMParams(n_buckets=N_BUCKETS, k=4, init_std=0.3))
    x = example([5, 9, 5], [1.0, 0.5, 2.0])
    assert fm.predict_proba_one(x) == pytest.approx(sigmoid(naive_logit(fm, x)), abs=1e-12)
    for label in (0, 1, 1, 0):
        fm.learn_one(x, label)
    state = fm.state()
    for key in ("lin", "v", "v_acc", "bias"):
        value = state[key]
        assert isinstance(value, np.ndarray)
        assert np.all(np.isfinite(value))
    assert fm.refused_updates == 0


def test_refused_step_with_repeated_buckets_restores_everything() -> None:
    fm = trained(FMParams(n_buckets=N_BUCKETS, k=4, latent_learning_rate=1e300, l2_v=1e300), 0)
    before = fm.state()
    fm.learn_one(example([5, 9, 5, 5], [1.0, 0.5, 2.0, -1.0]), 1)
    assert fm.refused_updates == 1
    after = fm.state()
    for key in ("lin", "v", "v_acc", "bias"):
        assert np.asarray(before[key]).tobytes() == np.asarray(after[key]).tobytes(), key


@pytest.mark.parametrize("y", [-1e4, -800.0, -40.0, 40.0, 800.0, 1e4])
def test_extreme_logits_stay_finite_and_inside_0_1(y: float) -> None:
    fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=2, optimizer="sgd", intercept_learning_rate=0.1))
    fm.set_intercept(y)
    x = example([1], [1.0])
    with np.errstate(all="raise"):
        p = fm.predict_proba_one(x)
        assert 0.0 < p < 1.0
        fm.learn_one(x, 0 if y > 0 else 1)  # confidently wrong: gradient of size 1
    assert fm.intercept == pytest.approx(y - 0.1 * (1.0 if y > 0 else -1.0), rel=1e-15)
    assert fm.refused_updates == 0


def test_sgd_step_is_minus_lr_times_the_numerical_gradient() -> None:
    lr = 1e-3
    params = FMParams(
        n_buckets=N_BUCKETS,
        k=3,
        optimizer="sgd",
        learning_rate=lr,
        latent_learning_rate=lr,
        intercept_learning_rate=lr,
        l2_w=0.0,
        l2_v=0.0,
        init_std=0.4,
    )
    fm = trained(params, 0)
    idx = [3, 70, 512, 1000]
    fm.set_weights(idx, [0.3, -0.2, 0.1, 0.4])
    x = example(idx, [1.0, 0.7, -1.3, 2.0])
    label = 1
    h = 1e-6

    def numeric(get: float, put: object) -> float:
        assert callable(put)
        put(get + h)
        up = logloss(fm, x, label)
        put(get - h)
        down = logloss(fm, x, label)
        put(get)
        return (up - down) / (2 * h)

    g0 = numeric(fm.intercept, fm.set_intercept)
    gw = [
        numeric(float(fm.get_weights([j])[0]), lambda t, j=j: fm.set_weights([j], t)) for j in idx
    ]
    v = fm.get_latents(idx)
    gv = np.zeros_like(v)
    for a, j in enumerate(idx):
        for f in range(params.k):

            def put(t: float, a: int = a, j: int = j, f: int = f) -> None:
                row = v[a].copy()
                row[f] = t
                fm.set_latents([j], row[None, :])

            gv[a, f] = numeric(float(v[a, f]), put)

    w0_before, w_before = fm.intercept, fm.get_weights(idx)
    fm.learn_one(x, label)
    assert (w0_before - fm.intercept) / lr == pytest.approx(g0, abs=1e-6)
    assert (w_before - fm.get_weights(idx)) / lr == pytest.approx(gw, abs=1e-6)
    assert ((v - fm.get_latents(idx)) / lr).ravel() == pytest.approx(gv.ravel(), abs=1e-6)


def test_sgd_l2_is_applied_to_the_features_of_the_example() -> None:
    common = {"n_buckets": N_BUCKETS, "k": 2, "optimizer": "sgd", "learning_rate": 0.1}
    plain = FastFM(FMParams(**common, l2_w=0.0))  # type: ignore[arg-type]
    ridge = FastFM(FMParams(**common, l2_w=0.5))  # type: ignore[arg-type]
    for fm in (plain, ridge):
        fm.set_weights([7, 8], [1.0, -2.0])
        fm.learn_one(example([7], [1.0]), 1)
    # Only bucket 7 was in the example; L2 adds lr * l2 * w to its step.
    assert ridge.get_weights([7])[0] == pytest.approx(
        plain.get_weights([7])[0] - 0.1 * 0.5, abs=1e-15
    )
    assert ridge.get_weights([8])[0] == -2.0


def test_adagrad_step_follows_the_formula() -> None:
    lr, eps = 0.2, 0.01
    fm = FastFM(
        FMParams(n_buckets=N_BUCKETS, k=2, optimizer="adagrad", learning_rate=lr,
                 intercept_learning_rate=lr, adagrad_eps=eps, l2_w=0.0, init_std=0.0,
                 prior_ctr=0.5)
    )  # fmt: skip
    x = example([4], [0.5])
    acc_w, acc_0 = 0.0, 0.0
    w, w0 = 0.0, 0.0
    for label in (1, 1, 0):
        g = sigmoid(w0 + w * 0.5) - label
        acc_0 += g * g
        w0 -= lr / math.sqrt(acc_0 + eps) * g
        acc_w += (g * 0.5) ** 2
        w -= lr / math.sqrt(acc_w + eps) * g * 0.5
        fm.learn_one(x, label)
        assert fm.intercept == pytest.approx(w0, abs=1e-14)
        assert fm.get_weights([4])[0] == pytest.approx(w, abs=1e-14)


class AdamCoordinate:
    """Lazy Adam on one coordinate, in plain Python (Kingma & Ba 2015, defaults)."""

    def __init__(self, lr: float) -> None:
        self.lr, self.value, self.m, self.v, self.t = lr, 0.0, 0.0, 0.0, 0

    def step(self, grad: float) -> float:
        self.t += 1
        self.m = 0.9 * self.m + 0.1 * grad
        self.v = 0.999 * self.v + 0.001 * grad * grad
        m_hat, v_hat = self.m / (1 - 0.9**self.t), self.v / (1 - 0.999**self.t)
        self.value -= self.lr * m_hat / (math.sqrt(v_hat) + 1e-8)
        return self.value


def test_adam_steps_follow_the_formula_for_intercept_weights_and_latents() -> None:
    lr, lr_v = 0.05, 0.02
    fm = FastFM(
        FMParams(n_buckets=N_BUCKETS, k=1, optimizer="adam", learning_rate=lr,
                 intercept_learning_rate=lr, latent_learning_rate=lr_v, l2_w=0.0, l2_v=0.0,
                 init_std=0.0, prior_ctr=0.5)
    )  # fmt: skip
    v0 = {4: 0.3, 9: -0.2}
    fm.set_latents([4, 9], np.array([[0.3], [-0.2]]))
    w0, w4, w9 = AdamCoordinate(lr), AdamCoordinate(lr), AdamCoordinate(lr)
    lat = {j: AdamCoordinate(lr_v) for j in v0}
    for j, value in v0.items():
        lat[j].value = value
    x = example([4, 9], [0.5, 1.0])
    # Bucket 9 is also seen alone: its step count runs ahead of bucket 4's (lazy, per bucket).
    alone = example([9], [1.0])
    for xs, label in ((x, 1), (alone, 0), (x, 0), (x, 1), (alone, 1)):
        idx, vals = xs.indices.tolist(), xs.values.tolist()
        y = w0.value + sum({4: w4, 9: w9}[j].value * xv for j, xv in zip(idx, vals, strict=True))
        s = sum(lat[j].value * xv for j, xv in zip(idx, vals, strict=True))
        y += 0.5 * (s * s - sum((lat[j].value * xv) ** 2 for j, xv in zip(idx, vals, strict=True)))
        g = sigmoid(y) - label
        latent_grads = {
            j: g * (xv * s - lat[j].value * xv * xv) for j, xv in zip(idx, vals, strict=True)
        }
        w0.step(g)
        for j, xv in zip(idx, vals, strict=True):
            {4: w4, 9: w9}[j].step(g * xv)
            lat[j].step(latent_grads[j])
        fm.learn_one(xs, label)
        assert fm.intercept == pytest.approx(w0.value, abs=1e-12)
        assert fm.get_weights([4, 9]).tolist() == pytest.approx([w4.value, w9.value], abs=1e-12)
        got = fm.get_latents([4, 9])[:, 0].tolist()
        assert got == pytest.approx([lat[4].value, lat[9].value], abs=1e-12)
    # A rare feature's first step is a full lr (bias-corrected), whatever its gradient's size.
    assert abs(AdamCoordinate(lr).step(1e-3)) == pytest.approx(lr, rel=1e-4)


def test_adam_refused_step_restores_moments_and_step_counts() -> None:
    params = FMParams(n_buckets=N_BUCKETS, k=4, optimizer="adam", learning_rate=0.05)
    fm = FastFM(replace(params, l2_v=1e300))  # its next latent step overflows
    fm.load_state(trained(params, 20).state(), strict=False)
    before = fm.state()
    assert np.asarray(before["v_acc"]).shape == (N_BUCKETS, 8)  # two moments per latent
    fm.learn_one(example([5, 9, 5], [1.0, 0.5, 2.0]), 1)
    assert fm.refused_updates == 1
    after = fm.state()
    for key in ("lin", "v", "v_acc", "bias"):
        assert np.asarray(before[key]).tobytes() == np.asarray(after[key]).tobytes(), key


def test_ftrl_follows_the_closed_form_and_l1_zeroes_weak_weights() -> None:
    alpha, beta, l1, l2 = 0.1, 1.0, 0.6, 0.5
    params = FMParams(
        n_buckets=N_BUCKETS, k=2, optimizer="ftrl", ftrl_alpha=alpha, ftrl_beta=beta,
        l1_w=l1, l2_w=l2, init_std=0.0, intercept_learning_rate=0.0, prior_ctr=0.5,
    )  # fmt: skip
    fm = FastFM(params)
    z = n = w = 0.0
    for step in range(6):
        fm.learn_one(example([9], [1.0]), 1)
        g = sigmoid(w) - 1  # intercept frozen at 0, latents all 0
        sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / alpha
        z += g - sigma * w
        n += g * g
        w = (
            0.0
            if abs(z) <= l1
            else -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n)) / alpha + l2)
        )
        assert fm.get_weights([9])[0] == pytest.approx(w, abs=1e-14)
        if step == 0:
            assert w == 0.0  # |z| = 0.5 <= l1: exactly zero, the point of L1
    assert w > 0.0  # enough evidence for label 1 eventually moves it


def test_ftrl_set_weights_round_trips_through_z() -> None:
    fm = trained(FMParams(n_buckets=N_BUCKETS, k=2, optimizer="ftrl", l1_w=0.1))
    fm.set_weights([3, 4], [0.25, -0.5])
    fm.set_intercept(0.75)
    assert fm.get_weights([3, 4]).tolist() == pytest.approx([0.25, -0.5], abs=1e-15)
    # The next step starts from those weights: its gradient sees them.
    p = fm.predict_proba_one(example([3, 4], [1.0, 1.0]))
    fm.learn_one(example([3, 4], [1.0, 1.0]), 1)
    assert fm.predict_proba_one(example([3, 4], [1.0, 1.0])) > p


def test_gradient_is_clipped() -> None:
    fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=2, optimizer="sgd", intercept_learning_rate=1.0,
                         clip_gradient=0.1, prior_ctr=0.5))  # fmt: skip
    fm.learn_one(example([1], [1.0]), 1)  # g = p - 1 = -0.5, clipped to -0.1
    assert fm.intercept == pytest.approx(0.1, abs=1e-15)


def test_processing_is_deterministic() -> None:
    batch = random_batches(300, 12, N_BUCKETS, batch_size=300, vocabulary=50, seed=4)[0]
    for optimizer in ("sgd", "adagrad", "ftrl"):
        params = FMParams(n_buckets=N_BUCKETS, k=5, optimizer=optimizer, seed=9)
        a, b = FastFM(params), FastFM(params)
        pa, pb = a.run_batch(batch), b.run_batch(batch)
        assert pa.tobytes() == pb.tobytes()
        for key, value in a.state().items():
            other = b.state()[key]
            assert np.asarray(value).tobytes() == np.asarray(other).tobytes(), key


def test_state_arrays_are_aligned_to_cache_lines() -> None:
    fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=8))
    fm.load_state(fm.state())
    for array in (fm._lin, fm._v, fm._v_acc):
        assert array.ctypes.data % 64 == 0
        assert array.flags.c_contiguous


def test_latent_init_is_seeded_normal() -> None:
    a = FastFM(FMParams(n_buckets=1 << 14, k=8, init_std=0.05, seed=3))
    b = FastFM(FMParams(n_buckets=1 << 14, k=8, init_std=0.05, seed=3))
    c = FastFM(FMParams(n_buckets=1 << 14, k=8, init_std=0.05, seed=4))
    v = a.get_latents(np.arange(1 << 14))
    assert v.tobytes() == b.get_latents(np.arange(1 << 14)).tobytes()
    assert v.tobytes() != c.get_latents(np.arange(1 << 14)).tobytes()
    assert v.std() == pytest.approx(0.05, rel=0.02)
    assert abs(v.mean()) < 0.002


def bad_batch(**change: object) -> OpBatch:
    fields: dict[str, object] = {
        "indptr": np.array([0, 2, 3], dtype=np.int64),
        "indices": np.array([1, 2, 3], dtype=np.int32),
        "values": np.ones(3),
        "op_kind": np.array([OP_SCORE, OP_LEARN], dtype=np.int8),
        "op_row": np.array([0, 1], dtype=np.int64),
        "op_label": np.array([0, 1], dtype=np.int8),
    }
    fields.update(change)
    return OpBatch(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"indices": np.array([1, 2, N_BUCKETS], dtype=np.int32)}, "outside"),
        ({"indices": np.array([1, -2, 3], dtype=np.int32)}, "outside"),
        ({"values": np.ones(2)}, "lengths"),
        ({"indptr": np.array([0, 3, 2], dtype=np.int64)}, "indptr"),
        ({"indptr": np.array([0, 2, 4], dtype=np.int64)}, "indptr"),
        ({"op_row": np.array([0, 2], dtype=np.int64)}, "op_row"),
        ({"op_kind": np.array([0, 3], dtype=np.int8)}, "op_kind"),  # 2 is OP_LEARN_FNW
        ({"op_weight": np.array([1.0, -1.0])}, "weight"),
        ({"op_weight": np.array([1.0, np.nan])}, "weight"),
        ({"op_label": np.array([0, 2], dtype=np.int8)}, "label"),
        ({"op_label": np.array([0], dtype=np.int8)}, "lengths"),
    ],
)
def test_invalid_batches_are_rejected_before_the_kernel_runs(
    change: dict[str, object], message: str
) -> None:
    fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=2))
    before = fm.state()
    with pytest.raises(ValueError, match=message):
        fm.run_batch(bad_batch(**change))
    assert all(
        np.asarray(v).tobytes() == np.asarray(fm.state()[k]).tobytes() for k, v in before.items()
    )


def test_score_then_learn_reuses_the_forward_pass_exactly() -> None:
    batch = random_batches(200, 15, N_BUCKETS, batch_size=200, vocabulary=30, seed=1)[0]
    params = FMParams(n_buckets=N_BUCKETS, k=8)
    paired, learn_only = FastFM(params), FastFM(params)
    p_paired = paired.run_batch(batch)
    learns = OpBatch(batch.indptr, batch.indices, batch.values, batch.op_kind[1::2].copy(),
                     batch.op_row[1::2].copy(), batch.op_label[1::2].copy())  # fmt: skip
    p_learn = learn_only.run_batch(learns)
    assert p_paired[0::2].tobytes() == p_paired[1::2].tobytes()
    assert p_paired[1::2].tobytes() == p_learn.tobytes()


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("n_buckets", 1000),
        ("n_buckets", 0),
        ("k", -1),
        ("optimizer", "lbfgs"),
        ("learning_rate", 0.0),
        ("latent_learning_rate", float("nan")),
        ("intercept_learning_rate", -1.0),
        ("l1_w", 0.1),  # only with ftrl
        ("l2_w", -1e-3),
        ("ftrl_alpha", 0.0),
        ("adagrad_eps", 0.0),
        ("init_std", -0.1),
        ("seed", -1),
        ("clip_gradient", 0.0),
        ("k", 2.5),
        ("learning_rate", "fast"),
        ("k", True),
    ],
)
def test_invalid_params_name_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        FMParams(**{setting: value})  # type: ignore[arg-type]
    assert info.value.setting == setting
    assert str(info.value).startswith(f"{setting}: ")


def test_params_accept_ints_for_floats_and_round_trip() -> None:
    params = FMParams(optimizer="ftrl", l1_w=1, learning_rate=1)
    assert isinstance(params.l1_w, float)
    assert FMParams.from_state(params.to_state()) == params


def test_engine_throughput_reports_examples_per_second() -> None:
    rate = engine_throughput(20_000, n_fields=10, k=4, n_buckets=1 << 14)
    print(f"engine throughput (small smoke run): {rate:,.0f} examples/s")
    assert rate > 10_000


def test_a_new_model_starts_at_the_prior_ctr() -> None:
    fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=2, prior_ctr=0.02))
    assert fm.predict_proba_one(example([], [])) == pytest.approx(0.02, rel=1e-12)


def _one(kind: int, label: int, weight: float) -> OpBatch:
    return OpBatch(
        indptr=np.array([0, 3], dtype=np.int64),
        indices=np.array([3, 17, 40], dtype=np.int32),
        values=np.array([1.0, 1.0, 0.5]),
        op_kind=np.array([kind], dtype=np.int8),
        op_row=np.array([0], dtype=np.int64),
        op_label=np.array([label], dtype=np.int8),
        op_weight=np.array([weight]),
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "ftrl", "adam"])
def test_an_importance_weight_scales_the_loss_gradient(optimizer: str) -> None:
    params = FMParams(n_buckets=N_BUCKETS, k=2, optimizer=optimizer, l2_w=0.0, l2_v=0.0)
    heavy, light, none = FastFM(params), FastFM(params), FastFM(params)
    heavy.run_batch(_one(OP_LEARN, 1, 2.0))
    light.run_batch(_one(OP_LEARN, 1, 0.5))
    none.run_batch(_one(OP_LEARN, 1, 0.0))
    x = SparseExample(np.array([3, 17, 40], dtype=np.int32), np.array([1.0, 1.0, 0.5]))
    p0 = FastFM(params).predict_proba_one(x)
    assert heavy.predict_proba_one(x) > light.predict_proba_one(x) > p0
    # Weight zero learns nothing (and leaves the optimizer's sums as they were)...
    assert all(
        np.array_equal(np.asarray(v), np.asarray(none.state()[k]))
        for k, v in FastFM(params).state().items()
        if k != "counters"
    )
    # ...but the example was consumed.
    assert none.n_learned == 1
    if optimizer == "sgd":  # plain SGD: the first step is exactly proportional to the weight
        w = [e.get_weights([3])[0] for e in (heavy, light)]
        assert w[0] == pytest.approx(4 * w[1])


def test_fake_negative_weights_come_from_the_current_p() -> None:
    """OP_LEARN_FNW on label 1 is OP_LEARN weighted 1 + p, on label 0 (1 - p)(1 + p)."""
    params = FMParams(n_buckets=N_BUCKETS, k=2, optimizer="sgd")
    x = SparseExample(np.array([3, 17, 40], dtype=np.int32), np.array([1.0, 1.0, 0.5]))
    for label in (0, 1):
        fnw, weighted = FastFM(params), FastFM(params)
        p = fnw.predict_proba_one(x)
        fnw.run_batch(_one(OP_LEARN_FNW, label, 1.0))
        weighted.run_batch(_one(OP_LEARN, label, (1 + p) if label else (1 - p) * (1 + p)))
        assert fnw.state()["lin"].tobytes() == weighted.state()["lin"].tobytes()
        assert fnw.state()["v"].tobytes() == weighted.state()["v"].tobytes()


def test_adaptive_steps_never_overshoot_the_label_whatever_the_rate() -> None:
    """The importance-invariant step follows the loss's own flow: even an absurd rate moves
    p towards the label without passing it, where a plain AdaGrad step flies off."""
    x = example([3, 17, 40, 41, 42, 43], [1.0] * 6)
    for label in (0, 1):
        for rate in (0.5, 1e3, 1e9):
            fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=2, optimizer="adaptive",
                                 learning_rate=rate, latent_learning_rate=rate,
                                 intercept_learning_rate=rate, prior_ctr=0.5))  # fmt: skip
            before = fm.predict_proba_one(x)
            fm.learn_one(x, label)
            after = fm.predict_proba_one(x)
            assert (after > before) == (label == 1), (label, rate)
            assert 0.0 < after < 1.0 and fm.refused_updates == 0
    plain = FastFM(FMParams(n_buckets=N_BUCKETS, k=0, optimizer="sgd", learning_rate=1e3,
                            intercept_learning_rate=1e3, prior_ctr=0.5))  # fmt: skip
    plain.learn_one(x, 1)
    plain.learn_one(x, 0)
    assert plain.predict_proba_one(x) < 1e-6, "an Euler step at this rate overshoots"


def test_adaptive_linear_model_does_not_care_how_a_numeric_feature_is_scaled() -> None:
    """Normalized updates: each feature is taken relative to the largest |x| it has shown."""
    rng = np.random.default_rng(4)
    rows = [(rng.integers(0, 50, size=3), rng.random(), rng.random() < 0.3) for _ in range(300)]
    predictions = []
    for scale in (1.0, 1000.0):
        fm = FastFM(FMParams(n_buckets=N_BUCKETS, k=0, optimizer="adaptive", l2_w=0.0))
        seen = []
        for buckets, amount, label in rows:
            x = example([*buckets.tolist(), 999], [1.0, 1.0, 1.0, amount * scale])
            seen.append(fm.predict_proba_one(x))
            fm.learn_one(x, int(label))
        predictions.append(np.array(seen))
    np.testing.assert_allclose(predictions[0], predictions[1], rtol=1e-9)
