"""Fault suite, outputs and disks (issue 6 scenarios 8 and 10): judged by the oracle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from stream_fm.broker import KafkaBroker
from tests.integration.oracle import (
    FaultRig,
    applied_since_start,
    check_invariant,
    committed_offsets,
    end_offsets,
    last_checkpoint_offsets,
    read_topic,
    simulated,
    wait_until,
)


@pytest.fixture
def rig(kafka_broker: KafkaBroker, tmp_path: Path) -> Iterator[FaultRig]:
    rig = FaultRig(kafka_broker, tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def set_topic_config(broker: KafkaBroker, topic: str, configs: dict[str, str]) -> None:
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=configs)])
    finally:
        admin.close()


def test_10_rejected_predictions_hold_back_offsets_and_readiness_until_fixed(
    rig: FaultRig,
) -> None:
    events = simulated(9_000, seed=10)
    rig.produce(events[:3_000])
    proc = rig.start()
    log = rig.apply_log()
    first_ends = end_offsets(rig.broker, rig.topics["input"])
    wait_until(lambda: last_checkpoint_offsets(log) == first_ends, 60, "the first part", proc)
    wait_until(proc.readyz, 30, "ready", proc)

    # The predictions topic now refuses every record: each is larger than this.
    set_topic_config(rig.broker, rig.topics["predictions"], {"max.message.bytes": "60"})
    time.sleep(1.0)
    broken_at = time.monotonic()
    rig.produce(events[3_000:6_000])
    wait_until(lambda: not proc.readyz(), 30, "not ready while predictions are rejected", proc)
    not_ready_after_s = time.monotonic() - broken_at
    committed_during: list[dict[str, int | None]] = []
    for _ in range(5):
        committed_during.append(committed_offsets(rig.broker, rig.group_id, rig.topics["input"]))
        time.sleep(1.0)
    assert all(c == first_ends for c in committed_during), (
        f"input offsets were committed past rejected predictions: {committed_during}"
    )
    assert not proc.readyz()
    rollbacks = proc.metrics().get("stream_fm_produce_errors_total", 0.0)
    assert rollbacks >= 1

    set_topic_config(rig.broker, rig.topics["predictions"], {"max.message.bytes": "1048588"})
    fixed_at = time.monotonic()
    wait_until(proc.readyz, 60, "ready again after the fix", proc)
    ready_after_fix_s = time.monotonic() - fixed_at
    rig.produce(events[6_000:])
    ends = end_offsets(rig.broker, rig.topics["input"])
    wait_until(lambda: last_checkpoint_offsets(log) == ends, 120, "the rest", proc)
    code, _ = proc.sigterm()
    assert code == 0, proc.tail()
    verdict = check_invariant(rig)
    assert verdict.rollbacks >= 1
    print(
        f"\n[faults] 10 rejected outputs: rollbacks={verdict.rollbacks}, "
        f"not_ready_after_s={not_ready_after_s:.1f}, ready_after_fix_s={ready_after_fix_s:.1f}, "
        f"records={verdict.records}, predictions={verdict.predictions} for "
        f"{verdict.impressions} impressions, duplicates={verdict.duplicate_predictions} "
        f"(bound {verdict.duplicate_bound}), applied_by_one_process={applied_since_start(log)}"
    )
    assert len(read_topic(rig.broker, rig.topics["predictions"])) == verdict.predictions
