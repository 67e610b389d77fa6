"""Compile every kernel before anything is timed or served, or load it from numba's cache.

numba compiles a kernel at its first call (about 15 s for all of them on a 2-core machine)
and keeps the result on disk: in ``NUMBA_CACHE_DIR`` if set, else in ``__pycache__`` beside
the source. ``warm_up`` makes those first calls on a few made-up records through a throwaway
pipeline built like the real one (same hasher, decoder, optimizer and label policy), so a
replay's figure, a worker's first batch and its readiness do not pay for compilation.
``stream-fm compile`` runs it at install time (``make install``, the Dockerfile); a cache
that already holds every kernel is loaded in about a second.

>>> from stream_fm.config import load_settings
>>> warm_up(load_settings(env={})) >= 0
True
"""

from __future__ import annotations

import dataclasses
import time
from typing import Final

import orjson

from stream_fm.config import Settings
from stream_fm.kafka.partitioner import key_partitions
from stream_fm.pipeline import Pipeline

#: The throwaway model's size: kernels are compiled per array type, not per size.
WARM_HASH_BITS: Final = 10
_TS_MS: Final = 1_732_406_400_000


def warm_up(settings: Settings) -> float:
    """Run made-up records through every compiled path the settings use; return seconds."""
    started = time.perf_counter()
    small = dataclasses.replace(
        settings,
        hash_bits=WARM_HASH_BITS,
        model=dataclasses.replace(settings.model, n_buckets=1 << WARM_HASH_BITS),
    )
    pipeline = Pipeline.from_settings(small)
    later = _TS_MS + small.attribution_window_ms + 1
    values = [
        _record("impression", "warm-1", _TS_MS, features={"site": "a", "price": 1.5}),
        _record("click", "warm-1", _TS_MS + 1),
        _record("labeled", "warm-2", _TS_MS + 2, label=0, features={"site": "b"}),
        b"{not json",  # the decoder's fallback path
        _record("impression", "warm-3", later, features={"site": "c", "price": 2.0}),
    ]
    pipeline.process_values(values)
    decoded = [(0, pipeline.decoder.decode(value)) for value in values[-1:]]
    pipeline.process_events(decoded)  # the readers of labeled files (criteo, avazu, ...)
    pipeline.flush()
    key_partitions([b"warm-1"], 2)  # the kafka-python producer's partitioner
    return time.perf_counter() - started


def _record(kind: str, ident: str, ts_ms: int, **fields: object) -> bytes:
    return orjson.dumps({"type": kind, "id": ident, "ts": ts_ms, **fields})
