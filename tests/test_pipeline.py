"""The shared pipeline: join semantics, served-before-learned evaluation, determinism."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from stream_fm.events import EventDecoder
from stream_fm.features import FeatureHasher
from stream_fm.join import CLICK_EARLY, FAKE_NEGATIVE, LABEL_POLICIES, WINDOW
from stream_fm.model import FastFM, FMParams
from stream_fm.pipeline import Pipeline
from stream_fm.tools.simulate import SimulationParams, Simulator

BITS = 14


def _pipeline(
    window_ms: int = 1000, max_pending: int = 1000, label_policy: str = CLICK_EARLY
) -> Pipeline:
    """The join semantics below are those of ``click_early``; each policy has its own tests."""
    engine = FastFM(FMParams(n_buckets=1 << BITS, k=4))
    return Pipeline(
        engine,
        EventDecoder(FeatureHasher(bits=BITS)),
        window_ms,
        max_pending,
        auc_window=100,
        label_policy=label_policy,
    )


def _imp(ident: str, ts: int, **features: object) -> tuple[int, bytes]:
    return 0, orjson.dumps({"type": "impression", "id": ident, "ts": ts, "features": features})


def _click(ident: str, ts: int) -> tuple[int, bytes]:
    return 0, orjson.dumps({"type": "click", "id": ident, "ts": ts})


def test_positive_on_click_negative_when_window_closes() -> None:
    pipe = _pipeline(window_ms=1000)
    first = pipe.process([_imp("a", 0, site="s1"), _imp("b", 10, site="s2"), _click("a", 500)])
    assert [p.id for p in first.predictions] == ["a", "b"]
    assert [(x.id, x.label, x.cause) for x in first.learned] == [("a", 1, "click")]
    # The loss uses the p served for "a", not a p computed after learning.
    assert first.learned[0].p_served == first.predictions[0].p_click
    assert math.isclose(first.logloss_sum, -math.log(first.predictions[0].p_click))
    assert first.click_delays_ms == [500]
    second = pipe.process([_imp("c", 1011, site="s3")])  # watermark 1011 > 10 + 1000
    assert [(x.id, x.label, x.cause) for x in second.learned] == [("b", 0, "window_closed")]
    assert second.learned[0].p_served == first.predictions[1].p_click
    assert pipe.evaluator.examples == 2


def test_model_version_counts_examples_learned_before_scoring() -> None:
    pipe = _pipeline(window_ms=1000)
    result = pipe.process([_imp("a", 0, s="1"), _click("a", 1), _imp("b", 2, s="2")])
    assert [p.model_version for p in result.predictions] == [0, 1]
    later = pipe.process([_imp("c", 3, s="3")])
    assert later.predictions[0].model_version == 1 == pipe.engine.n_learned


def test_labeled_is_scored_then_learned_and_invalid_keeps_its_position() -> None:
    pipe = _pipeline()
    labeled = orjson.dumps(
        {"type": "labeled", "id": "x", "ts": 5, "label": 1, "features": {"a": "b"}}
    )
    result = pipe.process([(0, b"{oops"), (0, labeled), (0, b'{"type":"click"}')])
    assert [(r.position, r.reason) for r in result.invalid] == [(0, "not_json"), (2, "missing_id")]
    assert [(x.id, x.label, x.cause) for x in result.learned] == [("x", 1, "labeled")]
    assert result.predictions == []  # labeled examples are joined upstream: nothing to publish
    assert result.events_by_type == {"labeled": 1}


def test_orphan_late_duplicate_are_counted_not_fatal() -> None:
    pipe = _pipeline(window_ms=100)
    pipe.process(
        [
            _imp("a", 0, s="1"),
            _imp("a", 1, s="1"),
            _click("nobody", 2),
            _imp("b", 300, s="2"),
            _click("a", 301),
        ]
    )
    counters = pipe.join_counters()
    assert counters["duplicate_impressions"] == 1
    assert counters["orphan_clicks"] == 1
    assert counters["late_clicks"] == 1


def _simulated_records(n: int) -> list[tuple[int, bytes]]:
    params = SimulationParams(
        n_impressions=n,
        n_fields=8,
        max_cardinality=500,
        seed=5,
        impressions_per_s=50,
        attribution_window_s=60,
    )
    return [(0, orjson.dumps(e)) for e in Simulator(params).generate().events()]


@pytest.mark.parametrize("policy", LABEL_POLICIES)
def test_batching_does_not_change_the_model(policy: str) -> None:
    records = _simulated_records(3000)
    whole, pieces = (
        _pipeline(window_ms=60_000, max_pending=10_000, label_policy=policy),
        _pipeline(window_ms=60_000, max_pending=10_000, label_policy=policy),
    )
    whole.process(records)
    for start in range(0, len(records), 97):
        pieces.process(records[start : start + 97])
    a, b = whole.engine.state(), pieces.engine.state()
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            assert value.tobytes() == b[key].tobytes(), key  # type: ignore[union-attr]
    # The model is bitwise equal; the loss sum only differs by summation order.
    assert whole.evaluator.logloss_sum == pytest.approx(pieces.evaluator.logloss_sum, rel=1e-12)


@pytest.mark.parametrize("policy", LABEL_POLICIES)
def test_flush_learns_every_pending_impression(policy: str) -> None:
    records = _simulated_records(500)
    pipe = _pipeline(window_ms=60_000, max_pending=10_000, label_policy=policy)
    pipe.process(records)
    pipe.flush()
    assert pipe.pending_count == 0
    assert pipe.evaluator.examples == 500


def _learns(pipe: Pipeline, records: list[tuple[int, bytes]]) -> tuple[list[int], list[str]]:
    """(model versions served, final labels evaluated) of one batch."""
    result = pipe.process(records)
    return [p.model_version for p in result.predictions], [
        f"{x.id}:{x.label}" for x in result.learned
    ]


def test_policies_learn_at_their_own_times_and_evaluate_alike() -> None:
    records = [
        _imp("a", 0, s="1"),
        _imp("b", 10, s="2"),
        _click("a", 500),  # a is positive at 500
        _imp("c", 1200, s="3"),  # closes a's and b's windows (0 + 1000, 10 + 1000 < 1200)
        _imp("d", 1300, s="4"),
    ]
    served: dict[str, list[int]] = {}
    evaluated: dict[str, list[str]] = {}
    for policy in LABEL_POLICIES:
        served[policy], evaluated[policy] = _learns(_pipeline(label_policy=policy), records)
    # Final labels are evaluated at the same moments, on the served p, whatever the policy.
    assert evaluated[CLICK_EARLY] == evaluated[WINDOW] == evaluated[FAKE_NEGATIVE]
    assert evaluated[CLICK_EARLY] == ["a:1", "b:0"]
    # What each had learned when it served c and d:
    assert served[CLICK_EARLY] == [0, 0, 2, 2]  # a's positive, then b's negative at c
    assert served[WINDOW] == [0, 0, 2, 2]  # nothing until c closes a's and b's windows
    assert served[FAKE_NEGATIVE] == [0, 1, 3, 4]  # each impression at once, a again on click


def test_window_learns_a_positive_only_when_its_window_closes() -> None:
    pipe = _pipeline(label_policy=WINDOW)
    pipe.process([_imp("a", 0, s="1"), _click("a", 100)])
    assert pipe.engine.n_learned == 0 and pipe.evaluator.examples == 1
    assert pipe.pending_count == 1, "held until its window closes"
    result = pipe.process([_imp("z", 1001, s="9")])
    assert pipe.engine.n_learned == 1 and result.learned == []
    assert pipe.pending_count == 1  # z


def test_window_keeps_held_positives_across_a_checkpoint() -> None:
    records = _simulated_records(3000)
    straight = _pipeline(window_ms=60_000, max_pending=10_000, label_policy=WINDOW)
    straight.process(records)
    first = _pipeline(window_ms=60_000, max_pending=10_000, label_policy=WINDOW)
    first.process(records[:1500])
    state = first.state()
    again = _pipeline(window_ms=60_000, max_pending=10_000, label_policy=WINDOW)
    again.restore(state, partitions={0})
    again.process(records[1500:])
    for key, value in straight.engine.state().items():
        if isinstance(value, np.ndarray):
            assert value.tobytes() == again.engine.state()[key].tobytes(), key  # type: ignore[union-attr]


def test_fake_negatives_make_the_learned_rate_unbiased() -> None:
    """Every impression learned at once as a negative and its clicks again as positives: with
    the fake-negative weights the intercept-only model converges to the true rate (a plain
    duplicate would converge to rate / (1 + rate))."""
    rng = np.random.default_rng(3)
    for policy, expected in ((FAKE_NEGATIVE, 0.3), (CLICK_EARLY, 0.3)):
        pipe = _pipeline(window_ms=100, max_pending=100_000, label_policy=policy)
        records = []
        for i in range(20_000):
            records.append(_imp(f"i{i}", 10 * i))
            if rng.random() < 0.3:
                records.append(_click(f"i{i}", 10 * i + 5))
        pipe.process(records)
        late = pipe.process([_imp("probe", 10 * 20_000 + 1000)])
        assert late.predictions[0].p_click == pytest.approx(expected, abs=0.03), policy
