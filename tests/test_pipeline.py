"""The shared pipeline: join semantics, served-before-learned evaluation, determinism."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from stream_fm.events import EventDecoder
from stream_fm.features import FeatureHasher
from stream_fm.model import FastFM, FMParams
from stream_fm.pipeline import Pipeline
from stream_fm.tools.simulate import SimulationParams, Simulator

BITS = 14


def _pipeline(window_ms: int = 1000, max_pending: int = 1000) -> Pipeline:
    engine = FastFM(FMParams(n_buckets=1 << BITS, k=4))
    return Pipeline(
        engine, EventDecoder(FeatureHasher(bits=BITS)), window_ms, max_pending, auc_window=100
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


def test_batching_does_not_change_the_model() -> None:
    records = _simulated_records(3000)
    whole, pieces = (
        _pipeline(window_ms=60_000, max_pending=10_000),
        _pipeline(window_ms=60_000, max_pending=10_000),
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


def test_flush_learns_every_pending_impression() -> None:
    records = _simulated_records(500)
    pipe = _pipeline(window_ms=60_000, max_pending=10_000)
    pipe.process(records)
    pipe.flush()
    assert pipe.pending_count == 0
    assert pipe.evaluator.examples == 500
