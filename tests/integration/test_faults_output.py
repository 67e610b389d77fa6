"""Fault suite, outputs and disks (issue 6 scenarios 8 and 10): judged by the oracle."""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import pytest

from stream_fm.tools.broker import KafkaBroker
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
from tests.prometheus_helpers import missing_tool

pytestmark = pytest.mark.usefixtures("kafka_client")


def set_topic_config(broker: KafkaBroker, topic: str, configs: dict[str, str]) -> None:
    with broker.admin() as admin:
        admin.alter_topic_config(topic, configs)


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
    metrics = proc.metrics()
    broken_s = time.monotonic() - broken_at
    rollbacks_while_broken = metrics.get("stream_fm_rollbacks_total", 0.0)
    assert rollbacks_while_broken >= 1
    # The wait before each retry doubles (1, 2, 4 s ...): no rollback loop every second.
    assert rollbacks_while_broken <= 1 + math.log2(1 + broken_s), (rollbacks_while_broken, broken_s)
    assert metrics.get('stream_fm_produce_errors_total{kind="permanent"}', 0.0) >= 1

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
        f"\n[faults] 10 rejected outputs: rollbacks={verdict.rollbacks} "
        f"({rollbacks_while_broken:.0f} in {broken_s:.1f}s broken), "
        f"not_ready_after_s={not_ready_after_s:.1f}, ready_after_fix_s={ready_after_fix_s:.1f}, "
        f"records={verdict.records}, predictions={verdict.predictions} for "
        f"{verdict.impressions} impressions, duplicates={verdict.duplicate_predictions} "
        f"(bound {verdict.duplicate_bound}), applied_by_one_process={applied_since_start(log)}"
    )
    assert len(read_topic(rig.broker, rig.topics["predictions"])) == verdict.predictions


class Tmpfs:
    """A size-limited tmpfs for the checkpoint directory, remounted full or read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            missing_tool(f"a tmpfs mount (needs root): {done.stderr.strip()}")

    def remount(self, options: str) -> None:
        done = subprocess.run(
            ["mount", "-o", f"remount,{options}", str(self.path)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr

    def fill(self) -> None:
        """Shrink the file system to what it holds now: the next checkpoint does not fit."""
        stat = os.statvfs(self.path)
        used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
        self.remount(f"size={used + 256 * 1024}")

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def test_8_checkpoint_disk_full_or_read_only_never_lets_offsets_run_ahead(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    disk = Tmpfs(tmp_path / "disk")
    rig = FaultRig(kafka_broker, tmp_path)
    rig.checkpoint_dir = disk.path / "checkpoints"
    figures: dict[str, object] = {}
    try:
        events = simulated(12_000, seed=8)
        rig.produce(events[:3_000])
        proc = rig.start()
        log = rig.apply_log()
        ends = end_offsets(rig.broker, rig.topics["input"])
        wait_until(lambda: last_checkpoint_offsets(log) == ends, 60, "the first part", proc)
        wait_until(proc.readyz, 30, "ready", proc)
        part = 1
        for fault, (break_disk, mend_disk) in {
            "full": (disk.fill, lambda: disk.remount("size=64m")),
            "read_only": (lambda: disk.remount("ro"), lambda: disk.remount("rw")),
        }.items():
            durable = last_checkpoint_offsets(log)
            errors_before = proc.metrics().get("stream_fm_checkpoint_errors_total", 0.0)
            break_disk()
            rig.produce(events[3_000 * part : 3_000 * (part + 1)])
            part += 1
            broken_at = time.monotonic()
            wait_until(lambda: not proc.readyz(), 30, f"not ready with the disk {fault}", proc)
            not_ready_s = time.monotonic() - broken_at
            wait_until(
                lambda n=3_000 * part: applied_since_start(log) >= n, 60, "processing goes on", proc
            )
            for _ in range(3):
                committed = committed_offsets(rig.broker, rig.group_id, rig.topics["input"])
                assert committed == durable, (
                    f"disk {fault}: committed {committed} ahead of the durable checkpoint {durable}"
                )
                assert last_checkpoint_offsets(log) == durable
                time.sleep(1.0)
            errors = proc.metrics()["stream_fm_checkpoint_errors_total"] - errors_before
            assert errors >= 1
            mend_disk()
            mended_at = time.monotonic()
            wait_until(proc.readyz, 30, f"ready after the disk was {fault}", proc)
            now_ends = end_offsets(rig.broker, rig.topics["input"])
            wait_until(lambda e=now_ends: last_checkpoint_offsets(log) == e, 60, "caught up", proc)
            figures[fault] = {
                "checkpoint_errors": int(errors),
                "not_ready_after_s": round(not_ready_s, 1),
                "recovered_s": round(time.monotonic() - mended_at, 1),
            }
        rig.produce(events[9_000:])
        ends = end_offsets(rig.broker, rig.topics["input"])
        wait_until(lambda: last_checkpoint_offsets(log) == ends, 60, "the rest", proc)
        code, _ = proc.sigterm()
        assert code == 0, proc.tail()
        verdict = check_invariant(rig)

        # Committed offsets but the checkpoints gone: refused, naming the way out.
        rig.checkpoint_dir = tmp_path / "empty-checkpoints"
        refused = rig.start(name="refused")
        assert refused.wait_exit(60) != 0
        assert "--cold-start" in refused.tail(), refused.tail()
    finally:
        rig.close()
        disk.close()
    print(
        f"\n[faults] 8 disk faults: {figures}, records={verdict.records}, missing checkpoint refused"
    )
