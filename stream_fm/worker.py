"""The worker loop: poll -> decode -> join -> score -> publish -> learn -> observe -> checkpoint.

State and offsets move together: a checkpoint holds the model, each partition's pending
impressions, the progressive-validation accumulator and the input offsets they reflect.
Predictions are acknowledged before any offset past them is checkpointed; a produce failure
rolls the worker back to its last checkpoint, so nothing is learned twice or lost.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from stream_fm import __version__
from stream_fm.audit import ApplyLog
from stream_fm.checkpoint import CheckpointStore, host_part
from stream_fm.config import Settings, describe
from stream_fm.errors import (
    BrokerError,
    CheckpointCorrupt,
    CheckpointError,
    InvalidEvent,
    MissingCheckpoint,
    ProduceError,
    StreamFMError,
)
from stream_fm.evaluate import ProgressiveValidation
from stream_fm.events import REASONS
from stream_fm.join import AttributionJoiner
from stream_fm.kafka import KafkaIO, Partition, Record, UnreadableRecord, connect
from stream_fm.metrics import MetricsServer, WorkerMetrics
from stream_fm.model import FastFM
from stream_fm.outputs import dead_letter, label_json, prediction_json
from stream_fm.pipeline import BatchResult, Pipeline

log = logging.getLogger("stream_fm.worker")

CHECKPOINT_FORMAT = 1
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LAG_REFRESH_S = 5.0
AUC_REFRESH_S = 1.0
BROKER_RETRY_S = 1.0
# After a produce failure the worker waits before it redoes anything, doubling the wait at
# each failure until a checkpoint succeeds: a refusal that repeats is never a hot loop.
RETRY_BACKOFF_S = (1.0, 30.0)


def _unreadable(record: Record) -> InvalidEvent:
    assert isinstance(record, UnreadableRecord)
    return InvalidEvent("unreadable_record", record.error)


def writer_id() -> str:
    """This process's name in the shared checkpoint store: host, pid and a random suffix."""
    return f"{host_part()}_{os.getpid()}_{os.urandom(3).hex()}"


def _partition_key(partition: Partition) -> str:
    return f"{partition[0]}:{partition[1]}"


class Worker:
    """One consumer-group member. ``run()`` blocks until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry, invalid_reasons=REASONS, version=__version__)
        self.metrics.pending_impressions_limit.set(settings.max_pending_impressions)
        self.metrics.watch_readiness(self.ready)
        self.engine = FastFM(settings.model)
        self.pipeline = Pipeline.from_settings(settings, self.engine)
        self.store = CheckpointStore(
            Path(settings.checkpoint_dir),
            keep=settings.checkpoint_keep,
            writer=writer_id(),
            progress_key="offsets",
        )
        self.apply_log = ApplyLog(settings.apply_log_path) if settings.apply_log_path else None
        self.offsets: dict[Partition, int] = {}  # next offset to process, per owned partition
        # How far this model has moved through each partition it ever owned (a snapshot carries
        # partitions that moved away since): the next offset, by learning or by taking the
        # partition over there. Audits match restores and rollbacks on it.
        self.applied: dict[str, int] = {}
        self.io: KafkaIO | None = None
        self.server: MetricsServer | None = None
        self._stopping = threading.Event()
        self._fatal: BaseException | None = None
        # The rollback target: the last durable state, plus partitions restored since.
        self._checkpoint: dict[str, Any] | None = None
        self._checkpoint_path: Path | None = None
        self._checkpoint_problem: str | None = None
        self._output_problem: str | None = None  # set by a rejected output, cleared by a checkpoint
        self._backoff_s = (
            0.0  # the wait after the last produce failure; 0 once a checkpoint made it
        )
        self._retry_at_s = 0.0
        self._backoff_permanent = False  # the last failure was the broker refusing records
        self._broker_seen_away = False  # the broker failed a probe since the last failure
        # Transactional mode: the group's committed offsets, which tell valid checkpoints.
        self._committed: dict[str, int | None] = {}
        # Assigned partitions with no durable state yet: the first offset processed becomes
        # their rollback point.
        self._unanchored: set[Partition] = set()
        self._restored = False
        self._rollback_needed = False
        self._dirty = False
        self._events_since_checkpoint = 0
        self._last_checkpoint_s = time.monotonic()
        self._last_loop_s = time.monotonic()
        self._last_lag_s = 0.0
        self._last_auc_s = -AUC_REFRESH_S
        self._auc: float | None = None
        self._started_s = time.monotonic()
        self.totals: Counter[str] = Counter()
        self._join_seen: dict[str, int] = {}

    # lifecycle
    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint, commit and return."""
        self._stopping.set()

    def run(self) -> int:
        settings = self.settings
        log.info("starting with %s", describe(settings))
        self.server = MetricsServer(
            self.registry,
            settings.metrics_host,
            settings.metrics_port,
            health_check=self.health,
            ready_check=self.ready,
        ).start()
        log.info("metrics, /healthz and /readyz on %s", self.server.url)
        code = 0
        try:
            outputs = [settings.predictions_topic, settings.dead_letter_topic]
            self.io = connect(
                settings, outputs + ([settings.labels_topic] if settings.labels_topic else [])
            )
            missing = self.io.wait_for_topics(settings.input_topics, timeout_s=30)
            if missing:
                log.warning(
                    "input topic(s) %s not found yet; waiting for them to appear",
                    ", ".join(missing),
                )
            if self.apply_log is not None:
                self.apply_log.write("start", writer=self.store.writer)
            self._restore_or_refuse()
            self.io.subscribe(settings.input_topics, self._on_assigned, self._on_revoked)
            while not self._stopping.is_set():
                self.step()
            try:
                if self._dirty:  # else the newest generation already holds this state
                    self._checkpoint_and_commit(reason="shutdown")
            except (ProduceError, CheckpointError) as error:
                # Nothing is lost: the next start resumes from the last durable checkpoint.
                log.error("%s: stopped without a final checkpoint", error)
                if isinstance(error, ProduceError):
                    kind = "permanent" if error.permanent else "transient"
                    self.metrics.produce_errors.labels(kind=kind).inc()
                code = 1
        finally:
            if self.io is not None:
                self.io.close()
            if self.apply_log is not None:
                self.apply_log.close()
            self.server.stop()
        log.info(self.summary())
        print(self.summary(), flush=True)
        return code

    def step(self) -> None:
        """One poll and, if records came, one batch. Safe to call repeatedly."""
        assert self.io is not None
        if self._fatal is not None:
            raise self._fatal
        now = time.monotonic()
        if now < self._retry_at_s and not self._broker_came_back():
            # Backing off after a produce failure: nothing is redone before the wait is over.
            time.sleep(min(self._retry_at_s - now, 0.2))
            self._last_loop_s = time.monotonic()
            return
        try:
            records = self.io.poll(self.settings.poll_timeout_ms, self.settings.max_poll_records)
        except BrokerError as error:
            log.warning("%s; retrying", error)
            time.sleep(BROKER_RETRY_S)
            records = []
        if self._fatal is not None:
            raise self._fatal
        try:
            if self._rollback_needed:
                raise ProduceError("no checkpoint could be written at a rebalance")
            if records:
                self._process(records)
            now = time.monotonic()
            due = now - self._last_checkpoint_s >= self.settings.checkpoint_interval_s
            if self._dirty and (
                due or self._events_since_checkpoint >= self.settings.checkpoint_every_events
            ):
                self._try_checkpoint(reason="periodic")
        except ProduceError as error:
            self._produce_failed(error)
        now = time.monotonic()
        self._last_loop_s = now
        if now - self._last_lag_s >= LAG_REFRESH_S:
            self._last_lag_s = now
            for (topic, partition), lag in self.io.lag().items():
                self.metrics.set_lag(topic, partition, lag)

    def _broker_came_back(self) -> bool:
        """While backing off from a transient failure: the broker, seen away, answers again.
        Then the wait ends at once, so an outage costs its own length and not a doubled wait."""
        assert self.io is not None
        if self._backoff_permanent:
            return False
        if not self.io.reachable():
            self._broker_seen_away = True
            return False
        return self._broker_seen_away

    def _produce_failed(self, error: ProduceError) -> None:
        """Roll back to the last checkpoint, then wait before redoing anything: 1 s, doubling
        up to 30 s until a checkpoint succeeds, so a refusal that repeats (an ACL, a topic
        limit below every record) costs one redo per wait, never a hot loop of duplicates.
        Until then every batch is flushed before the next, so a repeat is seen at once."""
        assert self.io is not None
        if error.permanent and error.topic is not None and error.nbytes is not None:
            self.io.record_rejected(error.topic, error.nbytes)  # the next copy is cut to fit
        low, high = RETRY_BACKOFF_S
        self._backoff_s = min(high, self._backoff_s * 2) if self._backoff_s else low
        self._retry_at_s = time.monotonic() + self._backoff_s
        self._backoff_permanent, self._broker_seen_away = error.permanent, False
        kind = "permanent" if error.permanent else "transient"
        self._output_problem = f"{error}; retrying in {self._backoff_s:g}s"
        log.error(
            "%s: rolling back to the last checkpoint, retrying in %gs", error, self._backoff_s
        )
        self.metrics.produce_errors.labels(kind=kind).inc()
        self.metrics.rollbacks.inc()
        self.totals["rollbacks"] += 1
        self._rollback()

    # the batch
    def _process(self, records: Sequence[Record]) -> None:
        assert self.io is not None
        started = time.perf_counter()
        result = self.pipeline.process(
            [
                (r.partition, _unreadable(r) if type(r) is UnreadableRecord else r.value or b"")
                for r in records
            ],
            now_ms=int(time.time() * 1000),
        )
        self._publish(result, records)
        if self._unanchored:
            self._anchor(records)
        for record in records:
            self.offsets[(record.topic, record.partition)] = record.offset + 1
        # Per batch, not per record: owned partitions' next offsets only grow.
        self.applied.update({_partition_key(tp): offset for tp, offset in self.offsets.items()})
        if self.apply_log is not None:
            self.apply_log.write(
                "apply", records=[[r.topic, r.partition, r.offset] for r in records]
            )
        self._dirty = True
        self._events_since_checkpoint += len(records)
        self._observe(result, records, time.perf_counter() - started)

    def _publish(self, result: BatchResult, records: Sequence[Record]) -> None:
        """Hand the batch's outputs to the producer; raise ProduceError if one was refused."""
        assert self.io is not None
        settings, io = self.settings, self.io
        predictions = result.predictions
        io.send_keyed(
            settings.predictions_topic,
            [p.id.encode() for p in predictions],
            [prediction_json(p) for p in predictions],
        )
        limit = io.record_limit_bytes(settings.dead_letter_topic)
        for rejected in result.invalid:
            record = records[rejected.position]
            key, value, headers = dead_letter(
                record.key,
                record.value,
                rejected.reason,
                rejected.detail,
                record.topic,
                record.partition,
                record.offset,
                limit_bytes=limit,
            )
            io.send(settings.dead_letter_topic, key, value, headers)
        if settings.labels_topic:
            learned = result.learned
            io.send_keyed(
                settings.labels_topic,
                [x.id.encode() for x in learned],
                [label_json(x) for x in learned],
            )
        if self._backoff_s:
            # Recovering from a produce failure: acknowledged before the next batch, so a
            # repeat of the failure is met with the least to redo.
            io.flush()
        else:
            # Acknowledgements are awaited only before a checkpoint (the one place offsets
            # become durable), not per batch: the loop never waits a round trip per poll. A
            # refusal seen meanwhile rolls back at once rather than at the next checkpoint.
            io.check()

    def _anchor(self, records: Sequence[Record]) -> None:
        for record in records:
            tp = (record.topic, record.partition)
            if tp in self._unanchored:
                self._unanchored.discard(tp)
                if self._checkpoint is not None:
                    self._checkpoint["offsets"].setdefault(_partition_key(tp), record.offset)

    def _join_deltas(self) -> dict[str, int]:
        """Joiner counts since the last call, per counter (for Prometheus counters).

        The baseline is reset whenever joiners are restored, so restored totals are not
        counted again and dropped partitions never give negative increments.
        """
        now = self.pipeline.join_counters()
        deltas = {key: max(0, n - self._join_seen.get(key, 0)) for key, n in now.items()}
        self._join_seen = now
        return deltas

    def _observe(self, result: BatchResult, records: Sequence[Record], seconds: float) -> None:
        join = self._join_deltas()
        now_ms = time.time() * 1000
        served_after_ms = np.array(
            [now_ms - records[p.position].timestamp for p in result.predictions]
        )
        invalid = Counter(r.reason for r in result.invalid)
        self.metrics.observe_batch(
            events_by_type=result.events_by_type,
            invalid_by_reason=invalid,
            duplicates_by_kind={
                "impression": join.get("duplicate_impressions", 0),
                "click": join.get("duplicate_clicks", 0),
            },
            predictions=len(result.predictions),
            learned_pos=result.learned_positives,
            learned_neg=result.learned_negatives,
            logloss_sum=result.logloss_sum,
            prediction_sum=result.prediction_sum,
            late=join.get("late_clicks", 0),
            orphan=join.get("orphan_clicks", 0),
            evicted=join.get("evicted", 0),
            batch_seconds=seconds,
            impression_to_prediction_s=np.maximum(served_after_ms, 0.0) / 1000,
            click_delays_s=np.asarray(result.click_delays_ms, dtype=np.float64) / 1000,
        )
        for key in ("late_clicks", "orphan_clicks", "evicted"):
            self.totals[key] += join.get(key, 0)
        self.totals["events"] += len(records)
        self.totals["invalid"] += len(result.invalid)
        self.totals["predictions"] += len(result.predictions)
        self.totals["learned"] += result.learned_positives + result.learned_negatives
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        evaluator = self.pipeline.evaluator
        now = time.monotonic()
        if now - self._last_auc_s >= AUC_REFRESH_S:
            # Exact AUC sorts the whole window (~15 ms at 100k): once a second is enough.
            self._last_auc_s = now
            auc = evaluator.auc_window
            self._auc = None if math.isnan(auc) else auc
        self.metrics.set_quality(
            evaluator.logloss, evaluator.normalized_entropy, evaluator.calibration, self._auc
        )
        self.metrics.set_window_quality(
            evaluator.logloss_window, evaluator.normalized_entropy_window
        )
        self.metrics.set_pending(self.pipeline.pending_count)
        self.metrics.set_model_version(self.engine.n_learned)

    # checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "group_id": self.settings.group_id,
            "saved_at_s": time.time(),
            "engine": self.engine.state(),
            "evaluator": self.pipeline.evaluator.state(),
            "partitions": {str(p): joiner.state() for p, joiner in self.pipeline.joiners.items()},
            "offsets": {_partition_key(tp): offset for tp, offset in self.offsets.items()},
            "applied": dict(self.applied),
        }

    def _checkpoint_and_commit(self, reason: str, in_callback: bool = False) -> None:
        """Await acknowledgements, write the state durably, then commit its offsets.

        Transactional mode: the file is written first and counts only once the transaction
        carrying its offsets commits (``_restore_or_refuse`` checks the group's offsets).
        Raises ProduceError (an output was rejected, or the transaction failed) or
        CheckpointError (the disk failed); either way nothing was committed.
        """
        if self.io is None or not self._restored:
            return
        self.io.flush()
        state = self._state()
        try:
            path = self.store.save(state)
        except CheckpointError:
            self.metrics.checkpoint_errors.inc()
            self.totals["checkpoint_errors"] += 1
            raise
        self.store.fault("committing")
        if self.io.transactional:
            try:
                self.io.commit_transaction(self.offsets)
            except ProduceError:
                self.store.discard(path)  # its outputs were aborted: never restore it
                raise
            # Known without asking the broker (a blocking call is not allowed in a rebalance
            # callback): partitions taken over later are judged by these offsets.
            self._committed.update(
                {_partition_key(tp): offset for tp, offset in self.offsets.items()}
            )
        else:
            try:
                self.io.commit(self.offsets, wait=not in_callback)
            except BrokerError as error:
                # The checkpoint is the truth; a failed commit only delays lag reporting.
                log.warning("%s; offsets stay in the checkpoint", error)
        self.store.fault("committed")
        if self._checkpoint_problem is not None:
            log.info("checkpoints are written again")
        if self._output_problem is not None:
            log.info("outputs are acknowledged again")
        self._checkpoint_problem = self._output_problem = None
        self._backoff_s = 0.0
        self._checkpoint, self._checkpoint_path = state, path
        self._dirty = False
        self._events_since_checkpoint = 0
        self._last_checkpoint_s = time.monotonic()
        self.metrics.mark_checkpoint()
        self.metrics.checkpoints.inc()
        self.totals["checkpoints"] += 1
        if self.apply_log is not None:
            self.apply_log.write(
                "checkpoint", path=path.name, offsets=state["offsets"], applied=state["applied"]
            )
        log.debug("checkpoint %s (%s)", path.name, reason)

    def _try_checkpoint(self, reason: str, in_callback: bool = False) -> bool:
        """A checkpoint whose disk failure is survivable: counted, reported not-ready, retried
        at the next interval. Offsets stay uncommitted meanwhile."""
        try:
            self._checkpoint_and_commit(reason, in_callback=in_callback)
        except CheckpointError as error:
            if self._checkpoint_problem is None:
                log.error("%s; retrying every %gs", error, self.settings.checkpoint_interval_s)
            self._checkpoint_problem = str(error)
            # Retry after the interval or the event count again, not at every batch.
            self._last_checkpoint_s = time.monotonic()
            self._events_since_checkpoint = 0
            return False
        return True

    def _restore_or_refuse(self) -> None:
        """Warm-start from the freshest checkpoint in the store (any worker's), or refuse to
        start cold over committed offsets."""
        assert self.io is not None
        if self.io.transactional:
            self._committed = self._group_offsets()
            loaded = self.store.load_latest(accept=self._transaction_committed)
        else:
            loaded = self.store.load_latest()
        if loaded is not None:
            state, path = loaded
            if state.get("format") != CHECKPOINT_FORMAT:
                raise StreamFMError(
                    f"checkpoint {path} has format {state.get('format')}, expected {CHECKPOINT_FORMAT}"
                )
            # Step sizes may be retuned between runs; buckets, k and optimizer must match
            # (ModelStateMismatch names the difference and stops the start).
            self.engine.load_state(state["engine"], strict=False)
            self.pipeline.evaluator = ProgressiveValidation.from_state(state["evaluator"])
            # Partitions are taken from the store at assignment, not from this snapshot.
            self.applied = dict(state.get("applied", state["offsets"]))
            self._checkpoint = {
                **state,
                "partitions": {},
                "offsets": {},
                "applied": dict(self.applied),
            }
            self._checkpoint_path = path
            self.metrics.mark_checkpoint(float(state["saved_at_s"]))
            if self.apply_log is not None:
                self.apply_log.write(
                    "restore", path=path.name, offsets=state["offsets"], applied=self.applied
                )
            log.info(
                "restored %s: model_version=%d, %d examples evaluated",
                path.name,
                self.engine.n_learned,
                self.pipeline.evaluator.examples,
            )
            self._publish_gauges()
            return
        committed = self._committed if self.io.transactional else self._group_offsets()
        found = {tp: offset for tp, offset in committed.items() if offset is not None}
        if found and not self.settings.cold_start:
            raise MissingCheckpoint(
                f"group {self.settings.group_id!r} has committed offsets ({len(found)} partitions) but no "
                f"checkpoint was found in {self.settings.checkpoint_dir!r}: starting would silently lose the "
                "learned model. Point checkpoint_dir at the checkpoints, or pass --cold-start to start a new model."
            )
        if found:
            log.warning("--cold-start: a new model over the group's committed offsets")

    def _group_offsets(self) -> dict[str, int | None]:
        """The group's committed offset of every input partition (blocking: not in callbacks)."""
        assert self.io is not None
        return {
            _partition_key((topic, partition)): self.io.committed((topic, partition))
            for topic in self.settings.input_topics
            for partition in sorted(self.io.partitions_for(topic))
        }

    def _transaction_committed(self, path: Path) -> bool:
        """Transactional mode: a checkpoint counts only if the transaction that carried its
        offsets committed, i.e. none of its offsets is past the group's committed offset."""
        for key, offset in self.store.progress(path).items():
            committed = self._committed.get(key)
            if committed is None or offset > committed:
                return False
        return True

    def _on_assigned(self, partitions: list[Partition]) -> None:
        try:
            self._assign(partitions)
        except BaseException as error:  # kafka-python swallows listener errors: hand it to the loop
            self._fatal = error

    def _partition_state(
        self, tp: Partition, loaded: dict[Path, dict[str, Any]]
    ) -> tuple[int, dict[str, Any] | None, str] | None:
        """The most advanced durable state of one partition in the store, whichever worker
        wrote it: (next offset, joiner state, file name), or None if no checkpoint holds it."""
        key = _partition_key(tp)
        for path in self.store.candidates(key):
            if (
                self.io is not None
                and self.io.transactional
                and not self._transaction_committed(path)
            ):
                continue
            state = loaded.get(path)
            if state is None:
                try:
                    state = self.store.load(path)
                except (CheckpointCorrupt, CheckpointError) as error:
                    log.warning("skipping %s for %s: %s", path.name, key, error)
                    continue
                loaded[path] = state
            offset = state.get("offsets", {}).get(key)
            if offset is not None:
                return int(offset), state.get("partitions", {}).get(str(tp[1])), path.name
        return None

    def _assign(self, partitions: list[Partition]) -> None:
        assert self.io is not None
        # Read from disk, not from memory: the rollback target in memory has partitions merged
        # into it that its file does not hold.
        loaded: dict[Path, dict[str, Any]] = {}
        for tp in partitions:
            found = self._partition_state(tp, loaded)
            if found is None:
                # Never checkpointed: the group's committed offset (or the reset) applies.
                self._unanchored.add(tp)
                if self.apply_log is not None:
                    self.apply_log.write(
                        "assign", partition=_partition_key(tp), offset=None, path=None
                    )
                continue
            offset, joiner_state, source = found
            self.io.seek(tp, offset)
            self.offsets[tp] = offset
            partition = tp[1]
            if partition not in self.pipeline.joiners and joiner_state is not None:
                self.pipeline.joiners[partition] = AttributionJoiner.from_state(joiner_state)
            if self._checkpoint is not None:
                # A rollback must return this partition to where it was taken over.
                self._checkpoint["offsets"][_partition_key(tp)] = offset
                if joiner_state is not None:
                    self._checkpoint["partitions"][str(partition)] = joiner_state
            if self.apply_log is not None:
                self.apply_log.write(
                    "assign", partition=_partition_key(tp), offset=offset, path=source
                )
        self._restored = True
        self._join_seen = self.pipeline.join_counters()
        self._publish_gauges()
        log.info("assigned %s", ", ".join(_partition_key(tp) for tp in partitions) or "nothing")
        if self._checkpoint is None:
            # A first generation at once, so a produce failure always has a state to roll back to.
            self._dirty = True
            self._try_checkpoint(reason="first assignment", in_callback=True)

    def _on_revoked(self, partitions: list[Partition]) -> None:
        try:
            if partitions and self._dirty:
                try:
                    self._checkpoint_and_commit(reason="revocation", in_callback=True)
                except (ProduceError, CheckpointError) as error:
                    # The partitions' next owner resumes from their last durable state; this
                    # worker's model learned past it, so it rolls back too, at its next step.
                    log.error("%s: no checkpoint at revocation", error)
                    self._rollback_needed = True
            for tp in partitions:
                self.offsets.pop(tp, None)
                self._unanchored.discard(tp)
                self.metrics.forget_partition(*tp)
            still_owned = {p for _, p in self.offsets}
            for partition in list(self.pipeline.joiners):
                if partition not in still_owned:
                    del self.pipeline.joiners[partition]
            if self.apply_log is not None and partitions:
                self.apply_log.write("revoke", partitions=[_partition_key(tp) for tp in partitions])
        except BaseException as error:
            self._fatal = error

    def _rollback(self) -> None:
        """Back to the last durable checkpoint: model, accumulators, joiners and positions."""
        assert self.io is not None
        self._rollback_needed = False
        self.io.discard_unacknowledged()
        state = self._checkpoint
        if state is None:
            raise StreamFMError("produce failed before any checkpoint existed")
        self.engine.load_state(state["engine"], strict=False)
        self.pipeline.evaluator = ProgressiveValidation.from_state(state["evaluator"])
        owned = {partition for _, partition in self.io.assignment()}
        # Only owned partitions: another worker may hold the rest by now.
        self.pipeline.joiners = {
            int(p): AttributionJoiner.from_state(joiner)
            for p, joiner in state["partitions"].items()
            if int(p) in owned
        }
        self.offsets = {}
        self.applied = dict(state.get("applied", state["offsets"]))
        for key, offset in state["offsets"].items():
            topic, _, partition = key.rpartition(":")
            tp = (topic, int(partition))
            if tp in self.io.assignment():
                self.io.seek(tp, int(offset))
                self.offsets[tp] = int(offset)
        self._dirty = False
        self._join_seen = self.pipeline.join_counters()
        if self.apply_log is not None:
            self.apply_log.write(
                "rollback",
                path=self._checkpoint_path.name if self._checkpoint_path else None,
                offsets={_partition_key(tp): offset for tp, offset in self.offsets.items()},
                applied=self.applied,
            )
        self._publish_gauges()

    # operations
    def health(self) -> tuple[bool, str]:
        limit_s = self.settings.poll_timeout_ms / 1000 + self.settings.produce_timeout_s + 5
        idle_s = time.monotonic() - self._last_loop_s
        if idle_s > limit_s:
            return False, f"the loop made no progress for {idle_s:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        if self.io is None or not self._restored:
            return False, "state not restored yet"
        if not self.offsets and not self.io.assignment():
            return False, "no partitions assigned"
        if not self.io.reachable():
            return False, "broker unreachable"
        if self._checkpoint_problem is not None:
            return False, f"checkpoints failing: {self._checkpoint_problem}"
        if self._output_problem is not None:
            return False, f"outputs rejected: {self._output_problem}"
        return True, "ok"

    def summary(self) -> str:
        evaluator = self.pipeline.evaluator
        t = self.totals
        return (
            f"stream-fm worker stopped after {time.monotonic() - self._started_s:.1f}s: "
            f"events={t['events']} invalid={t['invalid']} predictions={t['predictions']} learned={t['learned']} "
            f"model_version={self.engine.n_learned} logloss={evaluator.logloss:.5f} "
            f"ne={evaluator.normalized_entropy:.4f} pending={self.pipeline.pending_count} "
            f"late={t['late_clicks']} orphan={t['orphan_clicks']} evicted={t['evicted']} "
            f"checkpoints={t['checkpoints']} rollbacks={t['rollbacks']}"
        )


def pin_malloc_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation above ``threshold_bytes`` from its own mapping (glibc only).

    glibc raises its mmap threshold after freeing a large block, so the next blocks of that
    size (a checkpoint's 16 MiB copy of the linear weights, say) come from the heap, which
    fragments and never shrinks: resident memory then creeps up checkpoint after checkpoint.
    A fixed threshold keeps large temporaries in mappings that are returned when freed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def run_worker(settings: Settings) -> int:
    """The ``stream-fm run`` entry point: signals drain the loop, then exit 0."""
    pin_malloc_mmap_threshold()
    logging.getLogger().setLevel(settings.log_level)
    if settings.log_level == "DEBUG":
        logging.getLogger("kafka").setLevel(logging.DEBUG)
    worker = Worker(settings)

    def drain(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the batch, then checkpoint and exit", signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    return worker.run()
