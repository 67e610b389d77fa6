"""Recovery: what makes the worker's state exactly-once with respect to its input.

``Recovery`` owns the checkpoint store, the input offsets and the rollback target. It restores
the freshest checkpoint at start-up (or refuses to start cold over committed offsets), takes
each assigned partition's pending impressions and offset from the checkpoint that got
furthest with it, checkpoints on revocation, writes checkpoints durably and only then commits
their offsets, and rolls the pipeline back to the last durable state after a produce failure.
It never calls back into the loop: the loop asks it, and reads what it reports.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stream_fm.audit import ApplyLog
from stream_fm.checkpoint import CheckpointStore, host_part
from stream_fm.config import Settings
from stream_fm.errors import (
    BrokerError,
    CheckpointCorrupt,
    CheckpointError,
    MissingCheckpoint,
    ProduceError,
    StreamFMError,
)
from stream_fm.kafka import KafkaIO, Partition, Record
from stream_fm.metrics import WorkerMetrics
from stream_fm.pipeline import Pipeline
from stream_fm.sync import ModelSync
from stream_fm.worker.snapshot import OFFSETS_KEY, Snapshot, parse_key, partition_key
from stream_fm.worker.writer import CheckpointWriter

log = logging.getLogger("stream_fm.worker")


def writer_id() -> str:
    """This process's name in the shared checkpoint store: host, pid and a random suffix."""
    return f"{host_part()}_{os.getpid()}_{os.urandom(3).hex()}"


class Recovery:
    """Checkpoints, restore, assignment, revocation, rollback and commits of one worker."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        metrics: WorkerMetrics,
        sync: ModelSync | None = None,
    ) -> None:
        self.settings = settings
        # Model sync: checkpoints record where the model stands in the updates topic.
        self.sync = sync
        self.pipeline = pipeline
        self.metrics = metrics
        self.name = writer_id()  # in checkpoint names and on model updates
        self.store = CheckpointStore(
            Path(settings.checkpoint_dir),
            keep=settings.checkpoint_keep,
            writer=self.name,
            progress_key=OFFSETS_KEY,
        )
        self.apply_log = ApplyLog(settings.apply_log_path) if settings.apply_log_path else None
        self.io: KafkaIO | None = None
        self.offsets: dict[Partition, int] = {}  # next offset to process, per owned partition
        # How far this model has moved through each partition it ever owned (a snapshot carries
        # partitions that moved away since): the next offset, by learning or by taking the
        # partition over there. Audits match restores and rollbacks on it.
        self.applied: dict[str, int] = {}
        # The rollback target: the last durable state, plus partitions taken over since.
        self.target: Snapshot | None = None
        self.target_path: Path | None = None
        # The partitions' offsets in the file at target_path itself: a partition resumed from
        # elsewhere makes the state one no single file holds, until the next checkpoint.
        self._file_offsets: dict[str, int] = {}
        #: The last checkpoint failure (disk full, read-only); None once one succeeds again.
        self.problem: str | None = None
        #: An exception raised in a rebalance callback (the client swallows them): the loop raises it.
        self.fatal: BaseException | None = None
        self.restored = False
        self.rollback_needed = False  # no checkpoint could be written at a revocation
        # Model sync: partitions were assigned; the updates are read to their end before
        # any of their records is processed.
        self.sync_pending = False
        self.dirty = False
        self.checkpoints = 0
        self._committed: dict[str, int | None] = {}  # transactional mode: the group's offsets
        # Assigned partitions with no durable state yet: before any of their records is
        # processed, ``anchor`` writes a generation that starts them where they start.
        self._unanchored: set[Partition] = set()
        # Partitions resumed from a file whose offsets may never have been committed (a crash
        # between its rename and the commit): committed by the loop, outside the callback.
        self._resumed: dict[Partition, int] = {}
        self._events_since = 0
        self._last_checkpoint_s = time.monotonic()
        self._applied_since_snapshot = 0  # batches applied after the snapshot being written
        self.writer = CheckpointWriter(self.store)
        # A pipeline state no longer needed (the previous rollback target, or a snapshot whose
        # write failed): the next snapshot copies the model into its arrays.
        self._spare: dict[str, Any] | None = None
        self._spare_ready: dict[str, Any] | None = None  # the same, made beside the loop

    def _audit(self, event: str, **fields: Any) -> None:
        if self.apply_log is not None:
            self.apply_log.write(event, **fields)

    # start-up
    def start(self, io: KafkaIO) -> None:
        """Warm-start from the freshest checkpoint in the store (any worker's), or refuse to
        start cold over committed offsets."""
        self.io = io
        self._audit("start", writer=self.store.writer)
        self.store.fault("restoring")  # a crash here leaves a start with no restore
        loaded = self._load_latest()
        if loaded is None and any(o is not None for o in self._group_offsets().values()):
            # A peer starting at the same time commits only once its first checkpoint is
            # durable: that checkpoint is in the store now.
            loaded = self._load_latest()
        if loaded is None:
            self._refuse_cold_start()
            if self.sync is not None:
                self.sync.start(None)  # a new model: every peer update kept is news to it
                self.sync.catch_up_to_end(self.applied)
            return
        tree, path = loaded
        snapshot = Snapshot.from_tree(tree, str(path))
        # Step sizes may be retuned between runs; buckets, k and optimizer must match
        # (ModelStateMismatch names the difference and stops the start). Partitions are
        # taken from the store at assignment, not from this snapshot.
        self.pipeline.restore(snapshot.pipeline, partitions=())
        self.applied = dict(snapshot.applied)
        if self.sync is not None:
            self.sync.start(snapshot.updates)
            self.sync.catch_up_to_end(self.applied)
        self.target, self.target_path = snapshot.as_start(), path
        self._file_offsets = dict(snapshot.offsets)
        self._prepare_spare(snapshot.pipeline)
        self.metrics.mark_checkpoint(snapshot.saved_at_s)
        self._audit("restore", path=path.name, offsets=snapshot.offsets, applied=self.applied)
        log.info(
            "restored %s: model_version=%d, %d examples evaluated",
            path.name,
            self.pipeline.engine.n_learned,
            self.pipeline.evaluator.examples,
        )

    def _load_latest(self) -> tuple[Any, Path] | None:
        assert self.io is not None
        if self.io.transactional:
            self._committed = self._group_offsets()
            return self.store.load_latest(accept=self._transaction_committed)
        return self.store.load_latest()

    def _refuse_cold_start(self) -> None:
        assert self.io is not None
        committed = self._committed if self.io.transactional else self._group_offsets()
        found = {tp: offset for tp, offset in committed.items() if offset is not None}
        if found and not self.settings.cold_start:
            raise MissingCheckpoint(
                f"group {self.settings.group_id!r} has committed offsets ({len(found)} "
                f"partitions) but no checkpoint was found in {self.settings.checkpoint_dir!r}: "
                "starting would silently lose the learned model. Point checkpoint_dir at the "
                "checkpoints, or pass --cold-start to start a new model."
            )
        if found:
            log.warning("--cold-start: a new model over the group's committed offsets")

    def _group_offsets(self) -> dict[str, int | None]:
        """The group's committed offset of every input partition (blocking: not in callbacks)."""
        assert self.io is not None
        return {
            partition_key((topic, partition)): self.io.committed((topic, partition))
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

    # rebalances (called on the client's thread: errors are handed to the loop via ``fatal``)
    def on_assigned(self, partitions: list[Partition]) -> None:
        try:
            self._assign(partitions)
        except BaseException as error:
            self.fatal = error

    def on_revoked(self, partitions: list[Partition]) -> None:
        try:
            self._revoke(partitions)
        except BaseException as error:
            self.fatal = error

    def _partition_state(
        self, tp: Partition, loaded: dict[Path, Snapshot]
    ) -> tuple[int, dict[str, Any] | None, str] | None:
        """The most advanced durable state of one partition in the store, whichever worker
        wrote it: (next offset, joiner state, file name), or None if no checkpoint holds it."""
        assert self.io is not None
        key = partition_key(tp)
        for path in self.store.candidates(key):
            if self.io.transactional and not self._transaction_committed(path):
                continue
            snapshot = loaded.get(path)
            if snapshot is None:
                try:
                    snapshot = Snapshot.from_tree(self.store.load(path), str(path))
                except (CheckpointCorrupt, CheckpointError) as error:
                    log.warning("skipping %s for %s: %s", path.name, key, error)
                    continue
                loaded[path] = snapshot
            offset = snapshot.offsets.get(key)
            if offset is not None:
                return offset, snapshot.joiner(tp), path.name
        return None

    def _assign(self, partitions: list[Partition]) -> None:
        assert self.io is not None
        # Read from disk, not from memory: the rollback target in memory has partitions merged
        # into it that its file does not hold.
        loaded: dict[Path, Snapshot] = {}
        for tp in partitions:
            found = self._partition_state(tp, loaded)
            if found is None:
                # Never checkpointed: the group's committed offset (or the reset) applies.
                self._unanchored.add(tp)
                self._audit("assign", partition=partition_key(tp), offset=None, path=None)
                continue
            offset, joiner, source = found
            self.io.seek(tp, offset)
            self.offsets[tp] = offset
            self._resumed[tp] = offset
            if self._file_offsets.get(partition_key(tp)) != offset:
                # Assembled from several files: the next checkpoint writes it as one.
                self.dirty = True
            if joiner is not None:
                self.pipeline.restore_partition(tp[1], joiner)
            if self.target is not None:
                self.target.take_over(tp, offset, joiner)
            self._audit("assign", partition=partition_key(tp), offset=offset, path=source)
        self.restored = True
        if self.sync is not None and partitions:
            self.sync_pending = True  # the loop reads the updates to their end first
        log.info("assigned %s", ", ".join(partition_key(tp) for tp in partitions) or "nothing")
        if self.target is None and not self._unanchored:
            # A first generation at once, so a produce failure always has a state to roll back to.
            self.dirty = True
            self.try_checkpoint(reason="first assignment", in_callback=True)

    def release(self, partitions: list[Partition]) -> None:
        """Give ``partitions`` up as at a revocation, outside a callback (a consumer is being
        replaced): checkpoint, commit, drop their joiners."""
        self._revoke(partitions, in_callback=False)

    def _revoke(self, partitions: list[Partition], in_callback: bool = True) -> None:
        if partitions and self.dirty:
            try:
                self.checkpoint(reason="revocation", in_callback=in_callback)
            except (ProduceError, CheckpointError) as error:
                # The partitions' next owner resumes from their last durable state; this
                # worker's model learned past it, so it rolls back too, at its next step.
                log.error("%s: no checkpoint at revocation", error)
                self.rollback_needed = True
        for tp in partitions:
            self.offsets.pop(tp, None)
            self._resumed.pop(tp, None)
            self._unanchored.discard(tp)
            self.metrics.forget_partition(*tp)
        self.pipeline.drop_partitions(keep={p for _, p in self.offsets})
        if partitions:
            self._audit("revoke", partitions=[partition_key(tp) for tp in partitions])

    # the batches
    @property
    def unanchored(self) -> bool:
        return bool(self._unanchored)

    @property
    def resumed(self) -> bool:
        return bool(self._resumed)

    def commit_resumed(self) -> None:
        """Commit the offsets partitions were resumed at: their file is durable, and with no
        new record nothing else would ever commit them (the group's lag would stay wrong).
        Transactional mode needs nothing: a file counts only once its offsets committed."""
        assert self.io is not None
        resumed = {tp: o for tp, o in self._resumed.items() if self.offsets.get(tp) == o}
        self._resumed = {}
        if self.io.transactional or not resumed:
            return
        try:
            self.io.commit(resumed, wait=True)
        except BrokerError as error:
            log.warning("%s; offsets stay in the checkpoint", error)
            return
        if self.target_path is not None and not self._applied_since_snapshot and not self.dirty:
            # Nothing applied since the restore: the file covers all, and is now committed.
            self._audit(
                "checkpoint",
                path=self.target_path.name,
                offsets={partition_key(tp): offset for tp, offset in self.offsets.items()},
                applied=self.applied,
            )

    def anchor(self, records: Sequence[Record]) -> None:
        """Before a batch: partitions assigned with no durable state get their start offset
        (their first record here, else their position) and a generation that holds it, so
        every generation says where each partition stands for its model, even a fallback."""
        assert self.io is not None
        first: dict[Partition, int] = {}
        for record in records:
            first.setdefault((record.topic, record.partition), record.offset)
        anchored = 0
        for tp in sorted(self._unanchored):
            offset = first.get(tp)
            if offset is None:
                try:
                    offset = self.io.position(tp)
                except BrokerError as error:
                    log.warning("%s; %s is anchored at its first record", error, partition_key(tp))
                    continue
            self._unanchored.discard(tp)
            self.offsets[tp] = offset
            if self.target is not None:
                self.target.anchor(tp, offset)
            self._audit("anchor", partition=partition_key(tp), offset=offset)
            anchored += 1
        if anchored:
            self.dirty = True
            self.try_checkpoint(reason="new partitions")

    def applied_batch(self, records: Sequence[Record]) -> None:
        """A batch's outputs were handed to the producer: its records are applied."""
        for record in records:
            self.offsets[(record.topic, record.partition)] = record.offset + 1
        # Per batch, not per record: owned partitions' next offsets only grow.
        if self.sync is None:
            self.applied.update({partition_key(tp): o for tp, o in self.offsets.items()})
        else:  # records learned through updates are processed again below the frontier
            for tp, offset in self.offsets.items():
                key = partition_key(tp)
                self.applied[key] = max(self.applied.get(key, 0), offset)
        if self.apply_log is not None:  # the list costs a record's worth of work each
            self._audit("apply", records=[[r.topic, r.partition, r.offset] for r in records])
        self.dirty = True
        self._events_since += len(records)
        self._applied_since_snapshot += 1

    def checkpoint_due(self) -> bool:
        if self.writer.busy:
            return False  # one checkpoint at a time: the next waits for this one
        interval_passed = (
            time.monotonic() - self._last_checkpoint_s >= self.settings.checkpoint_interval_s
        )
        enough = self._events_since >= self.settings.checkpoint_every_events
        return self.dirty and (interval_passed or enough)

    # checkpoints
    def _snapshot(self) -> Snapshot:
        """Await every acknowledgement, then copy the state: the loop's only pause."""
        assert self.io is not None
        started = time.perf_counter()
        if self.sync is not None:  # a durable model holds no learning its peers cannot get
            self.sync.publish(self.io, flush=True)
        self.io.flush()
        spare = self._spare or self._spare_ready
        self._spare = self._spare_ready = None
        snapshot = Snapshot(
            group_id=self.settings.group_id,
            saved_at_s=time.time(),
            pipeline=self.pipeline.state(into=spare),
            offsets={partition_key(tp): offset for tp, offset in self.offsets.items()},
            applied=dict(self.applied),
            updates=self.sync.checkpoint_positions() if self.sync is not None else {},
        )
        self.metrics.checkpoint_pause_seconds.observe(time.perf_counter() - started)
        self._events_since = 0
        self._last_checkpoint_s = time.monotonic()
        self._applied_since_snapshot = 0
        return snapshot

    def begin_checkpoint(self, reason: str) -> None:
        """A periodic checkpoint: the state is copied now and written beside the loop; its
        offsets are committed when ``settle`` finds it durable. Transactional mode writes it
        at once (the transaction must not carry records past its offsets)."""
        if self.io is None or not self.restored:
            return
        if self.io.transactional:
            self.try_checkpoint(reason)
            return
        snapshot = self._snapshot()
        self.writer.start(snapshot.tree, (snapshot, reason))

    def settle(self, wait: bool = False, in_callback: bool = False) -> None:
        """Take the outcome of a checkpoint written beside the loop, if it finished (or once
        it finishes: ``wait``); ``in_callback``: inside a rebalance callback (no blocking)."""
        done = self.writer.take(wait)
        if done is None:
            return
        snapshot, reason = done.tag
        self.metrics.checkpoint_write_seconds.set(done.seconds)
        if done.error is not None:
            self.metrics.checkpoint_errors.inc()
            self._spare = snapshot.pipeline
            self._failed(done.error)
            return
        assert done.path is not None
        self._durable(snapshot, done.path, reason, in_callback)

    def checkpoint(self, reason: str, in_callback: bool = False) -> None:
        """A checkpoint written before returning (revocation, shutdown, transactions):
        acknowledgements awaited, the state written durably, then its offsets committed.

        Transactional mode: the file is written first and counts only once the transaction
        carrying its offsets commits (``start`` checks the group's offsets). Raises
        ProduceError (an output was rejected, or the transaction failed) or CheckpointError
        (the disk failed); either way nothing was committed.
        """
        if self.io is None or not self.restored:
            return
        self.settle(wait=True, in_callback=in_callback)
        snapshot = self._snapshot()
        started = time.perf_counter()
        try:
            path = self.store.save(snapshot.tree())
        except CheckpointError:
            self.metrics.checkpoint_errors.inc()
            self._spare = snapshot.pipeline
            raise
        finally:
            self.metrics.checkpoint_write_seconds.set(time.perf_counter() - started)
        self._durable(snapshot, path, reason, in_callback)

    def _durable(self, snapshot: Snapshot, path: Path, reason: str, in_callback: bool) -> None:
        """A checkpoint is on disk: commit its offsets, make it the rollback target."""
        self.store.fault("committing")
        offsets = {parse_key(key): offset for key, offset in snapshot.offsets.items()}
        self._commit(path, offsets, in_callback)
        self.store.fault("committed")
        if self.problem is not None:
            log.info("checkpoints are written again")
        self.problem = None
        old = self.target
        if old is not None:
            self._carry_over(old, snapshot)
            self._spare = old.pipeline
        else:
            self._prepare_spare(snapshot.pipeline)
        self.target, self.target_path = snapshot, path
        self._file_offsets = dict(snapshot.offsets)
        self.dirty = self._applied_since_snapshot > 0
        self.checkpoints += 1
        self.metrics.mark_checkpoint(snapshot.saved_at_s)
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_bytes.set(_size(path))
        self._audit(
            "checkpoint", path=path.name, offsets=snapshot.offsets, applied=snapshot.applied
        )
        log.debug("checkpoint %s (%s)", path.name, reason)

    def _prepare_spare(self, pipeline_state: dict[str, Any]) -> None:
        """Arrays for the next snapshot's model, their pages touched on a thread of their own
        (numpy copies without the GIL), when no earlier state will be free to reuse."""

        def make() -> None:
            engine = {
                name: np.array(value, copy=True) if isinstance(value, np.ndarray) else value
                for name, value in pipeline_state["engine"].items()
            }
            self._spare_ready = {"engine": engine}

        threading.Thread(target=make, name="stream-fm-spare", daemon=True).start()

    def _carry_over(self, old: Snapshot, new: Snapshot) -> None:
        """Partitions taken over (or anchored) while ``new`` was being written are in the old
        rollback target only: they move to the new one, so a rollback returns them there."""
        for key, offset in old.offsets.items():
            tp = parse_key(key)
            if key not in new.offsets and tp in self.offsets:
                new.take_over(tp, offset, old.joiner(tp))

    def _commit(self, path: Path, offsets: dict[Partition, int], in_callback: bool) -> None:
        assert self.io is not None
        if self.io.transactional:
            try:
                self.io.commit_transaction(offsets)
            except ProduceError:
                self.store.discard(path)  # its outputs were aborted: never restore it
                raise
            # Known without asking the broker (a blocking call is not allowed in a rebalance
            # callback): partitions taken over later are judged by these offsets.
            self._committed.update({partition_key(tp): offset for tp, offset in offsets.items()})
            return
        try:
            self.io.commit(offsets, wait=not in_callback)
        except BrokerError as error:
            # The checkpoint is the truth; a failed commit only delays lag reporting.
            log.warning("%s; offsets stay in the checkpoint", error)

    def _failed(self, error: CheckpointError) -> None:
        """A survivable checkpoint failure: reported not-ready, retried after the interval."""
        if self.problem is None:
            log.error("%s; retrying every %gs", error, self.settings.checkpoint_interval_s)
        self.problem = str(error)
        # Retry after the interval or the event count again, not at every batch.
        self._last_checkpoint_s = time.monotonic()
        self._events_since = 0

    def try_checkpoint(self, reason: str, in_callback: bool = False) -> bool:
        """A checkpoint whose disk failure is survivable: counted, reported not-ready, retried
        at the next interval. Offsets stay uncommitted meanwhile."""
        try:
            self.checkpoint(reason, in_callback=in_callback)
        except CheckpointError as error:
            self._failed(error)
            return False
        return True

    def final_checkpoint(self) -> None:
        """On the way out (SIGTERM): a checkpoint if anything changed since the last one."""
        if not self.dirty:  # the newest generation already holds this state
            return
        try:
            self.checkpoint(reason="shutdown")
        except (ProduceError, CheckpointError) as error:
            log.error("%s: stopped without a final checkpoint", error)
            raise

    # failures
    def rollback(self) -> None:
        """Back to the last durable checkpoint: model, accumulators, joiners and positions."""
        assert self.io is not None
        self.rollback_needed = False
        self.settle(wait=True)  # a checkpoint written meanwhile is a valid target if durable
        self.io.discard_unacknowledged()
        target = self.target
        if target is None:
            raise StreamFMError("produce failed before any checkpoint existed")
        assignment = set(self.io.assignment())
        # Only owned partitions: another worker may hold the rest by now.
        self.pipeline.restore(target.pipeline, partitions={p for _, p in assignment})
        self.offsets = {}
        self.applied = dict(target.applied)
        if self.sync is not None:  # what was published since comes back from the topic
            self.sync.rewind(target.updates)
            self.sync.catch_up_to_end(self.applied)
        for key, offset in target.offsets.items():
            tp = parse_key(key)
            if tp in assignment:
                self.io.seek(tp, offset)
                self.offsets[tp] = offset
        self.dirty = False
        self._audit(
            "rollback",
            path=self.target_path.name if self.target_path else None,
            offsets={partition_key(tp): offset for tp, offset in self.offsets.items()},
            applied=self.applied,
        )

    def close(self) -> None:
        self.writer.take(wait=True)  # never leave a save half-way; its offsets stay uncommitted
        if self.sync is not None:
            self.sync.close()
        if self.apply_log is not None:
            self.apply_log.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
