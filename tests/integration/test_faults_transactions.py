"""Fault suite, transactional output (issue 6 scenario 11): exactly one prediction per
impression for read_committed readers across kill -9."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

from stream_fm.kafka.admin import TopicReader
from stream_fm.tools.broker import KafkaBroker
from tests.integration.oracle import (
    FaultRig,
    applied_since_start,
    check_invariant,
    end_offsets,
    last_checkpoint_offsets,
    simulated,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("kafka_client")


def read_committed(broker: KafkaBroker, topic: str) -> list[bytes]:
    with TopicReader(broker.bootstrap_servers, isolation_level="read_committed") as reader:
        return [r.value or b"" for r in reader.read_until_idle(topic, idle_s=3.0)]


@pytest.mark.slow
def test_11_transactional_output_gives_read_committed_readers_one_prediction_per_impression(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    rig = FaultRig(
        kafka_broker, tmp_path, overrides={"transactional_id": f"faults-{tmp_path.name}"}
    )
    rng = random.Random(11)
    try:
        rig.produce(simulated(20_000, seed=11))
        log = rig.apply_log()
        kills = []
        for i in range(8):
            if i % 4 == 3:
                # Inside the checkpoint: after the file, before the transaction commits.
                proc = rig.start(fault_step="committing", fault_nth=2)
                assert proc.wait_exit(120) == -9, proc.tail()
                kills.append("committing")
                continue
            proc = rig.start()
            target = rng.randrange(300, 2_500)
            wait_until(lambda n=target: applied_since_start(log) >= n, 90, "records", proc)
            proc.kill9()
            kills.append(applied_since_start(log))
        ends = end_offsets(kafka_broker, rig.topics["input"])
        proc = rig.start()
        wait_until(lambda: last_checkpoint_offsets(log) == ends, 120, "drained", proc)
        code, _ = proc.sigterm()
        assert code == 0, proc.tail()
        verdict = check_invariant(rig)
        committed = Counter(
            orjson.loads(v)["id"] for v in read_committed(kafka_broker, rig.topics["predictions"])
        )
    finally:
        rig.close()
    assert len(committed) == verdict.impressions, "every impression has a committed prediction"
    repeated = {k: n for k, n in committed.items() if n > 1}
    assert not repeated, (
        f"{len(repeated)} impressions predicted more than once, e.g. {list(repeated.items())[:3]}"
    )
    print(
        f"\n[faults] 11 transactions: kills={kills}, impressions={verdict.impressions}, "
        f"read_committed predictions={sum(committed.values())} (exactly one each), "
        f"read_uncommitted records={verdict.predictions} (aborted included), "
        f"undone_records={verdict.undone_records}"
    )
