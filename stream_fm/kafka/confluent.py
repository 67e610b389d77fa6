"""``KafkaIO`` on librdkafka (confluent-kafka): the same interface as ``kafka_python``, for
throughput. Selected by ``kafka_client = "confluent"`` (the ``librdkafka`` extra).

librdkafka runs rebalance callbacks on the thread that polls, so an assignment is completed
here: the partitions the worker seeks while ``on_assigned`` runs are assigned at those
offsets. Cooperative-sticky rebalancing hands out and takes back only the partitions that
move. Produce failures arrive in delivery reports, served at each poll and flush, and are
classified as ``kafka_python`` classifies them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple, cast

from confluent_kafka import (
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from stream_fm.config import Settings
from stream_fm.errors import BrokerError, ProduceError
from stream_fm.kafka.base import Headers, Partition, Rebalance, Record
from stream_fm.kafka.common import ClientCommon
from stream_fm.kafka.refusal import NOTICED
from stream_fm.kafka.settings import client_setting, librdkafka_consumer, librdkafka_producer
from stream_fm.outputs import record_size_bytes

log = logging.getLogger("stream_fm.kafka")

#: Refused records that no retry can change (as ``kafka_python.PERMANENT_ERRORS``); librdkafka
#: reports a record above ``message.max.bytes`` locally with the broker's MSG_SIZE_TOO_LARGE.
SIZE_CODES: Final = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})
PERMANENT_CODES: Final = SIZE_CODES | {
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
}


#: A coordinator moving or a broker away: what waiting cures (librdkafka does not always
#: flag these retriable on the group calls).
TRANSIENT_CODES: Final = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._WAIT_COORD,
    }
)


def _transient(error: KafkaException) -> bool:
    kafka_error = error.args[0] if error.args else None
    if not isinstance(kafka_error, KafkaError):
        return False
    return bool(kafka_error.retriable()) or kafka_error.code() in TRANSIENT_CODES


def _noted(error: KafkaError) -> None:
    """librdkafka's error callback: keeps what may be a refusal for the worker to read."""
    NOTICED.note(f"{error.name()}: {error.str()}")


class ConfluentRecord(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


def produce_error(
    what: str, topic: str | None, error: KafkaError, nbytes: int | None
) -> ProduceError:
    code = error.code()
    permanent = code in PERMANENT_CODES or (error.fatal() and not error.retriable())
    return ProduceError(
        f"{what}: {error.name()}: {error.str()}" + (" (refused permanently)" if permanent else ""),
        permanent=permanent,
        topic=topic,
        nbytes=nbytes if code in SIZE_CODES else None,
    )


class ConfluentIO(ClientCommon):
    """A consumer of the input topics and a producer of the output topics (``KafkaIO``)."""

    def __init__(self, settings: Settings, output_topics: Sequence[str] = ()) -> None:
        super().__init__(settings, output_topics)
        self._on_assigned: Rebalance | None = None
        self._on_revoked: Rebalance | None = None
        self._seeks: dict[Partition, int] | None = None  # collected while on_assigned runs
        self._topics: list[str] = []
        self._muted = False  # a consumer being replaced: the worker released its partitions
        try:
            self._consumer = Consumer({**librdkafka_consumer(settings), "error_cb": _noted})
            self._producer = self._new_producer()
        except KafkaException as error:
            raise BrokerError(
                f"cannot connect to Kafka at {settings.bootstrap_servers}: {error}"
            ) from error
        self._unflushed = 0
        self._send_failure: ProduceError | None = None

    def _new_producer(self) -> Producer:
        batch = self.batch_size_bytes()
        config = librdkafka_producer(self.settings, batch_size_bytes=batch)
        producer = Producer({**config, "error_cb": _noted})
        if self.settings.transactional_id:
            producer.init_transactions(self.settings.produce_timeout_s)
            producer.begin_transaction()
        return producer

    # consumer
    def subscribe(
        self, topics: Sequence[str], on_assigned: Rebalance, on_revoked: Rebalance
    ) -> None:
        self._on_assigned, self._on_revoked = on_assigned, on_revoked
        self._topics = list(topics)
        self._consumer.subscribe(
            self._topics, on_assign=self._assign, on_revoke=self._revoke, on_lost=self._revoke
        )

    def rebuild_consumer(self) -> None:
        self._muted = True
        try:
            self._consumer.close()
        except Exception as error:  # a stuck consumer may fail to leave: its session expires
            log.warning("closing the stalled consumer failed: %s", error)
        finally:
            self._muted = False
        try:
            self._consumer = Consumer({**librdkafka_consumer(self.settings), "error_cb": _noted})
        except KafkaException as error:
            raise BrokerError(f"cannot create a new consumer: {error}") from error
        if self._on_assigned is not None and self._on_revoked is not None:
            self.subscribe(self._topics, self._on_assigned, self._on_revoked)

    def _assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._on_assigned is not None
        if self._muted:
            return
        self._seeks = {}
        try:
            self._on_assigned(sorted((tp.topic, tp.partition) for tp in partitions))
            for tp in partitions:
                offset = self._seeks.get((tp.topic, tp.partition))
                if offset is not None:
                    tp.offset = offset
        finally:
            self._seeks = None
        if self._cooperative:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assert self._on_revoked is not None
        if not self._muted:
            self._on_revoked(sorted((tp.topic, tp.partition) for tp in partitions))
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    @property
    def _cooperative(self) -> bool:
        return self._consumer_strategy == "cooperative-sticky"

    @property
    def _consumer_strategy(self) -> str:
        return str(client_setting("librdkafka_assignment_strategy"))

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Records of all assigned partitions, each partition's in offset order."""
        consume = self._consumer.consume
        try:
            # What is fetched already, at once; else wait for one record, then take what came
            # with it. (One consume(n, timeout) waits for n records or the whole timeout: at
            # 10k records/s that is the poll timeout added to every record's latency.)
            messages = consume(num_messages=max_records, timeout=0)
            if not messages:
                messages = consume(num_messages=1, timeout=timeout_ms / 1000)
                if messages and max_records > 1:
                    messages += consume(num_messages=max_records - 1, timeout=0)
        except KafkaException as error:
            raise BrokerError(f"poll failed: {error}") from error
        self._producer.poll(0)  # serve delivery reports
        out: list[Record] = []
        for message in messages:
            problem = message.error()
            if problem is not None:
                if problem.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer: %s", problem.str())
                    _noted(problem)
                continue
            out.append(_record(message))
        return out

    def seek(self, partition: Partition, offset: int) -> None:
        if self._seeks is not None:  # inside on_assigned: the assignment carries it
            self._seeks[partition] = offset
            return
        try:
            self._consumer.seek(TopicPartition(partition[0], partition[1], offset))
        except KafkaException as error:
            raise BrokerError(f"cannot seek {partition}: {error}") from error

    def committed(self, partition: Partition) -> int | None:
        """The group's offset; a coordinator moving (a broker restarting) is waited out, as
        kafka-python waits it out inside its call."""
        deadline = time.monotonic() + self.settings.produce_timeout_s
        while True:
            try:
                (tp,) = self._consumer.committed(
                    [TopicPartition(*partition)], timeout=self.settings.produce_timeout_s
                )
                break
            except KafkaException as error:
                if not _transient(error) or time.monotonic() > deadline:
                    raise BrokerError(f"cannot read committed offsets: {error}") from error
                time.sleep(0.2)
        return None if tp.offset == OFFSET_INVALID or tp.offset < 0 else int(tp.offset)

    def position(self, partition: Partition) -> int:
        """librdkafka knows a position once it fetched; before that it is the committed
        offset, or the reset's end of the log."""
        tp = TopicPartition(*partition)
        try:
            (known,) = self._consumer.position([tp])
            if known.offset >= 0:
                return int(known.offset)
            committed = self.committed(partition)
            if committed is not None:
                return committed
            low, high = self._consumer.get_watermark_offsets(
                tp, timeout=self.settings.produce_timeout_s, cached=False
            )
        except KafkaException as error:
            raise BrokerError(f"cannot read the position of {partition}: {error}") from error
        return int(low if client_setting("auto_offset_reset") == "earliest" else high)

    def commit(self, offsets: Mapping[Partition, int], wait: bool = True) -> None:
        if not offsets:
            return
        try:
            if wait:
                self._consumer.commit(offsets=_partitions(offsets), asynchronous=False)
            else:
                self._consumer.commit(offsets=_partitions(offsets), asynchronous=True)
        except KafkaException as error:
            raise BrokerError(f"offset commit failed: {error}") from error

    def commit_transaction(self, offsets: Mapping[Partition, int]) -> None:
        timeout = self.settings.produce_timeout_s
        try:
            if offsets:
                self._producer.send_offsets_to_transaction(
                    _partitions(offsets), self._consumer.consumer_group_metadata(), timeout
                )
            self._producer.commit_transaction(timeout)
            self._producer.begin_transaction()
        except KafkaException as error:
            raise produce_error("transaction not committed", None, error.args[0], None) from error

    def assignment(self) -> list[Partition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def lag(self) -> dict[Partition, int]:
        out: dict[Partition, int] = {}
        try:
            positions = self._consumer.position(self._consumer.assignment())
        except KafkaException:
            return out
        for tp in positions:
            try:
                _, high = self._consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            if high >= 0 and tp.offset >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        return out

    def partitions_for(self, topic: str) -> set[int]:
        try:
            metadata = self._consumer.list_topics(topic, timeout=5)
        except KafkaException as error:
            self._producer.poll(0)  # serves error_cb: a refused login is reported there
            raise BrokerError(f"cannot read the partitions of {topic}: {error}") from error
        found = metadata.topics.get(topic)
        if found is not None and found.error is not None:
            _noted(found.error)  # absent, or hidden from this principal (a refusal)
            return set()
        if found is None:
            return set()
        return set(found.partitions)

    # producer
    def _report(self, topic: str, nbytes: int | None) -> Any:
        def delivered(error: KafkaError | None, _message: Message) -> None:
            if error is not None and self._send_failure is None:
                self._send_failure = produce_error(
                    f"record to {topic} not acknowledged", topic, error, nbytes
                )

        return delivered

    def _produce(
        self, topic: str, value: bytes, key: bytes | None, headers: Headers | None, report: Any
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic, value, key, headers=cast(Any, headers), on_delivery=report
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # the local queue is full: let it drain
            except KafkaException as error:
                raise produce_error(
                    f"cannot publish to {topic}", topic, error.args[0], len(value)
                ) from error

    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        nbytes = record_size_bytes(key, value, headers or [])
        self._produce(topic, value, key, headers, self._report(topic, nbytes))
        self._unflushed += 1

    def send_keyed(self, topic: str, keys: list[bytes], values: list[bytes]) -> None:
        """librdkafka's murmur2_random partitioner is Kafka's default: no partitioning here."""
        report = self._report(topic, None)
        produce = self._producer.produce
        for key, value in zip(keys, values, strict=True):
            try:
                produce(topic, value, key, on_delivery=report)
            except BufferError:
                self._produce(topic, value, key, None, report)
            except KafkaException as error:
                raise produce_error(
                    f"cannot publish to {topic}", topic, error.args[0], None
                ) from error
        self._unflushed += len(keys)

    def check(self) -> None:
        self._producer.poll(0)
        failure, self._send_failure = self._send_failure, None
        if failure is not None:
            raise failure

    def flush(self) -> int:
        queued, self._unflushed = self._unflushed, 0
        if queued:
            left = self._producer.flush(self.settings.produce_timeout_s)
            if left and self._send_failure is None:
                raise ProduceError(f"flush failed: {left} records not acknowledged in time")
        self.check()
        return queued

    def discard_unacknowledged(self) -> None:
        left = self._producer.flush(self.settings.produce_timeout_s)
        if left:
            log.warning("in-flight records still unacknowledged at rollback: %d", left)
        try:
            self._producer = self._new_producer()
        except KafkaException as error:
            raise produce_error("cannot start a new producer", None, error.args[0], None) from error
        self._unflushed = 0
        self._send_failure = None

    def close(self) -> None:
        try:
            self._producer.flush(5)
        except Exception as error:
            log.warning("closing the Kafka producer failed: %s", error)
        try:
            self._consumer.close()
        except Exception as error:
            log.warning("closing the Kafka consumer failed: %s", error)
        self._close_end_reader()


def _record(message: Any) -> ConfluentRecord:
    """A consumed message (never an error one) as a ``Record``."""
    return ConfluentRecord(
        message.topic(),
        message.partition(),
        message.offset(),
        message.key(),
        message.value(),
        message.timestamp()[1],
    )


def _partitions(offsets: Mapping[Partition, int]) -> list[TopicPartition]:
    return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]


class ConfluentEventProducer:
    """``admin.EventProducer`` on librdkafka: the simulator's and the benchmark's load at
    rates kafka-python cannot offer (see ``admin.event_producer``)."""

    def __init__(self, bootstrap_servers: str) -> None:
        try:
            self._producer = Producer(
                {
                    "bootstrap.servers": bootstrap_servers,
                    "linger.ms": client_setting("tool_linger_ms"),
                    "batch.size": client_setting("batch_size_bytes"),
                    "acks": client_setting("acks"),
                    "queue.buffering.max.messages": client_setting("librdkafka_queue_max_messages"),
                    "partitioner": "murmur2_random",
                }
            )
        except KafkaException as error:
            raise BrokerError(f"cannot connect to Kafka at {bootstrap_servers}: {error}") from error
        self._failure: KafkaError | None = None

    def __enter__(self) -> ConfluentEventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _delivered(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None and self._failure is None:
            self._failure = error

    def send(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=self._delivered)
                break
            except BufferError:
                self._producer.poll(0.05)
            except KafkaException as error:
                raise ProduceError(f"cannot publish to {topic}: {error}") from error
        self._producer.poll(0)
        if self._failure is not None:
            raise ProduceError(f"cannot publish to {topic}: {self._failure.str()}")

    def flush(self, timeout_s: float = 60.0) -> None:
        left = self._producer.flush(timeout_s)
        if left or self._failure is not None:
            raise ProduceError(f"flush failed: {left} records not acknowledged")

    def close(self) -> None:
        self._producer.flush(10)
