"""The worker loop: poll -> pipeline -> publish -> record -> observe -> checkpoint.

A produce failure rolls the state back to the last checkpoint and waits before redoing
anything (``Retry``); ``Recovery`` owns checkpoints, offsets and rebalances; a consumer that
stops fetching while behind the log end is replaced (``Watchdog``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence

from prometheus_client import CollectorRegistry

from stream_fm import __version__
from stream_fm.config import Settings, describe, read_secret_files
from stream_fm.errors import (
    BrokerError,
    CheckpointError,
    ClusterRefused,
    ConfigError,
    InvalidEvent,
    ProduceError,
)
from stream_fm.events import REASONS
from stream_fm.kafka import KafkaIO, Partition, Record, UnreadableRecord, connect
from stream_fm.kafka.refusal import NOTICED, classify, diagnose, sniff_kafka_python
from stream_fm.metrics import MetricsServer, WorkerMetrics
from stream_fm.model.base import Engine
from stream_fm.model.delta import DeltaTracker
from stream_fm.model.fast import FastFM
from stream_fm.pipeline import Pipeline
from stream_fm.sync import ModelSync, ensure_topic
from stream_fm.warmup import warm_up
from stream_fm.webconfig import load_web_config
from stream_fm.worker.health import Health
from stream_fm.worker.observe import Observer
from stream_fm.worker.publish import publish
from stream_fm.worker.recovery import Recovery
from stream_fm.worker.refusals import EXIT_CODE as REFUSAL_EXIT_CODE
from stream_fm.worker.refusals import RefusalWatch
from stream_fm.worker.retry import Retry
from stream_fm.worker.watchdog import Behind, Watchdog

log = logging.getLogger("stream_fm.worker")
BROKER_RETRY_S = 1.0


class Worker:
    """One consumer-group member. ``run()`` blocks until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = WorkerMetrics(self.registry, invalid_reasons=REASONS, version=__version__)
        tracker = DeltaTracker(FastFM(settings.model)) if settings.model_updates_topic else None
        self.pipeline = Pipeline.from_settings(settings, engine=tracker)
        self.recovery = Recovery(settings, self.pipeline, self.metrics)
        self.sync: ModelSync | None = None
        if tracker is not None:  # one model per group: checkpoints record the updates read
            self.sync = ModelSync(settings, tracker, self.registry, self.recovery.name)
            self.recovery.sync = self.sync
        self.retry = Retry()
        self.watchdog = Watchdog(settings.consumer_stall_timeout_s)
        self._consumer_lost = False  # a replacement consumer could not be made yet
        self.observer = Observer(self.metrics, self.pipeline)
        self.health = Health(settings, self.recovery, self.retry)
        self.metrics.pending_impressions_limit.set(settings.max_pending_impressions)
        self.metrics.watch_readiness(self.health.ready)
        self.io: KafkaIO | None = None
        self.server: MetricsServer | None = None  # /metrics, /healthz, /readyz while running
        self._stopping = threading.Event()
        self._polled_at: float | None = None  # when the last poll returned
        self.refusals = RefusalWatch(settings.auth_failure_exit_s)
        self.health.refusal = self.refusals.problem
        self._reconnect_pending = False  # new secrets: the clients are made again
        self._checkpoints_seen = 0
        self._longest_pause_s = 0.0

    @property
    def engine(self) -> Engine:
        return self.pipeline.engine

    @property
    def totals(self) -> Counter[str]:
        return self.observer.totals

    def ready(self) -> tuple[bool, str]:
        """What /readyz answers."""
        return self.health.ready()

    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint, commit and return."""
        self._stopping.set()

    def run(self) -> int:
        settings = self.settings
        log.info("starting with %s", describe(settings))
        sniff_kafka_python()  # the admin calls use kafka-python whatever the client
        self.server = server = MetricsServer(
            self.registry,
            settings.metrics_host,
            settings.metrics_port,
            health_check=self.health.alive,
            ready_check=self.health.ready,
            web=load_web_config(settings.metrics_web_config)
            if settings.metrics_web_config
            else None,
        ).start()
        log.info("metrics, /healthz and /readyz on %s", server.url)
        code = 0
        try:
            if self._compile() and self._start():
                while not self._stopping.is_set():
                    self.step()
                code = self._finish()
        except _Stopped:
            pass  # SIGTERM while reconnecting: the last durable checkpoint stands
        except ClusterRefused as refusal:
            # Nothing to save: the state is the last checkpoint's, which the offsets match.
            print(f"stream-fm worker giving up: {refusal}", flush=True)
            code = REFUSAL_EXIT_CODE
        finally:
            if self.io is not None:
                self.io.close()
            self.recovery.close()
            server.stop()
        summary = self.observer.summary(self.recovery.checkpoints)
        log.info(summary)
        print(summary, flush=True)
        return code

    def _compile(self) -> bool:
        """Compile (or load) the kernels before connecting, so the first batch does not pay
        for it; /healthz stays alive meanwhile, /readyz says why it is not ready. False:
        stopped first."""
        outcome: list[float | BaseException] = []
        done = threading.Event()

        def work() -> None:
            try:
                outcome.append(warm_up(self.settings))
            except BaseException as error:  # re-raised in the loop's thread
                outcome.append(error)
            finally:
                done.set()

        threading.Thread(target=work, name="stream-fm-compile", daemon=True).start()
        while not done.wait(0.5):
            self.health.beat()
            if self._stopping.is_set():
                return False
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        log.info("kernels ready in %.1f s", outcome[0])
        self.health.compiled = True
        return True

    def _start(self) -> bool:
        """Connect, restore and subscribe; a refusal by the cluster is waited out (or ends
        the worker). False: stopped before it could start."""
        while not self._stopping.is_set():
            tried_at = time.monotonic()
            NOTICED.clear()  # what the clients report from here on is about this attempt
            try:
                self._connect()
                return True
            except BrokerError as error:
                refusal = self._refusal_of(error) or diagnose(self.settings)
                if refusal is None:
                    raise
                if self.io is not None:
                    self.io.close()
                    self.io = self.health.io = None
                self._wait_refused(refusal, since=tried_at)
        return False

    def _connect(self) -> None:
        settings = self.settings
        outputs = settings.output_topics
        if self.sync is not None:
            ensure_topic(settings)
            outputs = [*outputs, settings.model_updates_topic]
        self.io = self.health.io = connect(settings, outputs)
        missing = self.io.wait_for_topics(settings.input_topics, timeout_s=30)
        if missing:
            log.warning("input topic(s) %s not found yet; waiting", ", ".join(missing))
        self.recovery.start(self.io)
        self.observer.gauges()
        self.io.subscribe(
            settings.input_topics, self.recovery.on_assigned, self.recovery.on_revoked
        )

    def _finish(self) -> int:
        """The last checkpoint and commit after SIGTERM: 0, or 1 if it could not be made."""
        assert self.io is not None
        try:
            if self.sync is not None:
                self.sync.leaving = True  # the last update tells peers this one stops
            self.recovery.final_checkpoint()
            if self.sync is not None:
                self.sync.say_goodbye(self.io)
        except (ProduceError, CheckpointError) as error:
            # Nothing is lost: the next start resumes from the last durable checkpoint.
            if isinstance(error, ProduceError):
                self.metrics.produce_errors.labels(kind=_kind(error)).inc()
            return 1
        return 0

    def _refusal_of(self, error: BaseException) -> ClusterRefused | None:
        """The cluster's refusal behind ``error``: in its text, or in what the client logged."""
        if isinstance(error, ClusterRefused):
            return error
        return classify(str(error), self.settings) or NOTICED.recent(self.settings)

    def _wait_refused(self, refusal: ClusterRefused, since: float | None = None) -> None:
        """Back off (SIGTERM still ends the wait); a refused login re-reads the secret files."""
        wait_s = self.refusals.refused(refusal, since=since)
        final = self.refusals.give_up()
        if final is not None:
            raise final
        if refusal.cause == "authentication":
            self._reread_secrets()
        self._stopping.wait(wait_s)
        self.health.beat()
        self._polled_at = None  # a deliberate wait, not a pause of the loop

    def _reread_secrets(self) -> None:
        """A rotated Secret is mounted in place: take its new content for the next login."""
        try:
            fresh = read_secret_files(self.settings)
        except ConfigError as error:
            log.error("%s", error)
            return
        if fresh == self.settings:
            return
        log.info("the secret files changed: logging in with their new content")
        self.settings = self.recovery.settings = self.health.settings = fresh
        if self.sync is not None:
            self.sync.settings = fresh
        self._reconnect_pending = self.io is not None  # running: a new client, at the step

    def _reconnect(self) -> None:
        """Release the partitions (a checkpoint where it can be made; else the last durable
        one stands), then connect again from the checkpoint store like a start."""
        assert self.io is not None
        self._reconnect_pending = False
        with contextlib.suppress(BrokerError, CheckpointError):
            self.recovery.release(self.io.assignment())
        self.io.close()
        self.io = self.health.io = None
        if not self._start():
            raise _Stopped

    def step(self) -> None:
        """One poll and, if records came, one batch. Safe to call repeatedly."""
        assert self.io is not None
        self._raise_fatal()
        wait_s = self.retry.waiting(self.io.reachable)
        if wait_s > 0:  # backing off after a produce failure: nothing is redone yet
            time.sleep(min(wait_s, 0.2))
            self.health.beat()
            self._polled_at = None  # a deliberate wait, not a pause of the loop
            self.watchdog.rest()
            return
        self._pause_ended()
        if self._reconnect_pending:
            self._reconnect()
            return
        try:
            if self._consumer_lost:
                self._new_consumer()
            records = self.io.poll(self.settings.poll_timeout_ms, self.settings.max_poll_records)
            self._polled_at = time.perf_counter()
        except BrokerError as error:
            records = []
            refusal = self._refusal_of(error)
            if refusal is not None:
                self._wait_refused(refusal)
                return
            log.warning("%s; retrying", error)
            time.sleep(BROKER_RETRY_S)
            self._polled_at = None
        if records:
            self.refusals.progressed("consume")
            NOTICED.clear()
        elif not self.io.assignment():  # nothing flows: a refusal the client only reported?
            refusal = NOTICED.recent(self.settings)
            if refusal is not None:
                self._wait_refused(refusal)
                return
        self.watchdog.polled(len(records))
        self._raise_fatal()
        try:
            if self.recovery.rollback_needed:
                raise ProduceError("no checkpoint could be written at a rebalance")
            if self.recovery.unanchored:  # partitions new to every checkpoint: start them
                self.recovery.anchor(records)
            if self.recovery.resumed:
                self.recovery.commit_resumed()
            if records:
                self._process(records)
            if self.sync is not None:
                self.sync.step(self.io, self.recovery.applied)
            self.recovery.settle()
            if self.recovery.checkpoint_due():
                self.recovery.begin_checkpoint(reason="periodic")
            if self.recovery.checkpoints != self._checkpoints_seen:
                self._checkpoints_seen = self.recovery.checkpoints
                self.refusals.progressed("produce")  # outputs and offsets went through
        except ProduceError as error:
            self._produce_failed(error)
        if self.watchdog.due():
            self._check_stall()
        self.health.beat()
        self.observer.lag(self.io)

    def _check_stall(self) -> None:
        """Nothing fetched for the watchdog's timeout: replace the consumer if the log goes
        further than the worker (read on a connection of its own), else it is only quiet."""
        assert self.io is not None
        owned = self.io.assignment()
        if not owned or not self.io.reachable():  # a broker away is no stall of the consumer
            self.watchdog.rest()
            return
        try:
            behind = self.watchdog.behind(self.io.end_offsets(owned), self._positions(owned))
        except BrokerError as error:
            log.warning("%s; the consumer watchdog looks again later", error)
            self.watchdog.rest()
            return
        if behind:
            self._replace_consumer(behind)

    def _positions(self, owned: list[Partition]) -> dict[Partition, int]:
        """Where the worker stands in each owned partition: the next offset it would process,
        or the consumer's position when that is further (transaction markers are skipped)."""
        assert self.io is not None
        positions = {}
        for tp in owned:
            known = self.recovery.offsets.get(tp)
            with contextlib.suppress(BrokerError):  # a position not known: ours stands
                known = max(known or 0, self.io.position(tp))
            if known is not None:
                positions[tp] = known
        return positions

    def _replace_consumer(self, behind: Behind) -> None:
        """Release the partitions (a checkpoint, as at a revocation: nothing is lost), then a
        new consumer joins; the partitions come back from that checkpoint."""
        assert self.io is not None
        log.warning(
            "the consumer fetched nothing for %gs while behind the log end (%s); replacing it",
            self.watchdog.timeout_s,
            ", ".join(f"{t}:{p} at {at} of {end}" for (t, p), (at, end) in behind.items()),
        )
        self.recovery.release(self.io.assignment())
        self.metrics.consumer_rebuilds.inc()
        self.observer.totals["consumer_rebuilds"] += 1
        self._consumer_lost = True
        self._new_consumer()

    def _new_consumer(self) -> None:
        assert self.io is not None
        self.io.rebuild_consumer()  # BrokerError: tried again at the next step
        self._consumer_lost = False
        self.watchdog.rest()

    def _pause_ended(self) -> None:
        """The loop is back at its poll: the time since the last one returned was a pause."""
        if self._polled_at is None:
            return
        pause_s = time.perf_counter() - self._polled_at
        if pause_s > self._longest_pause_s:
            self._longest_pause_s = pause_s
            self.metrics.loop_longest_pause_seconds.set(pause_s)

    def _process(self, records: Sequence[Record]) -> None:
        sync = self.sync
        if sync is None:
            self._process_part(records)
            return
        if self.recovery.sync_pending:  # partitions came: what the group learned of them first
            sync.catch_up_to_end(self.recovery.applied)
            self.recovery.sync_pending = False
        learned, new = sync.split(records, self.recovery.applied)
        if learned:
            sync.tracker.learning = False
            try:
                self._process_part(learned)
            finally:
                sync.tracker.learning = True
        if new:
            self._process_part(new)
            sync.noted(new)

    def _process_part(self, records: Sequence[Record]) -> None:
        assert self.io is not None
        started = time.perf_counter()
        result = self.pipeline.process_columns(
            [(r.value or b"") if type(r) is not UnreadableRecord else _input(r) for r in records],
            [r.partition for r in records],
            now_ms=int(time.time() * 1000),
        )
        # The state moved: recorded before its outputs leave, so an output never exists for a
        # batch the apply log does not know (a kill in between would make it an unseen
        # duplicate); a produce failure rolls the batch back.
        self.recovery.applied_batch(records)
        careful = self.retry.careful(self.recovery.checkpoints)
        publish(self.io, self.settings, result, records, wait=careful)
        self.observer.batch(result, records, time.perf_counter() - started)

    def _produce_failed(self, error: ProduceError) -> None:
        """Roll back to the last checkpoint; wait (doubling) before redoing anything."""
        assert self.io is not None
        if error.permanent and error.topic is not None and error.nbytes is not None:
            self.io.record_rejected(error.topic, error.nbytes)  # the next copy is cut to fit
        wait_s = self.retry.failed(error, self.recovery.checkpoints)
        log.error("%s: rolling back to the last checkpoint, retrying in %gs", error, wait_s)
        self.metrics.produce_errors.labels(kind=_kind(error)).inc()
        self.metrics.rollbacks.inc()
        self.observer.totals["rollbacks"] += 1
        self.recovery.rollback()
        self.observer.gauges()
        refusal = self._refusal_of(error)
        if refusal is not None:  # the Retry's waits apply; the refusal's clock runs
            self.refusals.refused(refusal, side="produce")
            final = self.refusals.give_up()
            if final is not None:  # rolled back first: the state is the checkpoint's again
                raise final

    def _raise_fatal(self) -> None:
        if self.recovery.fatal is not None:
            raise self.recovery.fatal


class _Stopped(Exception):
    """SIGTERM came while the worker was reconnecting: leave the loop without a checkpoint."""


def _kind(error: ProduceError) -> str:
    return "permanent" if error.permanent else "transient"


def _input(record: Record) -> bytes | InvalidEvent:
    """The record's value for the pipeline; a record the client could not read is rejected."""
    if type(record) is UnreadableRecord:
        return InvalidEvent("unreadable_record", record.error)
    return record.value or b""
