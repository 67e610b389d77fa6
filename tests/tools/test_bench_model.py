"""The model benchmark's rows on a small simulated stream: every engine served the same way."""

from __future__ import annotations

import math

from stream_fm.config import build_settings
from stream_fm.model import FastFM
from stream_fm.pipeline import decoder_for
from stream_fm.tools.bench.model import ADAM_RATES, compare, run_pipeline, simulated


def test_compare_has_adam_and_crosses_rows_served_like_the_default() -> None:
    settings = build_settings({})
    decoder = decoder_for(settings)
    stream = simulated("tiny", "3k simulated impressions", decoder, n_impressions=3_000, seed=3)
    result = compare(stream, settings, decoder, river_events=0, say=lambda _: None)
    rows = {(e.engine, e.protocol): e for e in result.engines}
    default = next(e for e in result.engines if e.engine == "stream-fm")
    adam = next(e for e in result.engines if e.engine == "stream-fm/adam")
    assert adam.protocol == default.protocol
    assert adam.examples == default.examples > 0
    assert math.isfinite(adam.logloss) and adam.logloss != default.logloss
    assert any(name.startswith("vw") for name, _ in rows)
    # The row is the pipeline on Adam's rates, nothing else.
    again = build_settings(ADAM_RATES)
    direct = run_pipeline("again", FastFM(again.model), stream, again)
    assert direct.logloss == adam.logloss
    crosses = next(e for e in result.engines if e.engine == "stream-fm/crosses")
    assert crosses.protocol == default.protocol and crosses.examples == default.examples
    crossed = build_settings({"interactions": "all"})
    assert run_pipeline("again", FastFM(crossed.model), stream, crossed).logloss == crosses.logloss
    assert crosses.logloss != default.logloss
