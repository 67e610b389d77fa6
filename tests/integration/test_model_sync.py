"""One model per consumer group (issue 20), on the real broker through real ``stream-fm run``
processes: every worker publishes what it learns to the model-updates topic and applies its
peers' updates, so every worker of the group counts every example once and serves one model."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_fm.audit import read_apply_log
from stream_fm.sync.wire import decode
from stream_fm.tools.broker import KafkaBroker
from tests.integration.oracle import (
    FaultRig,
    WorkerProc,
    committed_offsets,
    end_offsets,
    read_topic,
    replay,
    simulated,
    wait_until,
)
from tests.integration.test_faults_output import set_topic_config

pytestmark = pytest.mark.usefixtures("kafka_client")


def sample(proc: WorkerProc, name: str) -> float | None:
    return proc.metrics().get(name)


def started(proc: WorkerProc) -> int:
    """Runs of a worker name that got as far as their metrics server (signals handled)."""
    try:
        return proc.log_path.read_text(errors="replace").count("/healthz and /readyz on")
    except OSError:
        return 0


SyncRig = Callable[[int], FaultRig]


@pytest.fixture
def sync_rig(kafka_broker: KafkaBroker, tmp_path: Path) -> Iterator[SyncRig]:
    """``sync_rig(partitions)``: a fault rig whose workers serve one model (a fresh updates
    topic, 200 ms rounds); its workers are stopped afterwards, whatever the outcome."""
    made: list[FaultRig] = []

    def make(partitions: int) -> FaultRig:
        topic = f"sync-{uuid.uuid4().hex[:8]}-updates"
        overrides = {"model_updates_topic": topic, "model_sync_interval_ms": "200"}
        made.append(FaultRig(kafka_broker, tmp_path, partitions=partitions, overrides=overrides))
        return made[-1]

    try:
        yield make
    finally:
        for rig in made:
            rig.close()


def wait_all_committed(rig: FaultRig, proc: WorkerProc, timeout_s: float) -> None:
    ends = end_offsets(rig.broker, rig.topics["input"])
    wait_until(
        lambda: committed_offsets(rig.broker, rig.group_id, rig.topics["input"]) == ends,
        timeout_s,
        "the group through every record",
        proc,
    )


def assert_one_model(rig: FaultRig, procs: list[WorkerProc], timeout_s: float) -> int:
    """Every worker's model counts the examples one worker alone learns from the input, each
    once; returns that count."""
    want = reference_learned(rig)
    deadline = time.monotonic() + timeout_s
    while (versions := [sample(p, "stream_fm_model_version") for p in procs]) != [want] * len(
        procs
    ):
        assert time.monotonic() < deadline, f"models at {versions} examples, one worker {want}"
        time.sleep(0.5)
    return want


def owns(rig: FaultRig, name: str) -> bool:
    """The worker was assigned partitions (its apply log says so)."""
    log = rig.apply_log(name)
    return log.exists() and any(e["event"] == "assign" for e in read_apply_log(log))


def learned_in_updates(rig: FaultRig) -> dict[str, int]:
    """Examples each writer published as learned, read back from the updates topic."""
    per_writer: dict[str, int] = {}
    for record in read_topic(rig.broker, rig.overrides["model_updates_topic"]):
        update = decode(record.value)
        per_writer[update.writer] = per_writer.get(update.writer, 0) + update.delta.learned
    return per_writer


def test_two_workers_serve_one_model_every_example_counted_once_on_each(
    sync_rig: SyncRig,
) -> None:
    rig = sync_rig(4)
    a, b = rig.start("a"), rig.start("b")
    wait_until(lambda: owns(rig, "a") and owns(rig, "b"), 90, "both workers owning partitions", b)
    total = rig.produce(simulated(8_000, seed=20, impressions_per_s=200.0))
    wait_all_committed(rig, a, 120)
    assert total == 8_000

    want = assert_one_model(rig, [a, b], 60)
    writers = learned_in_updates(rig)  # each example published once, by the one learning it
    assert len(writers) == 2 and all(n > 0 for n in writers.values()), writers
    assert sum(writers.values()) == want, (writers, want)
    for proc in (a, b):
        metrics = proc.metrics()
        assert metrics["stream_fm_model_updates_published_total"] > 0
        assert metrics["stream_fm_model_updates_applied_total"] > 0
        assert metrics['stream_fm_model_update_bytes_total{direction="applied"}'] > 0
        assert not any(
            v for k, v in metrics.items() if k.startswith("stream_fm_model_updates_rejected_total")
        )

    def probes_agree() -> bool:  # once the increments held back (5 s at most) went out too
        probes = [sample(p, "stream_fm_model_probe_p") for p in (a, b)]
        return None not in probes and abs(probes[0] - probes[1]) < 1e-3  # type: ignore[operator]

    wait_until(probes_agree, 30, "both workers' probe p within 1e-3", b)
    for proc in (a, b):
        code, _ = proc.sigterm()
        assert code == 0, proc.tail()


def reference_learned(rig: FaultRig) -> int:
    """Examples one worker alone learns from the whole input (each partition in order)."""
    inputs = read_topic(rig.broker, rig.topics["input"])
    values = {(r.topic, r.partition, r.offset): r.value for r in inputs}
    by_partition: dict[int, list[tuple[str, int, int]]] = {}
    for key in sorted(values):
        by_partition.setdefault(key[1], []).append(key)
    return replay(rig.settings(), list(by_partition.values()), values).engine.n_learned


def test_three_workers_kill9_at_20_points_every_example_learned_once_by_each(
    sync_rig: SyncRig, round_seed: int
) -> None:
    """Issue 20's invariant: one of three workers is killed at 20 random points and started
    again; at the end every worker's model counts every example the input holds exactly once
    (as many as one worker alone learns): nothing a crash redid was learned twice anywhere,
    nothing a dead worker published was lost."""
    churn(sync_rig(6), round_seed, "kill -9", lambda proc: proc.kill9())


def test_three_workers_leaving_and_joining_20_times_every_example_learned_once_by_each(
    sync_rig: SyncRig, round_seed: int
) -> None:
    """The same with workers leaving on SIGTERM (their last updates published first) and a
    new one joining in their place, under load."""

    def leave(proc: WorkerProc) -> None:
        code, _ = proc.sigterm(timeout_s=60)
        assert code == 0, proc.tail()

    churn(sync_rig(6), round_seed, "SIGTERM", leave, started_first=True)


def churn(
    rig: FaultRig,
    seed: int,
    how: str,
    stop: Callable[[WorkerProc], None],
    started_first: bool = False,
) -> None:
    """Three workers of one model; 20 times one of them stops (``stop``) at a random moment
    under load and a new one starts; then every worker's model must count each example once.
    ``started_first``: the victim is stopped only once its worker runs (a SIGTERM during
    Python's start-up is a kill, which the kill -9 scenario covers)."""
    rng = random.Random(seed)
    names = ("a", "b", "c")
    procs = {name: rig.start(name) for name in names}
    runs = {name: 1 for name in names}
    wait_until(lambda: all(owns(rig, n) for n in names), 120, "three workers owning", procs["c"])
    events = simulated(30_000, seed=seed)
    plan = []
    for kill in range(20):
        rig.produce(events[kill * 1_500 : (kill + 1) * 1_500])
        time.sleep(rng.uniform(0.2, 3.0))
        victim = rng.choice(names)
        if started_first:
            proc, n = procs[victim], runs[victim]
            wait_until(lambda p=proc, n=n: started(p) >= n, 60, "the worker started", proc)
        stop(procs[victim])
        procs[victim] = rig.start(victim)
        runs[victim] += 1
        plan.append(victim)
    wait_all_committed(rig, procs["a"], 240)
    want = assert_one_model(rig, [procs[n] for n in names], 120)
    for name in names:
        code, _ = procs[name].sigterm()
        assert code == 0, procs[name].tail()
    print(f"\n[sync] {how} x20 of 3 workers, seed {seed}: {plan}; {want} examples", flush=True)


def test_rollbacks_under_model_sync_learn_every_example_once_by_each(
    sync_rig: SyncRig,
) -> None:
    """The predictions topic refuses every record for a while: both workers roll back (their
    model to the last checkpoint, the updates read again from its position) and retry; once
    it is fixed, each model counts every example once."""
    rig = sync_rig(4)
    a, b = rig.start("a"), rig.start("b")
    wait_until(lambda: owns(rig, "a") and owns(rig, "b"), 120, "both workers owning", b)
    events = simulated(9_000, seed=24)
    rig.produce(events[:3_000])
    set_topic_config(rig.broker, rig.topics["predictions"], {"max.message.bytes": "60"})
    rig.produce(events[3_000:6_000])

    def rollbacks() -> float:
        return sum(p.metrics().get("stream_fm_rollbacks_total", 0.0) for p in (a, b))

    wait_until(lambda: rollbacks() >= 2, 60, "rollbacks while predictions are refused", a)
    set_topic_config(rig.broker, rig.topics["predictions"], {"max.message.bytes": "1048588"})
    rig.produce(events[6_000:])
    wait_all_committed(rig, a, 180)
    assert_one_model(rig, [a, b], 60)
    for proc in (a, b):
        code, _ = proc.sigterm()
        assert code == 0, proc.tail()


def test_two_transactional_workers_serve_one_model(sync_rig: SyncRig) -> None:
    """With ``transactional_id`` the updates go out in each worker's transactions and are read
    ``read_committed``: each model still counts every example once."""
    rig = sync_rig(4)
    run = uuid.uuid4().hex[:8]
    a = rig.start("a", own={"transactional_id": f"sync-{run}-a"})
    b = rig.start("b", own={"transactional_id": f"sync-{run}-b"})
    wait_until(lambda: owns(rig, "a") and owns(rig, "b"), 120, "both workers owning", b)
    rig.produce(simulated(8_000, seed=25, impressions_per_s=200.0))
    wait_all_committed(rig, a, 180)
    assert_one_model(rig, [a, b], 90)
    for proc in (a, b):
        code, _ = proc.sigterm()
        assert code == 0, proc.tail()
