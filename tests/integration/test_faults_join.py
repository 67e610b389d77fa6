"""Fault suite, the join's edge cases through the worker (issue 6 scenario 7).

One partition, so record order is event order; the expected counts come from the brute-force
event-time reference of tests/test_join.py fed the same events.
"""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from stream_fm.checkpoint import CheckpointStore
from stream_fm.join import PendingImpression
from stream_fm.tools.broker import KafkaBroker
from tests.integration.oracle import (
    FaultRig,
    check_invariant,
    end_offsets,
    last_checkpoint_offsets,
    wait_until,
)
from tests.test_join import ReferenceJoiner, example

pytestmark = pytest.mark.usefixtures("kafka_client")

T0 = 1_732_406_400_000
WINDOW_MS = 60_000
MAX_PENDING = 500
DAY_MS = 86_400_000


def impression(id_: str, ts: int) -> tuple[bytes, bytes]:
    features = {"site": f"s{hash(id_) % 7}", "slot": "top"}
    return id_.encode(), orjson.dumps(
        {"type": "impression", "id": id_, "ts": ts, "features": features}
    )


def click(id_: str, ts: int) -> tuple[bytes, bytes]:
    return id_.encode(), orjson.dumps({"type": "click", "id": id_, "ts": ts})


def edge_case_stream() -> list[tuple[bytes, bytes]]:
    s: list[tuple[bytes, bytes]] = []
    for i in range(300):  # ordinary traffic, one in ten clicked inside the window
        s.append(impression(f"n{i}", T0 + 100 * i))
        if i % 10 == 9:
            s.append(click(f"n{i - 5}", T0 + 100 * i))
    s.append(click("ghost", T0 + 30_000))  # orphan: never shown
    s.append(click("early", T0 + 31_000))  # read before its impression: orphan
    s.append(impression("early", T0 + 30_000))
    s.append(impression("late", T0 + 31_000))
    for i in range(20):  # out of order: every other one 20 s behind
        s.append(impression(f"o{i}", T0 + 32_000 + 1_000 * i - (20_000 if i % 2 else 0)))
    s.append(impression("past", T0 - 10 * DAY_MS))  # far past: its window closed long ago
    s.append(click("past", T0 - 10 * DAY_MS + 1_000))  # and its click comes late
    s.append(impression("tick", T0 + 31_000 + WINDOW_MS + 1))  # closes "late"'s window
    s.append(click("late", T0 + 31_000 + WINDOW_MS + 2))  # after the window: late
    for i in range(2_000):  # a flood without clicks, all inside one window: evictions
        s.append(impression(f"f{i}", T0 + 100_000 + i))
    s.append(impression("future", T0 + 365 * DAY_MS))  # far future: every window closes
    s.append(click("end", T0 + 365 * DAY_MS + WINDOW_MS + 1))  # past the end + window
    return s


def reference_counts(stream: list[tuple[bytes, bytes]], max_closed: int) -> dict[str, int]:
    reference = ReferenceJoiner(window=WINDOW_MS, max_pending=MAX_PENDING, max_closed=max_closed)
    for seq, (_, value) in enumerate(stream):
        event = orjson.loads(value)
        if event["type"] == "impression":
            reference.add_impression(
                PendingImpression(event["id"], event["ts"], example(seq), 0.0, 0)
            )
        else:
            reference.add_click(event["id"], event["ts"])
    assert not reference.pending, "the last event passes end + window: nothing pending"
    return reference.counts


def test_7_join_edge_cases_match_the_event_time_reference_and_the_buffer_stays_bounded(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    rig = FaultRig(
        kafka_broker,
        tmp_path,
        partitions=1,
        overrides={"max_pending_impressions": str(MAX_PENDING), "max_poll_records": "100"},
    )
    try:
        stream = edge_case_stream()
        rig.produce(stream)
        ends = end_offsets(kafka_broker, rig.topics["input"])
        proc = rig.start()
        pending_seen: list[float] = []
        deadline = time.monotonic() + 120
        while last_checkpoint_offsets(rig.apply_log()) != ends:
            assert time.monotonic() < deadline, proc.tail()
            assert proc.alive(), proc.tail()
            metrics = proc.metrics()
            if "stream_fm_pending_impressions" in metrics:
                pending_seen.append(metrics["stream_fm_pending_impressions"])
            time.sleep(0.02)
        wait_until(lambda: "stream_fm_pending_impressions" in proc.metrics(), 10, "metrics", proc)
        final = proc.metrics()
        code, _ = proc.sigterm()
        assert code == 0, proc.tail()
        verdict = check_invariant(rig)
    finally:
        rig.close()

    state, _ = CheckpointStore(rig.checkpoint_dir).load_latest() or ({}, None)
    joiner = state["partitions"]["0"]
    expected = reference_counts(stream, int(joiner["max_closed_ids"]))
    actual = {k.removeprefix("count_"): int(v) for k, v in joiner.items() if k.startswith("count_")}
    assert {k: v for k, v in actual.items() if v} == expected
    assert expected["orphan_clicks"] == 3 and expected["late_clicks"] == 2
    assert expected["evicted"] > 1_000
    assert final["stream_fm_pending_impressions"] == 0, "drained once past end + window"
    assert max(pending_seen, default=0) <= MAX_PENDING
    assert final["stream_fm_pending_impressions_limit"] == MAX_PENDING
    for reason in ("late", "orphan", "evicted"):
        name = {
            "late": "stream_fm_late_clicks_total",
            "orphan": "stream_fm_orphan_clicks_total",
        }.get(reason, "stream_fm_evicted_impressions_total")
        key = {"late": "late_clicks", "orphan": "orphan_clicks", "evicted": "evicted"}[reason]
        assert final.get(name) == expected[key], f"{name}: {final.get(name)} != {expected[key]}"
    print(
        f"\n[faults] 7 join edge cases: reference counts {expected}, pending max "
        f"{max(pending_seen, default=0):.0f} (bound {MAX_PENDING}), pending at end 0, "
        f"records={verdict.records}"
    )
