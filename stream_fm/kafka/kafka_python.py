"""``KafkaIO`` on kafka-python: the worker's consumer and producer, their errors turned into ours.

The consumer hands out raw bytes and never auto-commits: offsets are committed only after the
checkpoint that covers them is durable. Produce failures are classified: a record the broker
refuses as such (too large, invalid, not authorized) is ``permanent``; the rest may pass.
Every record going out is measured against its topic's ``max.message.bytes`` (read at start-up)
and the producer's request bound, so the worker can make dead letters fit before sending.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata

from stream_fm.config import Settings
from stream_fm.errors import BrokerError, ProduceError
from stream_fm.kafka import last_words, lenient  # noqa: F401 - kafka-python fixes, see there
from stream_fm.kafka.base import Headers, Partition, Rebalance, Record, UnreadableRecord
from stream_fm.kafka.common import ClientCommon
from stream_fm.kafka.partitioner import key_partitions
from stream_fm.kafka.refusal import sniff_kafka_python
from stream_fm.kafka.settings import consumer_config, producer_config
from stream_fm.outputs import record_size_bytes

log = logging.getLogger("stream_fm.kafka")

#: Refused records that no retry can change: send them again as they are and they fail again.
PERMANENT_ERRORS: Final = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidRecordError,
    kafka_errors.InvalidTopicError,
    kafka_errors.AuthorizationError,
)
SIZE_ERRORS: Final = (kafka_errors.MessageSizeTooLargeError, kafka_errors.RecordListTooLargeError)


def produce_error(
    what: str, topic: str | None, error: BaseException, nbytes: int | None
) -> ProduceError:
    """Our error for a client's produce failure, classified."""
    permanent = isinstance(error, PERMANENT_ERRORS)
    too_large = isinstance(error, SIZE_ERRORS)
    return ProduceError(
        f"{what}: {error!r}" + (" (refused permanently)" if permanent else ""),
        permanent=permanent,
        topic=topic,
        nbytes=nbytes if too_large else None,
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_assigned: Rebalance, on_revoked: Rebalance) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked
        self.muted = False  # a consumer being replaced: the worker released its partitions

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        if not self.muted:
            self._on_revoked(sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        if not self.muted:
            self._on_assigned(sorted((tp.topic, tp.partition) for tp in assigned))


class KafkaPythonIO(ClientCommon):
    """A consumer of the input topics and a producer of the output topics (``KafkaIO``)."""

    def __init__(self, settings: Settings, output_topics: Sequence[str] = ()) -> None:
        sniff_kafka_python()  # a refused login is only logged: keep it for the worker
        super().__init__(settings, output_topics)
        try:
            self._consumer = KafkaConsumer(**consumer_config(settings))
            self._producer = self._new_producer()
        except kafka_errors.KafkaError as error:
            raise BrokerError(
                f"cannot connect to Kafka at {settings.bootstrap_servers}: {error}"
            ) from error
        self._unflushed = 0
        self._send_failure: ProduceError | None = None
        self._topics: list[str] = []
        self._listener: _Listener | None = None

    def _new_producer(self) -> KafkaProducer:
        """A producer; in transactional mode with its transaction begun. Starting one fences
        any earlier producer of the same transactional id and aborts its open transaction."""
        batch = self.batch_size_bytes()
        producer = KafkaProducer(**producer_config(self.settings, batch_size_bytes=batch))
        if self.settings.transactional_id:
            producer.init_transactions()
            producer.begin_transaction()
        return producer

    # consumer
    def subscribe(
        self, topics: Sequence[str], on_assigned: Rebalance, on_revoked: Rebalance
    ) -> None:
        self._topics, self._listener = list(topics), _Listener(on_assigned, on_revoked)
        self._consumer.subscribe(topics=self._topics, listener=self._listener)

    def rebuild_consumer(self) -> None:
        old, listener = self._consumer, self._listener
        if listener is not None:
            listener.muted = True
        try:
            old.close(autocommit=False, timeout_ms=5_000)
        except Exception as error:  # a stuck consumer may fail to leave: its session expires
            log.warning("closing the stalled consumer failed: %s", error)
        try:
            self._consumer = KafkaConsumer(**consumer_config(self.settings))
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot create a new consumer: {error}") from error
        if listener is not None:
            fresh = _Listener(listener._on_assigned, listener._on_revoked)
            self._listener = fresh
            self._consumer.subscribe(topics=self._topics, listener=fresh)

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Records of all assigned partitions, each partition's in offset order."""
        started = time.monotonic()
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kafka_errors.CorruptRecordError as error:
            return [self._skip_unreadable(error)]
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"poll failed: {error}") from error
        if not batches:
            # With the broker down kafka-python returns at once; don't spin a core meanwhile.
            idle_s = timeout_ms / 1000 - (time.monotonic() - started)
            if idle_s > 0:
                time.sleep(idle_s)
            return []
        out: list[Record] = []
        for records in batches.values():
            out += records
        return out

    def _skip_unreadable(self, error: Exception) -> Record:
        """Find the partition whose next record cannot be parsed, step over that record and
        hand it on as an ``UnreadableRecord``. Each partition is polled alone for one record
        (and put back where it was) until the one that fails is found."""
        consumer = self._consumer
        assigned = sorted(consumer.assignment(), key=lambda tp: (tp.topic, tp.partition))
        try:
            for tp in assigned:
                position = consumer.position(tp)
                consumer.pause(*[other for other in assigned if other != tp])
                consumer.resume(tp)
                try:
                    consumer.poll(timeout_ms=2000, max_records=1)
                except kafka_errors.CorruptRecordError:
                    consumer.seek(tp, position + 1)
                    log.error(
                        "%s:%d offset %d cannot be read (%s): skipped",
                        tp.topic,
                        tp.partition,
                        position,
                        error,
                    )
                    return UnreadableRecord(tp.topic, tp.partition, position, str(error))
                consumer.seek(tp, position)
        finally:
            consumer.resume(*assigned)
        raise BrokerError(f"poll failed and no partition owns the unreadable record: {error}")

    def seek(self, partition: Partition, offset: int) -> None:
        self._consumer.seek(TopicPartition(*partition), offset)

    def committed(self, partition: Partition) -> int | None:
        try:
            offset = self._consumer.committed(TopicPartition(*partition))
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read committed offsets: {error}") from error
        return None if offset is None else int(offset)

    def position(self, partition: Partition) -> int:
        try:
            offset = self._consumer.position(
                TopicPartition(*partition), timeout_ms=int(self.settings.produce_timeout_s * 1000)
            )
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read the position of {partition}: {error}") from error
        if offset is None:
            raise BrokerError(f"the position of {partition} is not known yet")
        return int(offset)

    def commit(self, offsets: Mapping[Partition, int], wait: bool = True) -> None:
        """Commit next-offsets to the group (for lag monitoring; the checkpoint is the truth).

        ``wait=False`` from a rebalance callback: kafka-python runs those on its IO thread,
        where a blocking commit would deadlock.
        """
        if not offsets:
            return
        request = _offsets(offsets)
        try:
            if wait:
                self._consumer.commit(request)
            else:
                self._consumer.commit_async(request)
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"offset commit failed: {error}") from error

    def commit_transaction(self, offsets: Mapping[Partition, int]) -> None:
        """Transactional mode: commit the open transaction with the input offsets, begin the
        next. Raises ProduceError if it did not commit (its outputs are then aborted)."""
        request = _offsets(offsets)
        try:
            if request:
                self._producer.send_offsets_to_transaction(request, self._consumer.group_metadata())
            self._producer.commit_transaction()
            self._producer.begin_transaction()
        except kafka_errors.KafkaError as error:
            raise produce_error("transaction not committed", None, error, None) from error

    def assignment(self) -> list[Partition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def lag(self) -> dict[Partition, int]:
        """High watermark minus position, from fetch metadata (no extra round trip)."""
        out: dict[Partition, int] = {}
        for tp in self._consumer.assignment():
            high = self._consumer.highwater(tp)
            if high is None:
                continue
            try:
                position = self._consumer.position(tp, timeout_ms=100)
            except kafka_errors.KafkaError:
                continue
            if position is not None:
                out[(tp.topic, tp.partition)] = max(0, int(high) - int(position))
        return out

    def partitions_for(self, topic: str) -> set[int]:
        try:
            return set(self._consumer.partitions_for_topic(topic) or ())
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read the partitions of {topic}: {error}") from error

    # producer
    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        """Queue a record. ``flush`` waits for every queued acknowledgement; a failure is
        remembered (by the producer's I/O thread) and raised by ``check`` or ``flush``."""
        nbytes = record_size_bytes(key, value, headers or [])
        try:
            future = self._producer.send(topic, key=key, value=value, headers=headers)
        except kafka_errors.KafkaError as error:
            raise produce_error(f"cannot publish to {topic}", topic, error, nbytes) from error
        future.add_errback(self._failed_callback(topic, nbytes))
        self._unflushed += 1

    def send_keyed(self, topic: str, keys: list[bytes], values: list[bytes]) -> None:
        """Queue many keyed records; same partitions as the default partitioner picks.

        The partitions come from one compiled murmur2 over the whole batch: kafka-python's
        pure-Python partitioner cost more per record than anything else in the worker.
        """
        if not keys:
            return
        try:
            partitions = sorted(self._producer.partitions_for(topic))
        except kafka_errors.KafkaError as error:
            raise produce_error(f"cannot publish to {topic}", topic, error, None) from error
        chosen = key_partitions(keys, len(partitions))
        if partitions[-1] != len(partitions) - 1:  # partition ids are 0..n-1 in practice
            chosen = [partitions[i] for i in chosen]
        send, on_failed = self._producer.send, self._failed_callback(topic, None)
        try:
            for key, value, partition in zip(keys, values, chosen, strict=True):
                send(topic, key=key, value=value, partition=partition).add_errback(on_failed)
        except kafka_errors.KafkaError as error:
            raise produce_error(f"cannot publish to {topic}", topic, error, None) from error
        self._unflushed += len(keys)

    def _failed_callback(self, topic: str, nbytes: int | None) -> Callable[[BaseException], None]:
        def failed(error: BaseException) -> None:
            # Runs on the producer's I/O thread: only remember the first failure.
            if self._send_failure is None:
                self._send_failure = produce_error(
                    f"record to {topic} not acknowledged", topic, error, nbytes
                )

        return failed

    def check(self) -> None:
        """Raise ProduceError if a record sent since the last flush was rejected already."""
        failure, self._send_failure = self._send_failure, None
        if failure is not None:
            raise failure

    def flush(self) -> int:
        """Wait for every queued record to be acknowledged; raise ProduceError if any failed.

        Returns how many records were queued since the previous flush.
        """
        queued, self._unflushed = self._unflushed, 0
        if queued:
            self._await_queued(self.settings.produce_timeout_s)
        self.check()
        return queued

    def _await_queued(self, timeout_s: float) -> None:
        """kafka-python's flush gives up early ("Future not done") while it splits a batch the
        broker refused as too large; wait on until the parts are settled, so the refusal of
        the record itself (permanent) is what comes out, not that early give-up."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._producer.flush(timeout=max(0.0, deadline - time.monotonic()))
                return
            except kafka_errors.KafkaError as error:
                if self._send_failure is not None:
                    return  # check() raises the record's own failure
                if time.monotonic() >= deadline:
                    raise produce_error("flush failed", None, error, None) from error
                time.sleep(0.01)

    def discard_unacknowledged(self) -> None:
        """Before a rollback: wait for in-flight records, forget the outcome, start a new
        producer. kafka-python's idempotent producer stays failed after some errors (a record
        over the topic's size limit aborts every later batch), so the old one is not reused.
        """
        try:
            self._await_queued(self.settings.produce_timeout_s)
        except ProduceError as error:
            log.warning("in-flight records still unacknowledged at rollback: %s", error)
        try:
            self._producer.close(timeout=0)
        except Exception as error:  # best effort: the replacement is what matters
            log.warning("closing the failed producer: %s", error)
        try:
            self._producer = self._new_producer()
        except kafka_errors.KafkaError as error:
            raise produce_error("cannot start a new producer", None, error, None) from error
        self._unflushed = 0
        self._send_failure = None

    def close(self) -> None:
        # Closing is best effort on the way out: report, never raise.
        try:
            self._producer.close(timeout=5)
        except Exception as error:
            log.warning("closing the Kafka producer failed: %s", error)
        try:
            self._consumer.close()
        except Exception as error:
            log.warning("closing the Kafka consumer failed: %s", error)
        self._close_end_reader()


def _offsets(offsets: Mapping[Partition, int]) -> dict[TopicPartition, OffsetAndMetadata]:
    return {
        TopicPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()
    }
