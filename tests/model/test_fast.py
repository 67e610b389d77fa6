"""FastFM beyond the engine contract: its state buffers."""

from __future__ import annotations

import numpy as np

from stream_fm.model import FastFM, FMParams
from stream_fm.model.base import SparseExample


def test_state_into_an_earlier_state_writes_over_its_arrays_and_equals_a_copy() -> None:
    engine = FastFM(FMParams(n_buckets=1 << 10, k=4, seed=3))
    engine.learn_one(SparseExample(np.array([1, 5], dtype=np.int32), np.ones(2)), 1)
    first = engine.state()
    engine.learn_one(SparseExample(np.array([2, 5], dtype=np.int32), np.ones(2)), 0)
    again = engine.state(into=first)
    fresh = engine.state()
    for name, value in fresh.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(again[name], value), name
            assert again[name] is first[name], f"{name}: written over, not allocated"
    other = FastFM(FMParams(n_buckets=1 << 11, k=4))
    mismatched = other.state(into=first)  # other shapes: fresh arrays, the buffers untouched
    assert mismatched["v"] is not first["v"]
