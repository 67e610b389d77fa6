"""The engine protocol, checked on every engine: FastFM with each optimizer and RiverFM."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from stream_fm.errors import CheckpointError, StreamFMError
from stream_fm.model import (
    OP_LEARN,
    OP_SCORE,
    Engine,
    FastFM,
    FMParams,
    ModelStateMismatch,
    OpBatch,
    RiverFM,
    SparseExample,
)
from stream_fm.model.delta import DeltaTracker

N_BUCKETS = 1 << 12
K = 4
OPTIMIZERS = ("sgd", "adagrad", "ftrl")


def tracked(params: FMParams) -> DeltaTracker:
    """FastFM whose increments are taken for a group's exchange: the same engine."""
    return DeltaTracker(FastFM(params))


AnyEngine = FastFM | RiverFM | DeltaTracker
ENGINES: dict[str, tuple[Callable[[FMParams], AnyEngine], str]] = {
    **{f"fast-{opt}": (FastFM, opt) for opt in (*OPTIMIZERS, "adaptive", "adam")},
    **{f"river-{opt}": (RiverFM, opt) for opt in OPTIMIZERS},
    **{f"tracked-{opt}": (tracked, opt) for opt in ("sgd", "adaptive", "adam")},
    # interactions="all": every pair of features as a linear-only cross.
    **{f"fast-{opt}+crosses": (FastFM, opt) for opt in ("sgd", "adaptive", "adam")},
    "tracked-adaptive+crosses": (tracked, "adaptive"),
}


def make(name: str, **overrides: float | int | str) -> AnyEngine:
    cls, optimizer = ENGINES[name]
    settings: dict[str, float | int | str] = {
        "n_buckets": N_BUCKETS,
        "k": K,
        "optimizer": optimizer,
        "init_std": 0.1,
        "seed": 5,
    }
    if name.endswith("+crosses"):
        settings["interactions"] = "all"
    settings.update(overrides)
    return cls(FMParams(**settings))  # type: ignore[arg-type]


@pytest.fixture(params=sorted(ENGINES))
def name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def random_examples(n: int, seed: int = 0, n_fields: int = 8) -> list[SparseExample]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.choice(N_BUCKETS // 4, size=n_fields, replace=False).astype(np.int32)
        vals = np.where(rng.random(n_fields) < 0.7, 1.0, rng.uniform(-1.5, 1.5, n_fields))
        out.append(SparseExample(idx, vals))
    return out


def to_batch(examples: list[SparseExample], ops: list[tuple[int, int, int]]) -> OpBatch:
    """``ops`` = (kind, row, label) triples over ``examples``."""
    lengths = [len(x.indices) for x in examples]
    return OpBatch(
        indptr=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        indices=np.concatenate([x.indices for x in examples]).astype(np.int32),
        values=np.concatenate([x.values for x in examples]).astype(np.float64),
        op_kind=np.array([o[0] for o in ops], dtype=np.int8),
        op_row=np.array([o[1] for o in ops], dtype=np.int64),
        op_label=np.array([o[2] for o in ops], dtype=np.int8),
    )


def train(engine: AnyEngine, n: int = 200, seed: int = 1) -> list[SparseExample]:
    examples = random_examples(n, seed)
    rng = np.random.default_rng(seed)
    for x in examples:
        engine.learn_one(x, int(rng.random() < 0.3))
    return examples


def same_state(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, np.ndarray):
            if not isinstance(other, np.ndarray) or value.dtype != other.dtype:
                return False
            if value.tobytes() != other.tobytes() or value.shape != other.shape:
                return False
        elif type(value) is not type(other) or value != other:
            return False
    return True


def test_engines_follow_the_protocol(name: str) -> None:
    assert isinstance(make(name), Engine)


def test_probability_is_strictly_between_0_and_1(name: str) -> None:
    engine = make(name)
    examples = train(engine)
    for x in examples[:50]:
        p = engine.predict_proba_one(x)
        assert isinstance(p, float)
        assert 0.0 < p < 1.0


def test_predict_does_not_change_the_model(name: str) -> None:
    engine = make(name)
    train(engine, n=50)
    before = engine.state()
    unseen = random_examples(20, seed=99)  # includes buckets river has not drawn latents for
    first = [engine.predict_proba_one(x) for x in unseen]
    assert same_state(before, engine.state())
    assert first == [engine.predict_proba_one(x) for x in unseen]


@pytest.mark.parametrize("label", [0, 1])
def test_learning_moves_p_toward_the_label(name: str, label: int) -> None:
    if name == "river-ftrl":
        pytest.skip(
            "river's FTRLProximal sets each weight from z *before* adding the current "
            "gradient, so one step applies the previous examples' update"
        )
    engine = make(name)
    train(engine, n=30)
    for x in random_examples(10, seed=7):
        if name.endswith("adaptive+crosses"):
            # The normalized update rescales a weight when its feature shows a larger |x|
            # than before (VW's, for -q too): a cross of two small values (0.02 x 0.03) sets a
            # tiny scale, and the next larger one shrinks that weight before the step. The
            # step itself moves p toward the label once the example's scales are known.
            engine.learn_one(x, label)
        before = engine.predict_proba_one(x)
        engine.learn_one(x, label)
        after = engine.predict_proba_one(x)
        assert (after > before) if label == 1 else (after < before)


def test_n_learned_counts_learn_ops(name: str) -> None:
    engine = make(name)
    assert engine.n_learned == 0
    x = random_examples(1)[0]
    engine.predict_proba_one(x)
    engine.learn_one(x, 1)
    engine.learn_one(x, 0)
    assert engine.n_learned == 2


def test_state_round_trip_reproduces_the_model(name: str) -> None:
    engine = make(name)
    train(engine)
    state = engine.state()
    restored = make(name)
    restored.load_state(state)
    assert same_state(state, restored.state())
    assert restored.n_learned == engine.n_learned
    # Same predictions now and after more (identical) learning, unseen buckets included.
    more = random_examples(100, seed=42)
    for i, x in enumerate(more):
        assert restored.predict_proba_one(x) == engine.predict_proba_one(x)
        engine.learn_one(x, i % 2)
        restored.learn_one(x, i % 2)
    assert same_state(engine.state(), restored.state())


def test_state_holds_only_arrays_and_plain_values(name: str) -> None:
    engine = make(name)
    train(engine, n=20)
    for key, value in engine.state().items():
        assert isinstance(key, str)
        assert type(value) in (int, float, str, np.ndarray), key
        if isinstance(value, np.ndarray):
            assert value.dtype != object, key


def test_state_is_a_snapshot(name: str) -> None:
    engine = make(name)
    train(engine, n=20)
    state = engine.state()
    copy = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state.items()}
    train(engine, n=20, seed=3)
    assert same_state(state, copy)


def test_loading_a_mismatched_state_fails_clearly(name: str) -> None:
    engine = make(name)
    train(engine, n=10)
    state = engine.state()
    other_k = make(name, k=K + 1)
    with pytest.raises(ModelStateMismatch, match="k: 4 != 5"):
        other_k.load_state(state)
    other_lr = make(name, learning_rate=0.7)  # not the rate it was built with
    with pytest.raises(ModelStateMismatch, match="learning_rate"):
        other_lr.load_state(state)
    assert issubclass(ModelStateMismatch, CheckpointError)
    assert issubclass(ModelStateMismatch, StreamFMError)


def test_non_strict_load_keeps_configured_step_sizes(name: str) -> None:
    engine = make(name)
    examples = train(engine, n=10)
    retuned = make(name, learning_rate=0.5)
    retuned.load_state(engine.state(), strict=False)
    assert retuned.predict_proba_one(examples[0]) == engine.predict_proba_one(examples[0])
    with pytest.raises(ModelStateMismatch, match="n_buckets"):
        make(name, n_buckets=N_BUCKETS * 2).load_state(engine.state(), strict=False)


def test_loading_another_engines_state_fails(name: str) -> None:
    engine = make(name)
    other = "fast-sgd" if name.startswith("river") else "river-sgd"
    with pytest.raises(ModelStateMismatch, match="engine"):
        engine.load_state(make(other).state())


def test_run_batch_equals_the_same_ops_one_by_one(name: str) -> None:
    examples = random_examples(60, seed=11)
    rng = np.random.default_rng(3)
    ops: list[tuple[int, int, int]] = []
    for r in range(len(examples)):
        label = int(rng.random() < 0.4)
        ops.append((OP_SCORE, r, 0))
        if r % 3 == 0:
            ops.append((OP_LEARN, r, label))  # learn right after its score
        if r >= 5 and r % 4 == 1:
            ops.append((OP_LEARN, r - 5, label))  # delayed learn of an older row
        if r % 7 == 0:
            ops.append((OP_SCORE, r, 0))
            ops.append((OP_LEARN, r, 1 - label))  # the same row learned twice
    batched, single = make(name), make(name)
    train(batched, n=20)
    train(single, n=20)
    got = batched.run_batch(to_batch(examples, ops))
    want = []
    for kind, r, label in ops:
        want.append(single.predict_proba_one(examples[r]))
        if kind == OP_LEARN:
            single.learn_one(examples[r], label)
    assert got.dtype == np.float64
    assert got.tolist() == want
    assert same_state(batched.state(), single.state())


def test_run_batch_with_no_ops(name: str) -> None:
    engine = make(name)
    out = engine.run_batch(to_batch(random_examples(2), []))
    assert out.shape == (0,)


def test_huge_value_is_refused_and_counted(name: str) -> None:
    engine = make(name)
    examples = train(engine, n=20)
    before = engine.state()
    x = examples[0]
    values = x.values.copy()
    values[2] = 1e300
    huge = SparseExample(x.indices, values)
    p = engine.predict_proba_one(huge)
    assert 0.0 < p < 1.0
    engine.learn_one(huge, 0)
    engine.learn_one(huge, 1)
    assert engine.refused_updates == 2
    assert engine.n_learned == before_n_learned(before) + 2
    after = engine.state()
    for key in before:
        if key not in ("counters", "n_learned", "refused"):
            assert same_state({key: before[key]}, {key: after[key]}), key
    # The model still works.
    assert 0.0 < engine.predict_proba_one(x) < 1.0


def test_overflowing_step_is_rolled_back(name: str) -> None:
    # A finite score whose latent step overflows: intercept and weights are stepped first,
    # so this checks the whole step is undone, not just the part that overflowed.
    engine = make(name, latent_learning_rate=1e300, l2_v=1e300)
    x = random_examples(1, seed=4)[0]
    before = engine.state()
    p = engine.predict_proba_one(x)
    engine.learn_one(x, 1)
    assert engine.refused_updates == 1
    after = engine.state()
    for key in before:
        if key not in ("counters", "n_learned", "refused"):
            assert same_state({key: before[key]}, {key: after[key]}), key
    assert engine.predict_proba_one(x) == p


def before_n_learned(state: dict[str, object]) -> int:
    if "counters" in state:
        counters = state["counters"]
        assert isinstance(counters, np.ndarray)
        return int(counters[0])
    value = state["n_learned"]
    assert isinstance(value, int)
    return value


def test_labels_other_than_0_and_1_are_rejected(name: str) -> None:
    engine = make(name)
    x = random_examples(1)[0]
    with pytest.raises(ValueError, match="label"):
        engine.learn_one(x, 2)
    with pytest.raises(ValueError, match="label"):
        engine.run_batch(to_batch([x], [(OP_LEARN, 0, 3)]))
