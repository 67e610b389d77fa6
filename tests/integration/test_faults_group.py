"""Fault suite, scale-out (issue 6 scenario 9): a second worker joins and leaves under load."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from stream_fm.audit import read_apply_log
from stream_fm.checkpoint import CheckpointStore
from stream_fm.kafka.admin import EventProducer
from stream_fm.tools.broker import KafkaBroker
from tests.integration.oracle import (
    FaultRig,
    applied_since_start,
    assert_states_equal,
    committed_offsets,
    end_offsets,
    read_topic,
    replay,
    simulated,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("kafka_client")

# What a partition's joiner holds regardless of which worker's model scored its impressions.
MODEL_FREE_JOINER_STATE = (
    "watermark_ms",
    "pending_id_blob",
    "pending_id_offsets",
    "pending_ts_ms",
    "closed_id_blob",
    "closed_id_offsets",
    "closed_positive",
)


def assignments(log: Path) -> int:
    """Partition assignments a worker logged (with state or without), over all its runs."""
    if not log.exists():
        return 0
    return sum(1 for e in read_apply_log(log) if e["event"] == "assign")


def produce_at(rig: FaultRig, records: list[tuple[bytes, bytes]], per_s: float) -> threading.Thread:
    def run() -> None:
        with EventProducer(rig.broker.bootstrap_servers) as producer:
            started = time.monotonic()
            for i, (key, value) in enumerate(records):
                producer.send(rig.topics["input"], key, value)
                if i % 100 == 0:
                    ahead = i / per_s - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            producer.flush(60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_9_a_second_worker_added_and_removed_10_times_under_load(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    rig = FaultRig(kafka_broker, tmp_path, partitions=4)
    rng = random.Random(9)
    # 60 s of load at 1,000 events/s: longer than the 10 join/leave cycles take.
    events = simulated(60_000, seed=9, impressions_per_s=50.0)
    try:
        a = rig.start("a")
        load = produce_at(rig, events, per_s=1_000.0)
        wait_until(lambda: applied_since_start(rig.apply_log("a")) > 0, 60, "a working", a)
        moves = []
        for _ in range(10):
            before = assignments(rig.apply_log("b"))
            b = rig.start("b")
            joined = time.monotonic()
            wait_until(
                lambda n=before: assignments(rig.apply_log("b")) > n, 60, "b assigned partitions", b
            )
            moves.append(round(time.monotonic() - joined, 2))
            time.sleep(rng.uniform(0.5, 2.0))
            code, _ = b.sigterm()
            assert code == 0, b.tail()
        load.join(120)
        ends = end_offsets(rig.broker, rig.topics["input"])
        # Drained when the group's offsets reach the end: a's own last checkpoint need not
        # cover partitions b drained before it left (a then has nothing new to checkpoint).
        deadline = time.monotonic() + 120
        while committed_offsets(rig.broker, rig.group_id, rig.topics["input"]) != ends:
            assert time.monotonic() < deadline, f"not drained:\n{a.tail()}"
            assert a.alive(), a.tail()
            time.sleep(1.0)
        code, _ = a.sigterm()
        assert code == 0, a.tail()

        # No offset applied twice across both workers; every offset applied once.
        applied: dict[str, list[int]] = {}
        by_worker = {}
        for name in ("a", "b"):
            events_of = read_apply_log(rig.apply_log(name))
            assert not [e for e in events_of if e["event"] == "rollback"]
            records = [r for e in events_of if e["event"] == "apply" for r in e["records"]]
            by_worker[name] = len(records)
            for t, p, o in records:
                applied.setdefault(f"{t}:{p}", []).append(o)
        for key, end in ends.items():
            offsets = sorted(applied.get(key, []))
            assert offsets == list(range(end)), (
                f"{key}: {len(offsets)} applications of {end} offsets, "
                f"{len(offsets) - len(set(offsets))} twice"
            )
        assert by_worker["b"] > 0
        committed = committed_offsets(rig.broker, rig.group_id, rig.topics["input"])
        assert committed == ends

        # Pending impressions moved with their partition: each partition's joiner, as last
        # checkpointed, equals one fed that partition's records alone.
        store = CheckpointStore(rig.checkpoint_dir, progress_key="offsets")
        values = {
            (r.topic, r.partition, r.offset): r.value
            for r in read_topic(rig.broker, rig.topics["input"])
        }
        for key, end in ends.items():
            best = store.candidates(key)[0]
            state = store.load(best)
            assert state["offsets"][key] == end
            topic, _, partition = key.rpartition(":")
            oracle = replay(
                rig.settings(), [[(topic, int(partition), o) for o in range(end)]], values
            )
            expected = oracle.pipeline.joiners[int(partition)].state()
            actual = state["partitions"][partition]
            model_free = [
                *MODEL_FREE_JOINER_STATE,
                *(k for k in expected if k.startswith("count_")),
            ]
            assert_states_equal(
                {k: actual[k] for k in model_free},
                {k: expected[k] for k in model_free},
                f"{key} joiner",
            )
    finally:
        rig.close()
    print(
        f"\n[faults] 9 scale-out: b joined and left 10 times, seconds from start to assignment {moves}, "
        f"records applied by a={by_worker['a']}, b={by_worker['b']}, partitions {len(ends)}, "
        "no offset applied twice, joiners equal per-partition oracles"
    )
