"""The simulator: known ground truth, realistic delays, a Bayes optimum that holds."""

from __future__ import annotations

import math

import numpy as np
import orjson

from stream_fm.events import Click, EventDecoder, Impression
from stream_fm.features import FeatureHasher
from stream_fm.simulate import SimulationParams, Simulator, cardinalities


def test_cardinalities_span_tens_to_max() -> None:
    cards = cardinalities(SimulationParams(n_fields=20))
    assert cards[0] == 10 and cards[-1] == 100_000
    assert cards == sorted(cards)


def test_stream_is_valid_time_ordered_and_complete() -> None:
    traffic = Simulator(SimulationParams(n_impressions=5000, n_fields=6, seed=1)).generate()
    decoder = EventDecoder(FeatureHasher(bits=18))
    events = [decoder.decode(orjson.dumps(e)) for e in traffic.events()]
    timestamps = [e.ts_ms for e in events]
    assert timestamps == sorted(timestamps)
    impressions = [e for e in events if isinstance(e, Impression)]
    clicks = [e for e in events if isinstance(e, Click)]
    assert len(impressions) == 5000
    assert len(clicks) == traffic.stats.clicks
    assert all(len(e.keys) == 6 for e in impressions)
    # Every click follows its own impression.
    impression_ts = {e.id: e.ts_ms for e in impressions}
    assert all(c.ts_ms > impression_ts[c.id] for c in clicks)


def test_base_ctr_delays_and_window() -> None:
    params = SimulationParams(n_impressions=100_000, base_ctr=0.03, seed=2)
    traffic = Simulator(params).generate()
    stats = traffic.stats
    assert 0.02 < stats.clicks / stats.impressions < 0.04
    assert stats.clicks_beyond_window > 0, "some clicks must land beyond the window"
    assert stats.positives + stats.clicks_beyond_window == stats.clicks
    delays_s = (traffic.click_ts_ms - traffic.impression_ts_ms)[traffic.clicked] / 1000
    assert 10 < float(np.median(delays_s)) < 100


def test_bayes_optimum_beats_constant_predictor() -> None:
    traffic = Simulator(SimulationParams(n_impressions=50_000, seed=3)).generate()
    stats = traffic.stats
    ctr = stats.positives / stats.impressions
    constant = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert stats.bayes_logloss < constant
    assert 0.4 < stats.bayes_normalized_entropy < 0.95
    # The realised optimum sits close to its expectation on a large sample.
    assert abs(stats.bayes_logloss - stats.expected_bayes_logloss) < 0.01


def test_same_seed_same_traffic() -> None:
    a = Simulator(SimulationParams(n_impressions=1000, seed=9)).generate()
    b = Simulator(SimulationParams(n_impressions=1000, seed=9)).generate()
    assert list(a.events()) == list(b.events())
