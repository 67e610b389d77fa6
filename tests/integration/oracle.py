"""The fault suite's rig and exact-state oracle.

``FaultRig`` runs ``stream-fm run`` as child processes (``fault_worker.py``) on the real broker,
each writing the apply log; ``check_invariant`` then proves Invariant I from the log, the topic,
the group's committed offsets and the checkpoint store:

* per partition, checkpointed next offset == committed offset == log-end offset;
* the effective applied sequence (the log with every batch a crash or rollback undid taken
  out) covers each partition's offsets exactly once, in order, from 0 to the end;
* a fresh engine fed the effective batches, in order, ends bitwise equal to the checkpoint:
  model arrays, joiner state per partition, progressive-validation accumulators;
* every impression has a prediction; duplicates are at most the impressions the undone
  batches held.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream_fm.audit import read_apply_log
from stream_fm.checkpoint import CheckpointStore
from stream_fm.config import Settings, load_settings
from stream_fm.errors import BrokerError, InvalidEvent
from stream_fm.events import EventDecoder, Impression
from stream_fm.kafka import admin as kafka_admin
from stream_fm.kafka.admin import EventProducer
from stream_fm.tools.broker import KafkaBroker
from stream_fm.tools.process import free_ports
from stream_fm.worker import Worker
from tests.integration.kafka_helpers import client_under_test

FAULT_WORKER = Path(__file__).with_name("fault_worker.py")
RecordId = tuple[str, int, int]


class WorkerProc:
    """One worker child process; its log is kept for the assertion messages."""

    def __init__(self, env: Mapping[str, str], log_path: Path, fault: Mapping[str, str]) -> None:
        self.port = int(env["STREAM_FM_METRICS_PORT"])
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, str(FAULT_WORKER)],
            env={**os.environ, **env, **fault},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    def sigterm(self, timeout_s: float = 30.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds until exit)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"no exit {timeout_s}s after SIGTERM:\n{self.tail()}") from None
        finally:
            self._log.close()
        return code, time.monotonic() - started

    def wait_exit(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout_s}s:\n{self.tail()}") from None

    def readyz(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return int(r.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, keyed by name with labels as printed; {} if not answering."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except (OSError, urllib.error.URLError):
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class FaultRig:
    """Topics, a group, a checkpoint directory and an apply log shared by a scenario's workers."""

    broker: KafkaBroker
    work: Path
    partitions: int = 3
    overrides: dict[str, str] = field(default_factory=dict)
    name: str = "w"
    input_configs: dict[str, str] = field(default_factory=dict)  # e.g. a larger size limit
    kafka_client: str = field(default_factory=client_under_test)

    def __post_init__(self) -> None:
        run = uuid.uuid4().hex[:8]
        self.topics = {
            "input": f"faults-{run}-input",
            "predictions": f"faults-{run}-predictions",
            "dead_letters": f"faults-{run}-dead",
        }
        self.broker.create_topics(
            [self.topics["input"]], partitions=self.partitions, configs=self.input_configs
        )
        self.broker.create_topics([self.topics["predictions"], self.topics["dead_letters"]])
        self.group_id = f"faults-{run}"
        self.checkpoint_dir = self.work / "checkpoints"
        self.processes: list[WorkerProc] = []

    def env(self, apply_log: Path, port: int) -> dict[str, str]:
        env = {
            "STREAM_FM_BOOTSTRAP_SERVERS": self.broker.bootstrap_servers,
            "STREAM_FM_KAFKA_CLIENT": self.kafka_client,
            "STREAM_FM_GROUP_ID": self.group_id,
            "STREAM_FM_INPUT_TOPICS": self.topics["input"],
            "STREAM_FM_PREDICTIONS_TOPIC": self.topics["predictions"],
            "STREAM_FM_DEAD_LETTER_TOPIC": self.topics["dead_letters"],
            "STREAM_FM_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "STREAM_FM_APPLY_LOG_PATH": str(apply_log),
            "STREAM_FM_METRICS_PORT": str(port),
            "STREAM_FM_HASH_BITS": "14",
            "STREAM_FM_K": "4",
            "STREAM_FM_POLL_TIMEOUT_MS": "100",
            "STREAM_FM_MAX_POLL_RECORDS": "300",
            "STREAM_FM_PRODUCE_TIMEOUT_S": "20",
            "STREAM_FM_ATTRIBUTION_WINDOW_S": "60",
            "STREAM_FM_CHECKPOINT_INTERVAL_S": "0.5",
            "STREAM_FM_CHECKPOINT_EVERY_EVENTS": "2000",
            "STREAM_FM_LOG_LEVEL": "INFO",
            # A killed worker's partitions come back after this (the broker's minimum).
            "STREAM_FM_SESSION_TIMEOUT_MS": "6000",
        }
        env.update({f"STREAM_FM_{k.upper()}": v for k, v in self.overrides.items()})
        return env

    def apply_log(self, name: str | None = None) -> Path:
        return self.work / f"apply-{name or self.name}.jsonl"

    def settings(self) -> Settings:
        """The workers' settings, built by the same code from the same environment."""
        env = self.env(self.apply_log(), 0)
        env.pop("STREAM_FM_APPLY_LOG_PATH")
        return load_settings(env=env)

    def start(
        self,
        name: str | None = None,
        fault_step: str = "",
        fault_nth: int = 1,
        wedge_after: int = 0,
        own: Mapping[str, str] | None = None,
    ) -> WorkerProc:
        """A worker process; ``fault_step``/``fault_nth`` and ``wedge_after``: see
        fault_worker.py; ``own``: settings of this worker only (a transactional id)."""
        port = free_ports("127.0.0.1", 1)[0]
        fault = {"FAULT_STEP": fault_step, "FAULT_NTH": str(fault_nth)} if fault_step else {}
        if wedge_after:
            fault["FAULT_WEDGE_AFTER"] = str(wedge_after)
        env = self.env(self.apply_log(name), port)
        env.update({f"STREAM_FM_{k.upper()}": v for k, v in (own or {}).items()})
        proc = WorkerProc(env, self.work / f"{name or self.name}.log", fault)
        self.processes.append(proc)
        return proc

    def produce(
        self,
        records: Iterable[tuple[bytes | None, bytes | None]],
        max_request_size_bytes: int | None = None,
    ) -> int:
        n = 0
        with EventProducer(
            self.broker.bootstrap_servers, max_request_size_bytes=max_request_size_bytes
        ) as producer:
            for key, value in records:
                producer.send(self.topics["input"], key, value)
                n += 1
            producer.flush(60)
        return n

    def close(self) -> None:
        for proc in self.processes:
            if proc.alive():
                proc.process.kill()
                proc.process.wait()


# --- reading what happened -----------------------------------------------------------------


def applied_since_start(apply_log: Path) -> int:
    """Records applied by the newest process writing ``apply_log``."""
    if not apply_log.exists():
        return 0
    n = 0
    for event in read_apply_log(apply_log):
        if event["event"] == "start":
            n = 0
        elif event["event"] == "apply":
            n += len(event["records"])
    return n


def last_checkpoint_offsets(apply_log: Path, since_start: bool = False) -> dict[str, int] | None:
    """Offsets of the newest checkpoint in ``apply_log``, None before the first (``since_start``:
    one the newest process wrote)."""
    if not apply_log.exists():
        return None
    found = None
    for event in read_apply_log(apply_log):
        if event["event"] == "checkpoint":
            found = event["offsets"]
        elif event["event"] == "start" and since_start:
            found = None
    return found


def wait_until(condition: Any, timeout_s: float, what: str, proc: WorkerProc | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and not proc.alive():
            raise AssertionError(
                f"worker exited ({proc.process.returncode}) while waiting for {what}:\n{proc.tail()}"
            )
        time.sleep(0.05)
    raise AssertionError(
        f"timed out after {timeout_s}s waiting for {what}" + (f":\n{proc.tail()}" if proc else "")
    )


def read_topic(broker: KafkaBroker, topic: str) -> list[Any]:
    """Every record of ``topic`` up to its current end offsets."""
    return kafka_admin.read_topic(broker.bootstrap_servers, topic)


def end_offsets(broker: KafkaBroker, topic: str) -> dict[str, int]:
    return kafka_admin.end_offsets(broker.bootstrap_servers, topic)


def committed_offsets(broker: KafkaBroker, group_id: str, topic: str) -> dict[str, int | None]:
    """The group's offsets; a connection the loaded broker reset is asked again (3 times)."""
    for attempt in range(3):
        try:
            return kafka_admin.committed_offsets(broker.bootstrap_servers, group_id, topic)
        except BrokerError:
            if attempt == 2:
                raise
            time.sleep(1.0)
    raise AssertionError("unreachable")


def simulated(n: int, seed: int = 1, impressions_per_s: float = 20.0) -> list[tuple[bytes, bytes]]:
    """(key, value) of ``n`` simulated events, 20 fields, with 60 s attribution windows."""
    from itertools import islice

    from stream_fm.tools.simulate import SimulationParams, Simulator

    params = SimulationParams(
        n_impressions=n,
        n_fields=20,
        impressions_per_s=impressions_per_s,
        attribution_window_s=60.0,
        seed=seed,
    )
    events = islice(Simulator(params).generate().events(), n)
    return [(e["id"].encode(), orjson.dumps(e)) for e in events]


def _impression_id(value: bytes | None, decoder: EventDecoder) -> str | None:
    """The id if the worker's decoder takes ``value`` for a valid impression (now)."""
    try:
        event = decoder.decode(value or b"", decoder.latest_ts_ms(int(time.time() * 1000)))
    except InvalidEvent:
        return None
    return event.id if isinstance(event, Impression) else None


# --- the oracle ----------------------------------------------------------------------------


@dataclass
class History:
    """The effective applied batches of one worker lineage, and what faults undid."""

    batches: list[list[RecordId]]
    undone: list[list[list[RecordId]]]  # per restart or rollback: the batches it undid
    final_checkpoint: dict[str, Any] | None
    starts: int
    rollbacks: int
    problems: list[str]


def prefix_at(batches: list[list[RecordId]], offsets: Mapping[str, int]) -> int | None:
    """How many of ``batches`` a model that learned up to these next-offsets reflects (None: no
    prefix does).

    A checkpoint is taken between batches and every batch moves some partition on, so at most
    one prefix matches. Judged from the offsets alone, not from the log's checkpoint events:
    a crash between a checkpoint's rename and its log line must not fool the oracle.
    """
    target = {key: value for key, value in offsets.items() if value != 0}
    current: dict[str, int] = {}
    if current == target:
        return 0
    for k, batch in enumerate(batches, 1):
        for t, p, o in batch:
            current[f"{t}:{p}"] = o + 1
        if current == target:
            return k
    return None


def reconstruct(events: list[dict[str, Any]]) -> History:
    """Replay an apply log's bookkeeping: a process start restores the checkpoint it loaded
    (or nothing), a rollback its last checkpoint; what they drop was undone."""
    effective: list[list[RecordId]] = []
    undone: list[list[list[RecordId]]] = []
    problems: list[str] = []
    final: dict[str, Any] | None = None
    starts = rollbacks = 0
    before_start: list[list[RecordId]] | None = None

    def settle_start(keep: int) -> None:
        nonlocal before_start, effective
        assert before_start is not None
        effective = before_start[:keep]
        if starts > 1:
            undone.append(before_start[keep:])
        before_start = None

    def keep_for(batches: list[list[RecordId]], event: dict[str, Any]) -> int:
        keep = prefix_at(batches, event["applied"])
        if keep is None:
            problems.append(f"{event['event']} to {event['path']}: offsets match no applied prefix")
            return 0
        return keep

    for event in events:
        kind = event["event"]
        if before_start is not None and kind not in ("restore", "start"):
            settle_start(0)  # nothing in the store: a new model from offset 0
        if kind == "start":
            starts += 1
            # A start right after a start: the process before was killed before it restored
            # (or before anything else). It changed nothing, so the state it would have
            # restored is still the one to match (issue 19: taken for a cold start, this
            # failed every later generation).
            if before_start is None:
                before_start = effective
            final = None
        elif kind == "restore":
            assert before_start is not None
            settle_start(keep_for(before_start, event))
        elif kind == "apply":
            effective.append([tuple(r) for r in event["records"]])  # type: ignore[misc]
            final = None
        elif kind == "checkpoint":
            # Written beside the loop, a checkpoint covers what was applied when its state
            # was copied: a prefix of what is applied by the time it is durable.
            if prefix_at(effective, event["applied"]) is None:
                problems.append(f"checkpoint {event['path']} covers no prefix of what was applied")
            final = event
        elif kind == "rollback":
            keep = keep_for(effective, event)
            undone.append(effective[keep:])
            effective = effective[:keep]
            rollbacks += 1
        elif kind == "assign":
            key, offset = event["partition"], event["offset"]
            done = [o for batch in effective for (t, p, o) in batch if f"{t}:{p}" == key]
            expected = done[-1] + 1 if done else None
            if offset is not None and expected is not None and offset != expected:
                problems.append(
                    f"{key} assigned at {offset}, the model had applied up to {expected}"
                )
            if offset is None and expected is not None:
                problems.append(f"{key} assigned without state after {expected} records applied")
    if before_start is not None:  # the last process died before restoring: nothing changed
        settle_start(len(before_start))
    return History(effective, undone, final, starts, rollbacks, problems)


def assert_states_equal(actual: Any, expected: Any, where: str = "state") -> None:
    if isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), f"{where}: not an array"
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert np.array_equal(actual, expected, equal_nan=True), f"{where}: arrays differ"
    elif isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: not a mapping"
        assert set(actual) == set(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_states_equal(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{where}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_states_equal(a, e, f"{where}[{i}]")
    elif isinstance(expected, float) and np.isnan(expected):
        assert isinstance(actual, float) and np.isnan(actual), f"{where}: {actual} != nan"
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@dataclass
class Verdict:
    records: int
    batches: int
    restarts: int
    rollbacks: int
    undone_records: int
    impressions: int
    predictions: int
    duplicate_predictions: int
    duplicate_bound: int


def replay(
    settings: Settings, batches: list[list[RecordId]], values: Mapping[RecordId, bytes]
) -> Worker:
    """A fresh worker's engine fed ``batches`` exactly as the worker's loop feeds them."""
    fresh = Worker(settings)
    now_ms = int(time.time() * 1000)  # far-future records are refused now as they were then
    for batch in batches:
        fresh.pipeline.process([(p, values[(t, p, o)] or b"") for (t, p, o) in batch], now_ms)
    return fresh


def check_invariant(rig: FaultRig, apply_logs: list[Path] | None = None) -> Verdict:
    """Invariant I after the workers drained (see the module docstring)."""
    topic = rig.topics["input"]
    inputs = read_topic(rig.broker, topic)
    values: dict[RecordId, bytes] = {(r.topic, r.partition, r.offset): r.value for r in inputs}
    ends = end_offsets(rig.broker, topic)
    committed = committed_offsets(rig.broker, rig.group_id, topic)
    assert committed == ends, f"committed {committed} != log end {ends}"

    history = reconstruct(read_apply_log(apply_logs[0] if apply_logs else rig.apply_log()))
    assert not history.problems, history.problems
    assert history.final_checkpoint is not None, (
        "the last thing the worker did was not a checkpoint"
    )
    assert history.final_checkpoint["offsets"] == ends, "checkpointed offsets != log end"

    store = CheckpointStore(rig.checkpoint_dir)
    loaded = store.load_latest()
    assert loaded is not None
    state, path = loaded
    assert path.name == history.final_checkpoint["path"], (
        f"newest file {path.name} is not the last checkpoint"
    )
    assert state["offsets"] == ends

    per_partition: dict[str, list[int]] = {}
    for batch in history.batches:
        for t, p, o in batch:
            per_partition.setdefault(f"{t}:{p}", []).append(o)
    for key, end in ends.items():
        applied = per_partition.get(key, [])
        assert applied == list(range(end)), (
            f"{key}: applied offsets are not exactly [0, {end}) in order "
            f"({len(applied)} applied, {len(set(applied))} distinct)"
        )

    fresh = replay(rig.settings(), history.batches, values)
    assert_states_equal(fresh.engine.state(), state["engine"], "engine")
    assert_states_equal(fresh.pipeline.evaluator.state(), state["evaluator"], "evaluator")
    joiners = {str(p): j.state() for p, j in fresh.pipeline.joiners.items()}
    assert_states_equal(joiners, state["partitions"], "partitions")

    decoder = fresh.pipeline.decoder
    impressions = {i for r in inputs if (i := _impression_id(r.value, decoder)) is not None}
    predicted = Counter(
        orjson.loads(r.value)["id"] for r in read_topic(rig.broker, rig.topics["predictions"])
    )
    missing = impressions - set(predicted)
    assert not missing, (
        f"{len(missing)} impressions without a prediction, e.g. {sorted(missing)[:3]}"
    )
    undone_impressions = sum(
        1
        for fault in history.undone
        for batch in fault
        for rid in batch
        if _impression_id(values[rid], decoder) is not None
    )
    duplicates = sum(predicted.values()) - len(predicted)
    assert duplicates <= undone_impressions, (
        f"{duplicates} duplicate predictions, more than the {undone_impressions} impressions "
        "processed after the last durable checkpoint before each fault"
    )
    return Verdict(
        records=len(values),
        batches=len(history.batches),
        restarts=history.starts - 1,
        rollbacks=history.rollbacks,
        undone_records=sum(len(b) for fault in history.undone for b in fault),
        impressions=len(impressions),
        predictions=sum(predicted.values()),
        duplicate_predictions=duplicates,
        duplicate_bound=undone_impressions,
    )
