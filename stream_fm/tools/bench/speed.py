"""``replay`` end to end against VW's file driver on the same simulated data.

Both read a file and learn every example: ``replay`` the design's JSONL events (decode, join
in the attribution window, score, learn, evaluate), VW its own text format of the same
examples, already joined and in label order (what VW needs; the join is work replay does and
VW does not). Times are wall seconds from opening the file to the last example, in this
process, one after the other.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from stream_fm.config import Settings
from stream_fm.pipeline import Pipeline, decoder_for
from stream_fm.replay import read_batches, replay
from stream_fm.tools.bench.vw import VW_VARIANTS, vw_driver
from stream_fm.tools.simulate import SimulationParams, Simulator


@dataclass(frozen=True, slots=True)
class SpeedResult:
    events: int  # JSONL records (impressions and clicks)
    examples: int  # labeled examples (impressions)
    file_bytes: int
    replay_seconds: float
    replay_events_per_s: float
    replay_examples_per_s: float
    vw_seconds: dict[str, float]  # variant -> its driver's wall seconds
    vw_examples_per_s: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay_against_vw(
    settings: Settings, n_impressions: int = 400_000, seed: int = 11
) -> SpeedResult:
    from stream_fm.tools.bench.model import labeled_in_label_order, simulated

    simulator = Simulator(SimulationParams(n_impressions=n_impressions, n_fields=20, seed=seed))
    with tempfile.TemporaryDirectory(prefix="stream-fm-speed-") as work:
        events_path = os.path.join(work, "events.jsonl")
        with open(events_path, "wb") as sink:
            for event in simulator.events():
                sink.write(orjson.dumps(event) + b"\n")
        pipeline = Pipeline.from_settings(settings)
        started = time.perf_counter()
        report = replay(pipeline, read_batches(Path(events_path), "jsonl", pipeline.decoder))
        replay_s = time.perf_counter() - started

        decoder = decoder_for(settings)
        stream = simulated("speed", "", decoder, n_impressions=n_impressions, seed=seed)
        vw_path = os.path.join(work, "examples.vw")
        examples = 0
        with open(vw_path, "w") as sink:
            for indices, values, label, _ts in labeled_in_label_order(stream, settings, decoder):
                features = " ".join(
                    f"{i}:{v:.9g}" for i, v in zip(indices.tolist(), values.tolist(), strict=True)
                )
                sink.write(f"{1 if label else -1} |f {features}\n")
                examples += 1
        vw_seconds = {
            name: vw_driver(vw_path, arguments, settings.hash_bits, work)[1]
            for name, arguments in VW_VARIANTS.items()
        }
        size = os.path.getsize(events_path)
    return SpeedResult(
        events=report.events,
        examples=report.examples,
        file_bytes=size,
        replay_seconds=replay_s,
        replay_events_per_s=report.events / replay_s,
        replay_examples_per_s=report.examples / replay_s,
        vw_seconds=vw_seconds,
        vw_examples_per_s={name: examples / s for name, s in vw_seconds.items()},
    )


def format_speed(result: SpeedResult) -> str:
    lines = [
        f"replay end to end vs VW's file driver, simulated 20-field stream: {result.events:,} "
        f"events ({result.file_bytes / 1e6:,.0f} MB JSONL), {result.examples:,} examples",
        f"  stream-fm replay (decode, join, score, learn, evaluate): {result.replay_seconds:.2f} s, "
        f"{result.replay_events_per_s:,.0f} events/s, {result.replay_examples_per_s:,.0f} "
        "examples/s",
    ]
    for name, seconds in result.vw_seconds.items():
        rate = result.vw_examples_per_s[name]
        lines.append(
            f"  {name} driver (its text format, already joined): {seconds:.2f} s, "
            f"{rate:,.0f} examples/s; replay / VW = {result.replay_examples_per_s / rate:.2f}"
        )
    return "\n".join(lines)
