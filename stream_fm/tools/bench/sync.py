"""``stream-fm bench sync``: N workers of one group, each learning from its own partitions, as
independent models and as one model kept in step by exchanging increments (``model.delta``).

Offline (no Kafka): a stream's events go to 8 partitions by Kafka's default partitioner on the
impression id, partition ``p`` to worker ``p mod N``; the workers take turns on each
interval's events, then exchange under each combine rule, or (``absorb``, what the worker
does) publish their increments through the wire format for every peer to absorb, its row values
in bfloat16 (the default ``model_sync_precision``) or float32 (``absorb-f32``), small
increments held back as ``model_sync_hold_threshold`` says (a round is ``every`` events, so
``model_sync_max_hold_ms / model_sync_interval_ms`` rounds is the longest wait; at the end of
the stream what still waits goes out, and counts). Every figure is
the served log loss of all workers' predictions together (p before learning), as a ratio to
one worker on the whole stream, so it says what scaling out costs in quality; the absorb ways
also count their update bytes against the input's (each event as the JSON record ``bench
scale`` produces), since a group of N workers sends that much to its model-updates topic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stream_fm.config import Settings
from stream_fm.errors import StreamFMError
from stream_fm.events import Event
from stream_fm.kafka.partitioner import key_partitions
from stream_fm.model.delta import RULES, DeltaTracker, exchange
from stream_fm.model.fast import FastFM
from stream_fm.model.rounds import Rounds
from stream_fm.pipeline import Pipeline, decoder_for
from stream_fm.sync.peers import rounds_for, shape_of
from stream_fm.sync.wire import Update, decode, encode
from stream_fm.tools.bench.model import Stream, chosen_streams, say
from stream_fm.tools.bench.scale import BASE_TS_MS, event_json

PARTITIONS = 8
INDEPENDENT = "independent"
ABSORB = "absorb"  # the worker's model sync: published increments absorbed as they come
ABSORB_F32 = "absorb-f32"  # the same with model_sync_precision = "float32"
PRECISION = {ABSORB: "bfloat16", ABSORB_F32: "float32"}
WAYS = (*RULES, ABSORB, ABSORB_F32)


@dataclass
class SyncRow:
    """One stream, one number of workers, one interval: served log loss per way of running."""

    stream: str
    workers: int
    every: int  # events between two exchanges
    one_worker: float
    input_bytes: int
    logloss: dict[str, float] = field(default_factory=dict)  # INDEPENDENT and each rule
    update_bytes: dict[str, int] = field(default_factory=dict)  # the absorb ways

    def ratio(self, way: str) -> float:
        return self.logloss[way] / self.one_worker

    def traffic(self, way: str) -> float:
        """Update bytes the group published over the input's bytes."""
        return self.update_bytes[way] / self.input_bytes if self.input_bytes else math.nan


def served_logloss(
    events: Sequence[tuple[int, Event]],
    settings: Settings,
    workers: int,
    every: int,
    rule: str | None,
) -> tuple[float, int]:
    """Served log loss of ``workers`` pipelines on their partitions' events, and the update
    bytes they published; ``rule``: how they exchange every ``every`` events (None: never,
    independent models)."""
    trackers = [DeltaTracker(FastFM(settings.model)) for _ in range(workers)]
    pipelines = [Pipeline.from_settings(settings, engine=t) for t in trackers]
    precision = PRECISION.get(rule or "", settings.model_sync_precision)
    as_sent = dataclasses.replace(settings, model_sync_precision=precision)
    rounds = [rounds_for(t, as_sent) for t in trackers]
    step = every if rule is not None else max(len(events), 1)
    sent = 0
    for start in range(0, len(events), step):
        shares: list[list[tuple[Hashable, Event | None]]] = [[] for _ in pipelines]
        for partition, event in events[start : start + step]:
            shares[partition % workers].append((partition, event))
        for pipeline, share in zip(pipelines, shares, strict=True):
            if share:
                pipeline.process_events(share)
        if rule in PRECISION and workers > 1:
            sent += post(rounds, start // step, precision)
        elif rule is not None and workers > 1:
            exchange(trackers, rule)
    if rule in PRECISION and workers > 1:  # what still waits goes out: it counts as traffic
        sent += post(rounds, len(events) // step + 1, precision, flush=True)
    for pipeline in pipelines:
        pipeline.flush()  # the end of a finite stream: every window closes
    examples = sum(p.evaluator.examples for p in pipelines)
    if not examples:
        return math.nan, sent
    return sum(p.evaluator.logloss * p.evaluator.examples for p in pipelines) / examples, sent


def post(rounds: Sequence[Rounds], round_id: int, precision: str, flush: bool = False) -> int:
    """The worker's way: each publishes its increments through the wire format and every
    peer absorbs them as they come (``model.rounds``: no shared base, no barrier); returns
    the bytes published."""
    sent, published = [], 0
    for i, one in enumerate(rounds):
        delta, bases = one.publish(round_id, flush)
        update = Update(str(i), 0, shape_of(one.tracker), delta, bases, round_id, {})
        records = encode(update, 1 << 20, precision)
        published += sum(len(r) for r in records)
        sent.append((i, [decode(part) for part in records]))
    for j, one in enumerate(rounds):
        for i, parts in sent:
            if i != j:
                for part in parts:
                    one.absorb(part.delta, part.bases, part.round)
    return published


def input_bytes(events: Sequence[tuple[int, Event]]) -> int:
    """The events as the JSON records (key and value) ``bench scale`` sends to Kafka."""
    records = (event_json(e, "", getattr(e, "ts_ms", BASE_TS_MS)) for _, e in events)
    return sum(len(key) + len(value) for key, value in records)


def partitioned(stream: Stream) -> list[tuple[int, Event]]:
    """The stream's valid events, each with the partition its id hashes to."""
    events = [e for batch, _ in stream.batches for _, e in batch if e is not None]
    partitions = key_partitions([e.id.encode() for e in events], PARTITIONS)
    return list(zip(partitions, events, strict=True))


def bench_stream(
    stream: Stream,
    settings: Settings,
    workers: Sequence[int],
    intervals: Sequence[int],
    say: Callable[[str], None],
) -> list[SyncRow]:
    events = partitioned(stream)
    one, _ = served_logloss(events, settings, 1, len(events), None)
    size = input_bytes(events)
    rows = []
    for n in workers:
        independent, _ = served_logloss(events, settings, n, len(events), None)
        for every in intervals:
            say(f"{stream.name}: {n} workers, exchanging every {every:,} events")
            row = SyncRow(stream.name, n, every, one, size, {INDEPENDENT: independent})
            for rule in WAYS:
                row.logloss[rule], sent = served_logloss(events, settings, n, every, rule)
                if rule in PRECISION:
                    row.update_bytes[rule] = sent
            rows.append(row)
    return rows


def format_rows(rows: Sequence[SyncRow]) -> str:
    ways = (INDEPENDENT, *WAYS)
    head = f"{'stream':<16} {'N':>2} {'every':>7} {'1 worker':>9} " + " ".join(
        f"{w:>12}" for w in ways
    )
    head += "".join(f" {'bytes ' + w:>17}" for w in PRECISION)
    lines = [head, "-" * len(head)]
    for r in rows:
        figures = " ".join(f"{r.ratio(w):>12.4f}" for w in ways)
        traffic = "".join(f" {r.traffic(w):>17.1%}" for w in PRECISION)
        lines.append(
            f"{r.stream:<16} {r.workers:>2} {r.every:>7,} {r.one_worker:>9.5f} {figures}{traffic}"
        )
    lines.append(
        "log loss of N workers / 1 worker, served (p before learning), all workers' predictions "
        "together; independent = no exchange (today's group); absorb = the worker's model sync "
        "(sync.peers; absorb-f32 with float32 rows); the other rules: see model.delta; bytes = "
        "update bytes published / input bytes"
    )
    return "\n".join(lines)


def main_sync_bench(
    settings: Settings,
    streams: Sequence[str],
    workers: Sequence[int],
    intervals: Sequence[int],
    *,
    long_events: int,
    data_dir: Path,
    json_path: Path | None = None,
) -> int:
    builders = chosen_streams(streams, data_dir, long_events)
    if not workers or min(workers) < 2 or not intervals or min(intervals) < 1:
        raise StreamFMError("bench sync: --workers must be >= 2 and --every >= 1")

    decoder = decoder_for(settings)
    rows: list[SyncRow] = []
    for name in streams:
        say(f"{name}: decoding")
        found = bench_stream(builders[name](decoder), settings, workers, intervals, say)
        print(format_rows(found), flush=True)
        rows += found
    if json_path:
        import json

        payload: list[dict[str, Any]] = [asdict(r) for r in rows]
        json_path.write_text(json.dumps(payload, indent=2))
    return 0
