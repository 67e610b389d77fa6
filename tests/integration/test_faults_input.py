"""Fault suite, bad and repeated input (issue 6 scenarios 5 and 6): judged by the oracle."""

from __future__ import annotations

import hashlib
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest

from stream_fm.audit import read_apply_log
from stream_fm.checkpoint import CheckpointStore
from stream_fm.errors import ProduceError
from stream_fm.kafka.admin import EventProducer
from stream_fm.tools.broker import KafkaBroker
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

pytestmark = pytest.mark.usefixtures("kafka_client")


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


MIB = 1 << 20
INPUT_LIMIT = 10 * MIB  # the input topic's max.message.bytes, a common setting
FUTURE_TS = 4_102_444_800_000  # 2100-01-01: far beyond max_future_skew_s of the worker's clock


def _padded_impression(ident: str, size: int) -> bytes:
    """A valid impression of exactly ``size`` bytes."""
    head = b'{"type":"impression","id":"%s","ts":1732406400000,"features":{"pad":"' % ident.encode()
    tail = b'"}}'
    return head + b"p" * (size - len(head) - len(tail)) + tail


def _not_json(size: int) -> bytes:
    return b"{" + b"x" * (size - 1)


def more_bad_inputs() -> list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
    """(reason, key or None for the default, value, headers) beyond the decoder's own forms:
    sizes at and above each limit, huge keys, odd headers, far-future clocks, new types."""
    click = b'{"type":"click","id":"x","ts":1732406400000}'
    return [
        ("too_large", None, _not_json(2049), []),  # one byte over max_event_bytes
        ("too_large", None, _not_json(MIB), []),  # the dead-letter topic's own limit
        ("too_large", None, _not_json(2_549_145), []),  # the 2.5 MB record
        ("too_large", None, _not_json(INPUT_LIMIT - 4096), []),  # at the input topic's limit
        ("not_json", b"k" * (2 * MIB), b"not json", []),  # a key larger than any dead letter
        ("ts_in_future", None, b'{"type":"click","id":"x","ts":%d}' % FUTURE_TS, []),
        (
            "ts_in_future",
            None,
            b'{"type":"impression","id":"f","ts":%d,"features":{"a":"b"}}' % FUTURE_TS,
            [],
        ),
        ("unknown_type", None, b'{"type":"conversion","id":"x","ts":1}', []),
        ("unknown_type", None, b'{"type":"view_v2","id":"x","ts":1}', []),
        ("bad_ts", None, b'{"type":"click","id":"x","ts":123456789012345678901234567890}', []),
        ("not_utf8", None, b'\xef\xbb\xbf{"type":"click","id":"x","ts":1}', []),
        ("not_json", None, b'{"type":"click","id":"\\ud800","ts":1}', []),
        ("not_json", None, click + b" trailing", []),
        ("not_json", None, b"\x00\x00\x00", []),
        ("missing_type", None, b'{"type":null,"id":"x","ts":1}', []),
        ("missing_features", None, b'{"type":"impression","id":"x","ts":1,"features":null}', []),
        ("bad_label", None, b'{"type":"labeled","id":"x","ts":1,"label":1.0,"features":{}}', []),
        ("not_json", None, b"oops", [("h", b"v" * (512 * 1024))]),  # a huge header
        ("not_json", None, b"oops", [(f"h{i}", b"v") for i in range(1000)]),  # many headers
    ]


@pytest.fixture
def big_rig(kafka_broker: KafkaBroker, tmp_path: Path) -> Iterator[FaultRig]:
    rig = FaultRig(
        kafka_broker,
        tmp_path,
        overrides={"max_event_bytes": "2048", "max_features": "50"},
        input_configs={"max.message.bytes": str(INPUT_LIMIT)},
    )
    try:
        yield rig
    finally:
        rig.close()


def _kcat_produce(broker: KafkaBroker, topic: str, key: bytes, value: bytes, header: bytes) -> None:
    """kcat writes header keys as raw bytes (kafka-python cannot write a non-UTF-8 one)."""
    done = subprocess.run(
        [
            "kcat",
            "-b",
            broker.bootstrap_servers,
            "-P",
            "-t",
            topic,
            "-k",
            key.decode(),
            "-H",
            header,
        ],
        input=value + b"\n",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def test_6b_no_record_stalls_a_partition_oversized_and_malformed_records_are_dead_lettered_once(
    big_rig: FaultRig,
) -> None:
    rig = big_rig
    bad: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = [
        (reason, None, value, []) for reason, value in bad_inputs()
    ] + more_bad_inputs()
    assert len(bad) + 2 >= 45  # and two records with headers only kcat can write
    good = simulated(1_200, seed=66)
    # Good records at the limits: exactly max_event_bytes, a huge key, huge numbers whose update
    # the numeric guard must keep finite, and a header key that is not UTF-8 (kcat, below).
    at_limit = _padded_impression("at-limit", 2048)
    huge_numbers = (
        b'{"type":"impression","id":"huge-numbers","ts":1732406400000,"features":{%s}}'
        % b",".join(b'"n%d":1e308' % i for i in range(50))
    )
    extra_good = [(b"at-limit", at_limit), (b"k" * (3 * MIB), _padded_impression("huge-key", 300))]
    extra_good.append((b"huge-numbers", huge_numbers))
    step = len(good) // len(bad)
    keys = [b"bad-%d" % i for i in range(len(bad))]
    stream: list[tuple[bytes | None, bytes | None]] = []
    headers_of: dict[bytes, list[tuple[str, bytes]]] = {}
    for i, record in enumerate(good):
        stream.append(record)
        if i % step == step - 1 and i // step < len(bad):
            j = i // step
            _, key, value, headers = bad[j]
            stream.append((key or keys[j], value))
            headers_of[key or keys[j]] = headers
        if i in (100, 700):
            stream.append(extra_good.pop())
    stream += extra_good
    with EventProducer(
        rig.broker.bootstrap_servers, max_request_size_bytes=INPUT_LIMIT + MIB
    ) as producer:
        for key, value in stream:
            producer.send(rig.topics["input"], key, value, headers=headers_of.get(key or b""))
        producer.flush(120)
        # Above the input topic's limit: the broker refuses it, so it never is input.
        with pytest.raises(ProduceError):
            producer.send_and_wait(rig.topics["input"], b"over", _not_json(INPUT_LIMIT + 1024))
    # Headers kafka-python cannot write: a key that is not UTF-8, a value that is null.
    raw = [
        (b"raw-header", _padded_impression("raw-header", 200), b"\xff\xfe=v"),
        (b"bad-raw-header", b"not json", b"\xff\xfe=v"),
        (b"null-header", _padded_impression("null-header", 200), b"no-value"),
        (b"bad-null-header", b"not json", b"no-value"),
    ]
    for key, value, header in raw:
        _kcat_produce(rig.broker, rig.topics["input"], key, value, header)
    expected = {keys[j]: reason for j, (reason, key, _, _) in enumerate(bad) if key is None}
    expected[b"k" * 1024] = "not_json"  # the huge key, cut to 1 KiB
    expected[b"bad-raw-header"] = expected[b"bad-null-header"] = "not_json"

    metrics = run_to_end(rig)
    verdict = check_invariant(rig)

    assert metrics["stream_fm_rollbacks_total"] == 0, "no record may cause a rollback"
    assert verdict.duplicate_predictions == 0
    dead = read_topic(rig.broker, rig.topics["dead_letters"])
    inputs = {(r.partition, r.offset): r for r in read_topic(rig.broker, rig.topics["input"])}
    by_key: dict[bytes | None, str] = {}
    truncated = 0
    for record in dead:
        headers = {k: v for k, v in record.headers}
        source = inputs[(int(headers["source_partition"]), int(headers["source_offset"]))]
        original = source.value or b""
        assert record.key is not None and record.key not in by_key, "each bad record exactly once"
        by_key[record.key] = headers["reason"].decode()
        if headers.get("truncated") == b"true":
            truncated += 1
            assert original.startswith(record.value) and len(record.value) < MIB
            assert int(headers["original_size"]) == len(original)
            assert headers["original_sha256"].decode() == hashlib.sha256(original).hexdigest()
        else:
            assert record.value == original, "the original bytes are kept"
        if headers.get("key_truncated") == b"true":
            assert source.key is not None and source.key.startswith(record.key)
            assert int(headers["key_original_size"]) == len(source.key)
    assert by_key == expected
    assert truncated == 3  # 1 MiB, 2.5 MB and the one at the input limit
    for reason in set(expected.values()):
        n = sum(1 for r in expected.values() if r == reason)
        assert metrics[f'stream_fm_invalid_events_total{{reason="{reason}"}}'] == n, reason

    state, _ = CheckpointStore(rig.checkpoint_dir).load_latest() or ({}, None)
    for name, array in state["engine"].items():
        if isinstance(array, np.ndarray) and array.dtype.kind == "f":
            assert np.isfinite(array).all(), f"non-finite values in {name}"
    predicted = {
        orjson.loads(r.value)["id"] for r in read_topic(rig.broker, rig.topics["predictions"])
    }
    assert {"at-limit", "huge-key", "huge-numbers", "raw-header", "null-header"} <= predicted
    print(
        f"\n[faults] 6b no stalls: bad kinds={len(bad) + 3}, reasons={len(set(expected.values()))}, "
        f"dead letters={len(dead)} ({truncated} truncated), rollbacks=0, "
        f"records={verdict.records}, predictions={verdict.predictions} for "
        f"{verdict.impressions} impressions, duplicates={verdict.duplicate_predictions}"
    )
