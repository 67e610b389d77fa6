"""ProgressiveValidation against straightforward reference computations."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from stream_fm.checkpoint import CheckpointStore
from stream_fm.errors import CheckpointCorrupt
from stream_fm.evaluate import ProgressiveValidation, auc, log_loss

EPS = 1e-15


def ref_loss(p: float, y: int) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return -math.log(p) if y else -math.log(1 - p)


def ref_entropy(ctr: float) -> float:
    return -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))


def ref_auc(p: list[float], y: list[int]) -> float:
    """Brute force over all positive/negative pairs."""
    pos = [s for s, label in zip(p, y, strict=True) if label]
    neg = [s for s, label in zip(p, y, strict=True) if not label]
    if not pos or not neg:
        return math.nan
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def stream(seed: int, n: int, ties: bool = False) -> tuple[list[float], list[int]]:
    rng = random.Random(seed)
    ps, ys = [], []
    for _ in range(n):
        p = rng.random()
        if ties:
            p = round(p, 1)  # many exactly equal scores, plus exact 0 and 1
        y = int(rng.random() < 0.3 + 0.4 * p)
        ps.append(p)
        ys.append(y)
    return ps, ys


def close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize(("window", "n"), [(1, 10), (7, 5), (7, 50), (64, 300), (1000, 300)])
def test_metrics_match_reference(window: int, n: int) -> None:
    ps, ys = stream(window + n, n, ties=window == 64)
    pv = ProgressiveValidation(window=window)
    for i, (p, y) in enumerate(zip(ps, ys, strict=True)):
        assert close(pv.update(p, y), ref_loss(p, y))
        seen_p, seen_y = ps[: i + 1], ys[: i + 1]
        last_p, last_y = seen_p[-window:], seen_y[-window:]
        losses = [ref_loss(a, b) for a, b in zip(seen_p, seen_y, strict=True)]
        window_losses = losses[-window:]
        assert pv.examples == i + 1
        assert pv.positives == pv.label_sum == sum(seen_y)
        assert close(pv.prediction_sum, sum(seen_p))
        assert close(pv.logloss_sum, sum(losses))
        assert close(pv.logloss, sum(losses) / len(losses))
        ctr = sum(seen_y) / len(seen_y)
        expected_ne = pv.logloss / ref_entropy(ctr) if 0 < ctr < 1 else math.nan
        assert close(pv.normalized_entropy, expected_ne)
        assert close(pv.calibration, sum(seen_p) / sum(seen_y) if sum(seen_y) else math.nan)
        assert pv.window_examples == len(last_p)
        assert pv.window_positives == sum(last_y)
        assert close(pv.logloss_window, sum(window_losses) / len(window_losses))
        window_ctr = sum(last_y) / len(last_y)
        expected_ne_window = (
            pv.logloss_window / ref_entropy(window_ctr) if 0 < window_ctr < 1 else math.nan
        )
        assert close(pv.normalized_entropy_window, expected_ne_window)
        assert close(pv.calibration_window, sum(last_p) / sum(last_y) if sum(last_y) else math.nan)
        assert close(pv.auc_window, ref_auc(last_p, last_y))


def test_auc_handles_ties_and_missing_classes() -> None:
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert auc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    assert math.isnan(auc(np.array([0.1, 0.9]), np.array([1, 1])))
    assert math.isnan(auc(np.array([]), np.array([], dtype=np.int8)))
    ps, ys = stream(3, 400, ties=True)
    assert close(auc(np.array(ps), np.array(ys)), ref_auc(ps, ys))


def test_empty_accumulator_is_all_nan() -> None:
    pv = ProgressiveValidation(window=10)
    for value in (
        pv.logloss,
        pv.normalized_entropy,
        pv.calibration,
        pv.logloss_window,
        pv.normalized_entropy_window,
        pv.auc_window,
    ):
        assert math.isnan(value)
    report = pv.report()
    assert report["examples"] == 0
    assert report["logloss"] is None
    json.dumps(report, allow_nan=False)


def test_clipping_keeps_certain_mistakes_finite() -> None:
    pv = ProgressiveValidation()
    assert close(pv.update(0.0, 1), -math.log(EPS))
    assert close(pv.update(1.0, 0), -math.log1p(-(1 - EPS)))
    assert pv.update(1.0, 1) == pytest.approx(0.0, abs=1e-14)
    assert math.isfinite(pv.logloss)


@pytest.mark.parametrize(
    ("p", "y"), [(math.nan, 1), (-0.1, 0), (1.5, 1), (0.5, 2), (0.5, -1), (0.5, 0.5)]
)
def test_bad_input_is_refused(p: float, y: int) -> None:
    pv = ProgressiveValidation()
    with pytest.raises(ValueError):
        pv.update(p, y)
    with pytest.raises(ValueError):
        pv.update_many(np.array([0.5, p]), np.array([0, y]))
    assert pv.examples == 0


def test_update_many_equals_repeated_update() -> None:
    ps, ys = stream(11, 2_000, ties=True)
    one = ProgressiveValidation(window=300, series_every=250)
    for p, y in zip(ps, ys, strict=True):
        one.update(p, y)
    many = ProgressiveValidation(window=300, series_every=250)
    rng = random.Random(5)
    start = 0
    batch_sums = 0.0
    while start < len(ps):
        size = rng.choice([0, 1, 7, 299, 300, 301, 650])  # smaller, equal, longer than window
        batch_sums += many.update_many(np.array(ps[start : start + size]), ys[start : start + size])
        start += size
    # Bitwise, not approximately: batching must not change what operators see.
    assert many.examples == one.examples
    assert many.positives == one.positives
    assert many.window_positives == one.window_positives
    assert many.logloss_sum == one.logloss_sum
    assert many.prediction_sum == one.prediction_sum
    assert close(batch_sums, one.logloss_sum)
    assert many.logloss_window == one.logloss_window
    assert many.auc_window == one.auc_window
    assert (
        many.series
        == one.series
        == [(i, s[1], s[2]) for i, s in zip(range(250, 2001, 250), one.series, strict=True)]
    )
    assert many.report() == one.report()
    np.testing.assert_array_equal(many._ring_loss, one._ring_loss)
    # The window holds the same examples (order inside the ring is irrelevant).
    assert sorted(many._ring_p.tolist()) == sorted(one._ring_p.tolist())


@pytest.mark.parametrize("first_batch", [3, 10, 23, 40])
def test_batch_longer_than_window_then_single_updates(first_batch: int) -> None:
    ps, ys = stream(8, first_batch + 7)
    pv = ProgressiveValidation(window=10)
    pv.update(0.5, 1)  # start the ring off slot 0
    pv.update_many(np.array(ps[:first_batch]), np.array(ys[:first_batch]))
    for seen in range(first_batch + 1, len(ps) + 1):
        pv.update(ps[seen - 1], ys[seen - 1])
        window_p = ([0.5, *ps[:seen]])[-10:]
        window_y = ([1, *ys[:seen]])[-10:]
        padding = [0.0] * (10 - len(window_p))  # slots not written yet
        assert sorted(pv._ring_p.tolist()) == sorted(window_p + padding)
        assert pv.window_positives == sum(window_y)
        assert close(pv.auc_window, ref_auc(window_p, window_y))


def test_numpy_scalars_are_stored_as_python_numbers() -> None:
    pv = ProgressiveValidation(window=4)
    for _ in range(300):
        pv.update(np.float32(0.25), np.int8(1))  # np.int8 would overflow at 128
    assert type(pv.positives) is int
    assert pv.positives == 300
    assert type(pv.prediction_sum) is float
    assert pv.logloss == log_loss(0.25, 1) or close(pv.logloss, log_loss(0.25, 1))


def test_series_points_use_the_window_at_that_moment() -> None:
    ps, ys = stream(2, 100)
    pv = ProgressiveValidation(window=20, series_every=30)
    reference = ProgressiveValidation(window=20)
    expected = []
    for i, (p, y) in enumerate(zip(ps, ys, strict=True), start=1):
        pv.update(p, y)
        reference.update(p, y)
        if i % 30 == 0:
            expected.append((i, reference.logloss_window, reference.normalized_entropy_window))
    assert pv.series == expected
    assert ProgressiveValidation(window=20).series == []


def test_report_has_the_replay_fields_and_is_json_ready() -> None:
    ps, ys = stream(9, 500)
    pv = ProgressiveValidation(window=100)
    pv.update_many(np.array(ps), np.array(ys))
    report = pv.report()
    for key in ("examples", "positives", "logloss", "normalized_entropy", "auc", "calibration"):
        assert report[key] is not None, key
    assert report["logloss_window"] == pv.logloss_window
    assert report["auc"] == pv.auc_window
    json.dumps(report, allow_nan=False)


def test_state_round_trip_continues_identically(tmp_path: Path) -> None:
    ps, ys = stream(4, 1_000, ties=True)
    straight = ProgressiveValidation(window=128, series_every=100)
    for p, y in zip(ps, ys, strict=True):
        straight.update(p, y)

    first = ProgressiveValidation(window=128, series_every=100)
    first.update_many(np.array(ps[:437]), np.array(ys[:437]))
    store = CheckpointStore(tmp_path)
    store.save({"evaluator": first.state()})
    loaded = store.load_latest()
    assert loaded is not None
    restored = ProgressiveValidation.from_state(loaded[0]["evaluator"])
    assert restored.report() == first.report()
    assert restored.series == first.series
    for p, y in zip(ps[437:], ys[437:], strict=True):
        restored.update(p, y)
    assert restored.examples == straight.examples
    assert restored.window_positives == straight.window_positives
    assert close(restored.logloss, straight.logloss)
    assert close(restored.logloss_window, straight.logloss_window)
    assert close(restored.auc_window, straight.auc_window)
    assert [s[0] for s in restored.series] == [s[0] for s in straight.series]


def test_malformed_state_raises_checkpoint_corrupt() -> None:
    good = ProgressiveValidation(window=4).state()
    for broken in (
        {**good, "format": "x"},
        {**good, "window": 0},
        {**good, "ring_p": np.zeros(3)},
        {**good, "ring_pos": 9},
        {**good, "ring_count": 2},  # more than the examples seen
        {**good, "logloss_sum": "0.0"},
    ):
        with pytest.raises(CheckpointCorrupt):
            ProgressiveValidation.from_state(broken)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        ProgressiveValidation(window=0)
    with pytest.raises(ValueError):
        ProgressiveValidation(series_every=-1)
    with pytest.raises(ValueError):
        ProgressiveValidation().update_many(np.zeros(3), np.zeros(2))
