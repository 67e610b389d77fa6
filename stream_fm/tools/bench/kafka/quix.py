"""The rival: a bare Quix Streams application doing the ceiling's work, no model.

JSON in, keep the impressions, JSON out (one small record per impression), on Quix Streams'
own defaults (at-least-once, a commit every 5 s, its librdkafka settings) as a user writing
that application gets them, from the beginning of the input topic. Run as a child process
(Quix installs its own signal handlers and logging):

    python -m stream_fm.tools.bench.kafka.quix BOOTSTRAP INPUT OUTPUT EXPECTED

It prints one JSON line: records consumed and produced, when it processed its first record
(monotonic clock), and the seconds from then until the application stopped (its last commit
and producer flush done).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

from stream_fm.errors import StreamFMError
from stream_fm.tools.bench.kafka.options import STALL_TIMEOUT_S, START_TIMEOUT_S
from stream_fm.tools.bench.kafka.results import QuixResult


def measure_quix(
    bootstrap_servers: str, input_topic: str, output_topic: str, expected: int, work: Path
) -> QuixResult:
    """The application as a child process over ``input_topic``, from the beginning."""
    log = work / "quix.log"
    started = time.monotonic()
    command = [sys.executable, "-m", __name__, bootstrap_servers, input_topic, output_topic]
    with log.open("wb") as sink:
        try:
            out = subprocess.run(
                [*command, str(expected)],
                stdout=subprocess.PIPE,
                stderr=sink,
                timeout=START_TIMEOUT_S + STALL_TIMEOUT_S + expected / 1000,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise StreamFMError(
                f"bench kafka: the Quix Streams application hung; see {log}"
            ) from None
    lines = out.stdout.decode(errors="replace").strip().splitlines()
    if out.returncode != 0 or not lines:
        tail = log.read_text(errors="replace")[-2000:]
        raise StreamFMError(f"bench kafka: the Quix Streams application failed:\n{tail}")
    figures = json.loads(lines[-1])
    seconds = float(figures["seconds"])
    return QuixResult(
        records=int(figures["consumed"]),
        produced=int(figures["produced"]),
        startup_s=float(figures["first_s"]) - started,
        seconds=seconds,
        events_per_s=(int(figures["consumed"]) - 1) / seconds if seconds > 0 else float("nan"),
        quixstreams_version=version("quixstreams"),
    )


def run(
    bootstrap_servers: str, input_topic: str, output_topic: str, expected: int
) -> dict[str, Any]:
    from quixstreams import Application

    counts = {"consumed": 0, "produced": 0}
    first: list[float] = []

    def processed(_topic: str, _partition: int, _offset: int) -> None:
        if not first:
            first.append(time.monotonic())
        counts["consumed"] += 1
        if counts["consumed"] >= expected:
            app.stop()

    def prediction(value: dict[str, Any]) -> dict[str, Any]:
        counts["produced"] += 1
        return {"id": value["id"], "p_click": 0.5, "ts": 0, "model_version": 0}

    app = Application(
        broker_address=bootstrap_servers,
        consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        on_message_processed=processed,
        loglevel="WARNING",
        auto_create_topics=False,
        use_changelog_topics=False,
    )
    source = app.topic(input_topic, value_deserializer="json")
    sink = app.topic(output_topic, value_serializer="json")
    sdf = app.dataframe(source)
    sdf = sdf.filter(lambda value: value.get("type") == "impression").apply(prediction)
    sdf.to_topic(sink)
    app.run()
    ended = time.monotonic()
    if not first:
        raise SystemExit("bench kafka: the Quix Streams application processed nothing")
    # CLOCK_MONOTONIC is one clock for every process: the parent reads first_s too.
    return {**counts, "first_s": first[0], "seconds": ended - first[0]}


def main(argv: list[str]) -> int:
    bootstrap, input_topic, output_topic, expected = argv
    result = run(bootstrap, input_topic, output_topic, int(expected))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
