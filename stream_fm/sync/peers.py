"""``ModelSync``: a worker's side of the one model its group serves.

At every round boundary (``model_sync_interval_ms``, wall-clock aligned) the worker publishes
what it learned since it last did (its ``DeltaTracker``'s increments, the input ranges they
cover) to the model-updates topic, and adds every peer's updates to its model as they come,
weighted within their round (``model.rounds``): no barrier, a slow or dead peer never holds
anyone up. Kafka is the transport: the topic has one partition,
so every worker reads every update in one order, and where it stands in the topic goes into
each checkpoint: a restore (or a rollback) reads the peers' updates again from there.

Before a checkpoint copies the model, the worker publishes what it learned (``publish``), so a
durable model never holds learning its peers cannot get. With ``transactional_id`` the updates
go out in the worker's transaction and peers read them ``read_committed``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry

from stream_fm.config import Settings
from stream_fm.errors import BadModelUpdate, BrokerError
from stream_fm.kafka import KafkaIO, Record
from stream_fm.kafka.admin import Admin, ConsumedRecord, TopicFollower
from stream_fm.model import kernel
from stream_fm.model.base import SparseExample
from stream_fm.model.delta import DeltaTracker
from stream_fm.model.rounds import Hold, Rounds
from stream_fm.sync.metrics import SyncMetrics
from stream_fm.sync.wire import Shape, Update, decode, encode, rounded

log = logging.getLogger("stream_fm.sync")

#: Updates must outlive the checkpoints that point into the topic.
RETENTION_MS: Final = 7 * 24 * 3600 * 1000
#: Room left in a record for its key, headers and the client's framing.
RECORD_OVERHEAD_BYTES: Final = 1024
#: A worker with nothing to publish still sends an empty update this often (sync lag).
HEARTBEAT_S: Final = 10.0
#: Update records read per loop step at most (the rest at the next steps).
MAX_PER_STEP: Final = 64


def ensure_topic(settings: Settings) -> None:
    """Create the model-updates topic if it does not exist: one partition (one order for
    every reader), replicated like the cluster allows, kept for a week."""
    with Admin(settings.bootstrap_servers, settings) as admin:
        if admin.topic_exists(settings.model_updates_topic):  # no CREATE ACL needed then
            log.info("model updates go through the existing topic %s", settings.model_updates_topic)
            return
        log.info("creating the model-updates topic %s", settings.model_updates_topic)
        replication = max(1, min(3, admin.live_brokers()))
        admin.create_topics(
            [settings.model_updates_topic],
            partitions=1,
            replication=replication,
            configs={"retention.ms": str(RETENTION_MS), "cleanup.policy": "delete"},
        )


def shape_of(tracker: DeltaTracker) -> Shape:
    params = tracker.engine.params
    return Shape(
        params.n_buckets, params.k, params.optimizer, kernel.LIN_WIDTH[params.optimizer],
        tracker.has_acc, params.interactions == "all",
    )  # fmt: skip


def rounds_for(tracker: DeltaTracker, settings: Settings) -> Rounds:
    """The tracker's rounds as the settings send them: rounded to ``model_sync_precision``,
    small increments held back (``model_sync_hold_threshold``, ``model_sync_max_hold_ms``)."""
    hold = None
    if settings.model_sync_hold_threshold > 0:
        waits = settings.model_sync_max_hold_ms // settings.model_sync_interval_ms
        hold = Hold(settings.model_sync_hold_threshold, waits)
    rounder = partial(rounded, precision=settings.model_sync_precision)
    return Rounds(tracker, rounder=rounder, hold=hold)


class ModelSync:
    """Publishes this worker's learning and applies its peers' (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        tracker: DeltaTracker,
        registry: CollectorRegistry,
        writer: str,
    ) -> None:
        self.settings = settings
        self.topic = settings.model_updates_topic
        self.interval_s = settings.model_sync_interval_ms / 1000
        self.tracker = tracker
        self.precision = settings.model_sync_precision
        self.rounds = rounds_for(tracker, settings)
        self.writer = writer
        self._key = writer.encode()
        self.shape = shape_of(tracker)
        self.metrics = SyncMetrics(registry)
        self.follower: TopicFollower | None = None
        self.positions: dict[int, int] = {}  # topic partition -> next update to apply
        self._covered: dict[str, tuple[int, int]] = {}  # input ranges learned since publish
        self._seq = 0
        self._round_published = self.round_now()
        self._sent_at = -HEARTBEAT_S
        #: Set on the way out (SIGTERM): the next update is this worker's last.
        self.leaving = False
        self._said_goodbye = False
        self._refused: set[str] = set()  # peers whose model shape differs (logged once)
        rng = np.random.default_rng(20)
        probe = np.unique(rng.integers(0, self.shape.n_buckets, 16)).astype(np.int32)
        self._probe = SparseExample(probe, np.ones(len(probe)))

    # where the model stands in the topic
    def start(self, positions: Mapping[str, int] | None) -> None:
        """Read peers' updates from ``positions`` (the restored checkpoint's), or from the
        oldest kept (no checkpoint: the model has none of them)."""
        if self.follower is None:
            self.follower = TopicFollower(
                self.settings, self.topic, read_committed=bool(self.settings.transactional_id)
            )
        self.rounds.forget()
        self._covered = {}  # what was learned since the last publish went with the rollback
        wanted = {_partition(key): offset for key, offset in (positions or {}).items()}
        self.positions = self.follower.start(wanted)
        log.info("model updates from %s at %s", self.topic, self.positions)

    def rewind(self, positions: Mapping[str, int]) -> None:
        """The model went back to a checkpoint: its peers' updates are read again from there."""
        self.start(positions)

    def checkpoint_positions(self) -> dict[str, int]:
        return {f"{self.topic}:{p}": offset for p, offset in self.positions.items()}

    # this worker's learning
    def noted(self, records: Sequence[Record]) -> None:
        """A batch was learned from: the next update covers its records."""
        for record in records:
            key = f"{record.topic}:{record.partition}"
            first, _ = self._covered.get(key, (record.offset, 0))
            self._covered[key] = (first, record.offset + 1)

    def publish(self, io: KafkaIO, flush: bool = False) -> int:
        """Send what was learned since the last publish (an empty update now and then, so
        peers can tell a quiet worker from a lagging one); returns the records sent. With
        ``flush`` (a checkpoint) or on the way out, the increments that wait go too."""
        leaving = self.leaving
        round_id = self._round_published = self.round_now()
        delta, bases = self.rounds.publish(round_id, flush=flush or leaving)
        self.metrics.waiting.set(self.rounds.waiting)
        empty = not len(delta) and not delta.learned and not np.any(delta.bias != 0)
        if empty and not leaving and time.monotonic() - self._sent_at < HEARTBEAT_S:
            self._covered = {}
            return 0
        self._sent_at = time.monotonic()
        update = Update(
            self.writer, self._seq, self.shape, delta, bases, round_id, dict(self._covered),
            leaving=leaving,
        )  # fmt: skip
        self._covered = {}
        self._seq += 1
        self._said_goodbye = leaving
        limit = io.record_limit_bytes(self.topic) - RECORD_OVERHEAD_BYTES - len(self._key)
        parts = encode(update, limit, self.precision)
        for part in parts:
            io.send(self.topic, self._key, part)
            self.metrics.update_bytes.labels(direction="published").inc(len(part))
        self.metrics.published.inc(len(parts))
        return len(parts)

    def say_goodbye(self, io: KafkaIO) -> None:
        """On the way out: peers stop reporting this worker's lag. Already said if the final
        checkpoint published; otherwise an empty update, outside any transaction's reach
        (with ``transactional_id`` the peers forget this worker after a silence instead)."""
        if self._said_goodbye or io.transactional:
            return
        self.publish(io)
        io.flush()

    def round_now(self) -> int:
        """Rounds are wall-clock aligned: every worker's round r is the same interval."""
        return int(time.time() // self.interval_s)

    # the loop's share
    def step(self, io: KafkaIO, applied: dict[str, int]) -> None:
        """Publish when a round ended; apply the peers' updates that arrived."""
        if self.round_now() != self._round_published:
            self.publish(io)
            self.metrics.refresh_lag()
            self.metrics.probe.set(self.tracker.predict_proba_one(self._probe))
        self.catch_up(applied)

    def split(
        self, records: Sequence[Record], applied: Mapping[str, int]
    ) -> tuple[list[Record], list[Record]]:
        """(learned already, to learn): a record below its partition's applied frontier was
        learned by the model through an update (a previous owner's, or this worker's before a
        crash or a rollback): it is processed again without learning."""
        done: list[Record] = []
        new: list[Record] = []
        for record in records:
            frontier = applied.get(f"{record.topic}:{record.partition}", -1)
            (done if record.offset < frontier else new).append(record)
        return done, new

    def catch_up(
        self, applied: dict[str, int], timeout_ms: int = 0, max_records: int = MAX_PER_STEP
    ) -> int:
        """Apply the updates that arrived; returns how many records were applied."""
        if self.follower is None:
            return 0
        try:
            records = self.follower.fetch(timeout_ms, max_records)
        except BrokerError as error:
            log.warning("%s; model updates are read again at the next step", error)
            return 0
        applied_now = 0
        for record in records:
            applied_now += self._apply(record, applied)
            self.positions[record.partition] = record.offset + 1
        if len(records) < max_records:  # all read: past markers and aborted records too
            try:
                for partition, at in self.follower.positions().items():
                    self.positions[partition] = max(self.positions.get(partition, 0), at)
            except BrokerError as error:
                log.warning("%s; model updates are read again at the next step", error)
        return applied_now

    def catch_up_to_end(self, applied: dict[str, int], timeout_s: float = 60.0) -> int:
        """Apply every update published so far: before partitions are processed after a
        restore, an assignment or a rollback, so what the topic says the group learned of
        them is never learned again."""
        assert self.follower is not None
        deadline = time.monotonic() + timeout_s
        ends = self.follower.end_offsets()
        done = 0
        while any(self.positions.get(p, 0) < end for p, end in ends.items()):
            if time.monotonic() > deadline:
                log.warning("model updates not read to their end in %gs: %s of %s",
                            timeout_s, self.positions, ends)  # fmt: skip
                break
            done += self.catch_up(applied, timeout_ms=200, max_records=1000)
        return done

    def _apply(self, record: ConsumedRecord, applied: dict[str, int]) -> int:
        value = record.value or b""
        try:
            update = decode(value)
            if update.shape != self.shape:
                raise BadModelUpdate("other_model", f"{update.shape} is not {self.shape}")
        except BadModelUpdate as error:
            self.metrics.rejected.labels(reason=error.reason).inc()
            self._refuse(record, str(error))
            return 0
        if update.leaving:
            self.metrics.forget(update.writer)  # gone on purpose: no lag to report
        elif record.key != self._key:
            self.metrics.peer_update(update.writer, record.timestamp / 1000)
        if _contained(update.covered, applied) or (not update.covered and record.key == self._key):
            return 0  # in the model already: this worker's own, or learned before a restore
        self.rounds.absorb(update.delta, update.bases, update.round)
        if update.part == update.parts - 1:  # the input it covers is learned, everywhere
            for key, (_, after) in update.covered.items():
                applied[key] = max(applied.get(key, 0), after)
        self.metrics.applied.inc()
        self.metrics.update_bytes.labels(direction="applied").inc(len(value))
        return 1

    def _refuse(self, record: ConsumedRecord, why: str) -> None:
        peer = (record.key or b"?").decode(errors="replace")
        if peer not in self._refused:  # once per writer: a peer of another model keeps coming
            self._refused.add(peer)
            log.error("skipping model updates of %s at offset %d: %s", peer, record.offset, why)

    def close(self) -> None:
        if self.follower is not None:
            self.follower.close()
            self.follower = None


def _contained(covered: Mapping[str, tuple[int, int]], applied: Mapping[str, int]) -> bool:
    """Every input range the update covers is below the model's applied frontier."""
    return bool(covered) and all(applied.get(k, -1) >= after for k, (_, after) in covered.items())


def _partition(key: str) -> int:
    return int(key.rpartition(":")[2])
