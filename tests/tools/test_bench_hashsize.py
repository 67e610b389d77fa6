"""``stream-fm bench hashsize`` on a small simulated stream: one child process per hash size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stream_fm.errors import StreamFMError
from stream_fm.tools.bench.hashsize import format_rows, measure, stream_files, write_simulated


def test_each_hash_size_is_measured_in_its_own_process(tmp_path: Path) -> None:
    data = write_simulated(tmp_path / "tiny.jsonl", 3_000)
    small, large = (measure("tiny", [(data, "jsonl")], bits, tmp_path) for bits in (12, 16))
    for row in (small, large):
        assert row.examples > 2_000
        assert math.isfinite(row.logloss) and math.isfinite(row.logloss_last_10pct)
        assert row.peak_rss_mib > 50
    assert small.examples == large.examples
    # The model's arrays are dense: each added bucket costs its weight, k latents and their
    # sums (at least 2k + 1 float64s at k = 8) in the checkpoint.
    added = (2**16 - 2**12) * (2 * 8 + 1) * 8 / 2**20
    assert large.checkpoint_mib - small.checkpoint_mib > added
    table = format_rows([small, large])
    assert "tiny" in table and "checkpoint MiB" in table


def test_an_unknown_stream_is_named(tmp_path: Path) -> None:
    with pytest.raises(StreamFMError, match="unknown stream 'nope'"):
        stream_files(["nope"], tmp_path, tmp_path, 1_000)
