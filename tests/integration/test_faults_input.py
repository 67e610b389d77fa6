"""Fault suite, bad and repeated input (issue 6 scenarios 5 and 6): judged by the oracle."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from stream_fm.audit import read_apply_log
from stream_fm.broker import KafkaBroker
from stream_fm.checkpoint import CheckpointStore
from tests.integration.oracle import (
    FaultRig,
    assert_states_equal,
    check_invariant,
    end_offsets,
    last_checkpoint_offsets,
    read_topic,
    reconstruct,
    replay,
    simulated,
    wait_until,
)
from tests.test_events import MALFORMED


@pytest.fixture
def rig(kafka_broker: KafkaBroker, tmp_path: Path) -> Iterator[FaultRig]:
    rig = FaultRig(
        kafka_broker, tmp_path, overrides={"max_event_bytes": "2048", "max_features": "50"}
    )
    try:
        yield rig
    finally:
        rig.close()


def run_to_end(rig: FaultRig) -> dict[str, float]:
    """One worker over everything produced; returns its last /metrics before SIGTERM."""
    ends = end_offsets(rig.broker, rig.topics["input"])
    proc = rig.start()
    wait_until(
        lambda: last_checkpoint_offsets(rig.apply_log()) == ends, 120, "the whole input", proc
    )
    metrics = proc.metrics()
    code, _ = proc.sigterm()
    assert code == 0, proc.tail()
    return metrics


def test_5_duplicate_events_are_counted_and_the_model_equals_the_deduplicated_oracle(
    rig: FaultRig,
) -> None:
    rng = random.Random(5)
    events = simulated(6_000, seed=5)
    stream: list[tuple[bytes, bytes]] = []
    duplicated = {"impression": 0, "click": 0}
    later: list[tuple[int, tuple[bytes, bytes]]] = []
    for i, record in enumerate(events):
        stream.append(record)
        while later and later[0][0] <= i:
            stream.append(later.pop(0)[1])
        kind = "click" if record[1].startswith(b'{"type":"click"') else "impression"
        # Every click twice; one impression in 20 again within the next 30 events.
        if kind == "click" or rng.random() < 0.05:
            duplicated[kind] += 1
            later.append((i + rng.randrange(1, 30), record))
    stream += [record for _, record in later]
    rig.produce(stream)

    metrics = run_to_end(rig)
    verdict = check_invariant(rig)
    counted = {
        kind: metrics.get(f'stream_fm_duplicate_events_total{{kind="{kind}"}}', 0.0)
        for kind in duplicated
    }

    # The oracle on the deduplicated stream: the worker's own batches, repeats taken out.
    history = reconstruct(read_apply_log(rig.apply_log()))
    values = {
        (r.topic, r.partition, r.offset): r.value
        for r in read_topic(rig.broker, rig.topics["input"])
    }
    seen: set[bytes] = set()
    deduplicated = []
    for batch in history.batches:
        kept = []
        for rid in batch:
            if values[rid] not in seen:
                seen.add(values[rid])
                kept.append(rid)
        deduplicated.append(kept)
    oracle = replay(rig.settings(), [b for b in deduplicated if b], values)
    state, _ = CheckpointStore(rig.checkpoint_dir).load_latest() or ({}, None)
    assert_states_equal(oracle.engine.state(), state["engine"], "engine")

    assert counted["impression"] == duplicated["impression"]
    # A repeated click is a duplicate when its first copy was attributed; a repeat of a late
    # or orphan click is counted again as late or orphan (never learned either way).
    worker_joins = {
        key: sum(int(p[f"count_{key}"]) for p in state["partitions"].values())
        for key in ("late_clicks", "orphan_clicks")
    }
    oracle_joins = oracle.pipeline.join_counters()
    repeats_of_unattributed = sum(worker_joins.values()) - (
        oracle_joins["late_clicks"] + oracle_joins["orphan_clicks"]
    )
    assert counted["click"] + repeats_of_unattributed == duplicated["click"]
    assert counted["click"] >= 0.5 * duplicated["click"]
    print(
        f"\n[faults] 5 duplicates: injected={duplicated}, counted={counted}, "
        f"records={verdict.records}, model equals the deduplicated oracle"
    )


def bad_inputs() -> list[tuple[str, bytes | None]]:
    """(reason, value) of every malformed form the decoder knows, plus a Kafka tombstone."""
    kinds: list[tuple[str, bytes | None]] = [
        (str(p.values[1]), bytes(p.values[0]))
        for p in MALFORMED  # type: ignore[call-overload]
    ]
    kinds.append(("empty", None))  # a tombstone: no value at all
    return kinds


def test_6_bad_input_goes_to_the_dead_letter_topic_once_and_the_model_equals_the_good_records_oracle(
    rig: FaultRig,
) -> None:
    bad = bad_inputs()
    assert len(bad) >= 25
    good = simulated(3_000, seed=6)
    stream: list[tuple[bytes | None, bytes | None]] = []
    step = len(good) // len(bad)
    for i, record in enumerate(good):
        stream.append(record)
        if i % step == step - 1 and i // step < len(bad):
            stream.append((f"bad-{i // step}".encode(), bad[i // step][1]))
    rig.produce(stream)  # type: ignore[arg-type]

    metrics = run_to_end(rig)
    verdict = check_invariant(rig)

    dead = read_topic(rig.broker, rig.topics["dead_letters"])
    assert len(dead) == len(bad), "each bad record exactly once"
    inputs = {(r.partition, r.offset): r for r in read_topic(rig.broker, rig.topics["input"])}
    by_key = {}
    for record in dead:
        headers = {k: v.decode() for k, v in record.headers}
        assert headers["source_topic"] == rig.topics["input"]
        source = inputs[(int(headers["source_partition"]), int(headers["source_offset"]))]
        assert record.value == (source.value or b""), "the original bytes are kept"
        assert record.key == source.key
        by_key[record.key] = headers["reason"]
    expected = {f"bad-{i}".encode(): reason for i, (reason, _) in enumerate(bad)}
    assert by_key == expected
    for reason in set(expected.values()):
        n = sum(1 for r in expected.values() if r == reason)
        assert metrics[f'stream_fm_invalid_events_total{{reason="{reason}"}}'] == n

    state, _ = CheckpointStore(rig.checkpoint_dir).load_latest() or ({}, None)
    for name, array in state["engine"].items():
        if isinstance(array, np.ndarray) and array.dtype.kind == "f":
            assert np.isfinite(array).all(), f"non-finite values in {name}"
    history = reconstruct(read_apply_log(rig.apply_log()))
    values = {(r.topic, r.partition, r.offset): r.value for r in inputs.values()}
    good_values = set(v for _, v in good)
    only_good = [[rid for rid in b if values[rid] in good_values] for b in history.batches]
    oracle = replay(rig.settings(), [b for b in only_good if b], values)
    assert_states_equal(oracle.engine.state(), state["engine"], "engine")
    print(
        f"\n[faults] 6 bad input: kinds={len(bad)}, reasons={len(set(expected.values()))}, "
        f"records={verdict.records}, dead letters={len(dead)}, model equals the good-records oracle"
    )
