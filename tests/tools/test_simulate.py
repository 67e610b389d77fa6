"""The simulator: known ground truth, realistic delays, a Bayes optimum that holds."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_fm.errors import ConfigError
from stream_fm.events import Click, EventDecoder, Impression
from stream_fm.features import FeatureHasher
from stream_fm.tools.simulate import SimulationParams, Simulator, cardinalities


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


def test_same_seed_same_events_whatever_the_chunking() -> None:
    simulator = Simulator(SimulationParams(n_impressions=3000, n_fields=4, seed=5))
    reference = list(simulator.events(chunk_impressions=3000))
    for chunk in (1, 7, 512, 2999, 10_000):
        assert list(simulator.events(chunk_impressions=chunk)) == reference, chunk
    assert list(simulator.generate().events()) == reference
    # A longer stream of the same seed starts with the same impressions.
    longer = Simulator(SimulationParams(n_impressions=6000, n_fields=4, seed=5))
    first = [e for e in longer.events() if e["type"] == "impression"][:3000]
    assert first == [e for e in reference if e["type"] == "impression"]


def test_unbounded_stream_is_generated_lazily() -> None:
    simulator = Simulator(SimulationParams(n_impressions=0, n_fields=3, seed=1))
    events = simulator.events(chunk_impressions=1000)
    head = [next(events) for _ in range(5000)]
    assert sum(e["type"] == "impression" for e in head) >= 4500
    assert simulator.stats().impressions <= 6000, "only what was asked for was generated"
    with pytest.raises(ConfigError, match="n_impressions"):
        simulator.generate()


def test_drift_replaces_the_ground_truth_from_its_impression_on() -> None:
    base = SimulationParams(n_impressions=4000, n_fields=5, seed=4)
    steady = Simulator(base).generate()
    drifting = Simulator(replace(base, drift_at=2500)).generate()
    assert np.array_equal(steady.values, drifting.values), "popularity stays"
    same = steady.label_probability[:2500] == drifting.label_probability[:2500]
    assert same.all()
    assert not np.allclose(steady.label_probability[2500:], drifting.label_probability[2500:])


def test_simulate_streams_more_than_fits_in_memory_at_a_steady_rate_with_flat_memory() -> None:
    """10^12 impressions would need 160 TB as one array: the command streams them instead."""
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_fm", "simulate", "--impressions", str(10**12), "--out", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    block = 200_000
    rss_mib: list[float] = []
    seconds: list[float] = []
    try:
        for _ in range(8):
            started = time.perf_counter()
            for _ in range(block):
                line = process.stdout.readline()
                assert line.startswith(b'{"type":'), line[:200]
            seconds.append(time.perf_counter() - started)
            rss_mib.append(_rss_mib(process.pid))
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b"Bayes-optimal log loss" in stderr
    # Flat: after the first block (imports, ground truth, buffers) memory no longer grows.
    assert max(rss_mib[1:]) - rss_mib[1] < 32, rss_mib
    # Steady: no block much slower than the typical one (a ratio, not a speed target).
    typical = sorted(seconds)[len(seconds) // 2]
    assert max(seconds[1:]) < 3 * typical, seconds


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
