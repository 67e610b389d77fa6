"""FM engines: ``FastFM`` (compiled, production) and ``RiverFM`` (river reference).

``RiverFM`` is imported lazily so that importing the package does not import river.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stream_fm.model.base import OP_LEARN, OP_SCORE, Engine, OpBatch, SparseExample, StateValue
from stream_fm.model.fast import FastFM, engine_throughput
from stream_fm.model.params import FMParams, ModelStateMismatch

if TYPE_CHECKING:
    from stream_fm.model.river_ref import RiverFM

__all__ = [
    "OP_LEARN",
    "OP_SCORE",
    "Engine",
    "FMParams",
    "FastFM",
    "ModelStateMismatch",
    "OpBatch",
    "RiverFM",
    "SparseExample",
    "StateValue",
    "engine_throughput",
]


def __getattr__(name: str) -> Any:
    if name == "RiverFM":
        from stream_fm.model.river_ref import RiverFM

        return RiverFM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
