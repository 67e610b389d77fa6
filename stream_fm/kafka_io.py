"""The only module that talks to Kafka: kafka-python wrapped, its errors turned into ours.

The consumer hands out raw bytes (no deserializer, so a bad record can never raise inside
``poll`` or stall its partition) and never auto-commits: offsets are committed only after
the checkpoint that covers them is durable.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata
from numba import njit

from stream_fm.config import Settings
from stream_fm.errors import BrokerError, ProduceError

log = logging.getLogger("stream_fm.kafka")

Partition = tuple[str, int]
LINGER_MS = 5
# /readyz and the stream_fm_ready gauge ask at every scrape; one TCP connect a second is enough.
REACHABLE_CACHE_S = 1.0
Headers = list[tuple[str, bytes]]


class Record(Protocol):
    """A consumed record: kafka-python's own ConsumerRecord, handed on without a copy."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...


def security_config(settings: Settings) -> dict[str, Any]:
    """kafka-python security settings, passed through as given."""
    config: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if settings.sasl_mechanism:
        config["sasl_mechanism"] = settings.sasl_mechanism
        config["sasl_plain_username"] = settings.sasl_username or None
        config["sasl_plain_password"] = settings.sasl_password or None
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        if getattr(settings, name):
            config[name] = getattr(settings, name)
    return config


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(
        self,
        on_assigned: Callable[[list[Partition]], None],
        on_revoked: Callable[[list[Partition]], None],
    ) -> None:
        self._on_assigned = on_assigned
        self._on_revoked = on_revoked

    def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        self._on_revoked(sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self._on_assigned(sorted((tp.topic, tp.partition) for tp in assigned))


class KafkaIO:
    """A consumer of the input topics and a producer of the output topics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        common = {
            "bootstrap_servers": settings.bootstrap_servers.split(","),
            "client_id": settings.client_id,
        }
        common |= security_config(settings)
        try:
            self._consumer = KafkaConsumer(
                group_id=settings.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_poll_records=settings.max_poll_records,
                session_timeout_ms=settings.session_timeout_ms,
                # Kafka's advice: heartbeats at most a third of the session timeout.
                heartbeat_interval_ms=min(3000, settings.session_timeout_ms // 3),
                # Kafka's own default (5 min) outlives a broker restart; keep the group alive.
                max_poll_interval_ms=300_000,
                fetch_max_bytes=52_428_800,
                **common,
            )
            self._producer = self._new_producer()
        except kafka_errors.KafkaError as error:
            raise BrokerError(
                f"cannot connect to Kafka at {settings.bootstrap_servers}: {error}"
            ) from error
        self._unflushed = 0
        self._send_failure: BaseException | None = None
        self._reachable_at_s = -REACHABLE_CACHE_S
        self._reachable = False

    @property
    def transactional(self) -> bool:
        return bool(self.settings.transactional_id)

    def _new_producer(self) -> KafkaProducer:
        """A producer; in transactional mode with its transaction begun. Starting one fences
        any earlier producer of the same transactional id and aborts its open transaction."""
        settings = self.settings
        produce_timeout_ms = round(settings.produce_timeout_s * 1000)
        request_timeout_ms = min(30_000, produce_timeout_ms)
        extra: dict[str, Any] = {}
        if settings.transactional_id:
            extra["transactional_id"] = settings.transactional_id
        producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            client_id=settings.client_id,
            acks="all",
            linger_ms=LINGER_MS,
            batch_size=262_144,
            retries=2**31 - 1,
            max_block_ms=produce_timeout_ms,
            request_timeout_ms=request_timeout_ms,
            # kafka-python requires delivery > linger + request timeout.
            delivery_timeout_ms=max(produce_timeout_ms, request_timeout_ms + LINGER_MS + 1000),
            **security_config(settings),
            **extra,
        )
        if settings.transactional_id:
            producer.init_transactions()
            producer.begin_transaction()
        return producer

    # consumer
    def subscribe(
        self,
        topics: Sequence[str],
        on_assigned: Callable[[list[Partition]], None],
        on_revoked: Callable[[list[Partition]], None],
    ) -> None:
        self._consumer.subscribe(topics=list(topics), listener=_Listener(on_assigned, on_revoked))

    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Records of all assigned partitions, each partition's in offset order."""
        started = time.monotonic()
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
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

    def seek(self, partition: Partition, offset: int) -> None:
        self._consumer.seek(TopicPartition(*partition), offset)

    def committed(self, partition: Partition) -> int | None:
        try:
            offset = self._consumer.committed(TopicPartition(*partition))
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read committed offsets: {error}") from error
        return None if offset is None else int(offset)

    def commit(self, offsets: Mapping[Partition, int], wait: bool = True) -> None:
        """Commit next-offsets to the group (for lag monitoring; the checkpoint is the truth).

        ``wait=False`` from a rebalance callback: kafka-python runs those on its IO thread,
        where a blocking commit would deadlock.
        """
        if not offsets:
            return
        request = {
            TopicPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()
        }
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
        request = {
            TopicPartition(*tp): OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()
        }
        try:
            if request:
                self._producer.send_offsets_to_transaction(request, self._consumer.group_metadata())
            self._producer.commit_transaction()
            self._producer.begin_transaction()
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"transaction not committed: {error!r}") from error

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

    def reachable(self, timeout_s: float = 0.5) -> bool:
        """Whether a bootstrap broker answered a request within the last second (/readyz).

        Its own connection, not client internals: it answers from the HTTP thread without
        touching the consumer, which is not thread-safe.
        """
        now = time.monotonic()
        if now - self._reachable_at_s >= REACHABLE_CACHE_S:
            self._reachable = self._connect_any(timeout_s)
            self._reachable_at_s = time.monotonic()
        return self._reachable

    def _connect_any(self, timeout_s: float) -> bool:
        for server in self.settings.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                if _broker_answers(
                    host.strip("[]") or "127.0.0.1",
                    int(port),
                    timeout_s,
                    probe=self.settings.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"),
                ):
                    return True
            except (OSError, ValueError):
                continue
        return False

    def partitions_for(self, topic: str) -> set[int]:
        try:
            return set(self._consumer.partitions_for_topic(topic) or ())
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read the partitions of {topic}: {error}") from error

    def wait_for_topics(self, topics: Sequence[str], timeout_s: float) -> list[str]:
        """Wait until the cluster metadata lists ``topics``; return those still missing.

        Subscribing before the metadata arrived gets an empty first assignment.
        """
        deadline = time.monotonic() + timeout_s
        missing = list(topics)
        while missing and time.monotonic() < deadline:
            missing = [t for t in missing if not self.partitions_for(t)]
            if missing:
                time.sleep(0.2)
        return missing

    # producer
    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None:
        """Queue a record. ``flush`` waits for every queued acknowledgement; a failure is
        remembered (by the producer's I/O thread) and raised by ``check`` or ``flush``."""
        try:
            future = self._producer.send(topic, key=key, value=value, headers=headers)
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"cannot publish to {topic}: {error}") from error
        future.add_errback(self._on_send_failed)
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
            raise ProduceError(f"cannot publish to {topic}: {error}") from error
        chosen = key_partitions(keys, len(partitions))
        if partitions[-1] != len(partitions) - 1:  # partition ids are 0..n-1 in practice
            chosen = [partitions[i] for i in chosen]
        send, on_failed = self._producer.send, self._on_send_failed
        try:
            for key, value, partition in zip(keys, values, chosen, strict=True):
                send(topic, key=key, value=value, partition=partition).add_errback(on_failed)
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"cannot publish to {topic}: {error}") from error
        self._unflushed += len(keys)

    def _on_send_failed(self, error: BaseException) -> None:
        if self._send_failure is None:
            self._send_failure = error

    def check(self) -> None:
        """Raise ProduceError if a record sent since the last flush was rejected already."""
        failure, self._send_failure = self._send_failure, None
        if failure is not None:
            raise ProduceError(f"record not acknowledged: {failure!r}")

    def flush(self) -> int:
        """Wait for every queued record to be acknowledged; raise ProduceError if any failed.

        Returns how many records were queued since the previous flush.
        """
        queued, self._unflushed = self._unflushed, 0
        if queued:
            try:
                self._producer.flush(timeout=self.settings.produce_timeout_s)
            except kafka_errors.KafkaError as error:
                self._send_failure = None
                raise ProduceError(f"flush failed: {error}") from error
        self.check()
        return queued

    def discard_unacknowledged(self) -> None:
        """Before a rollback: wait for in-flight records, forget the outcome, start a new
        producer. kafka-python's idempotent producer stays failed after some errors (a record
        over the topic's size limit aborts every later batch), so the old one is not reused.
        """
        try:
            self._producer.flush(timeout=self.settings.produce_timeout_s)
        except kafka_errors.KafkaError as error:
            log.warning("in-flight records still unacknowledged at rollback: %s", error)
        try:
            self._producer.close(timeout=0)
        except Exception as error:  # best effort: the replacement is what matters
            log.warning("closing the failed producer: %s", error)
        try:
            self._producer = self._new_producer()
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"cannot start a new producer: {error}") from error
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


# ApiVersions v0 (api key 18), correlation id 1, client id "stream-fm-readyz": the one request
# a broker answers before any authentication (KIP-35), so it also works on SASL listeners.
_API_VERSIONS_REQUEST = (
    struct.pack(">hhih", 18, 0, 1, len(b"stream-fm-readyz")) + b"stream-fm-readyz"
)


def _broker_answers(host: str, port: int, timeout_s: float, probe: bool = True) -> bool:
    """Whether a broker process answers at ``host:port``.

    A TCP connect alone is not enough: the kernel completes it for a frozen (SIGSTOP) or hung
    broker. So an ApiVersions request must get a response. On TLS listeners (no handshake
    here) only the connect is checked.
    """
    with socket.create_connection((host, port), timeout=timeout_s) as connection:
        if not probe:
            return True
        connection.settimeout(timeout_s)
        connection.sendall(struct.pack(">i", len(_API_VERSIONS_REQUEST)) + _API_VERSIONS_REQUEST)
        header = b""
        while len(header) < 8:
            chunk = connection.recv(8 - len(header))
            if not chunk:
                return False
            header += chunk
        _size, correlation_id = struct.unpack(">ii", header)
        return bool(correlation_id == 1)


def key_partitions(keys: Sequence[bytes], n_partitions: int) -> list[int]:
    """Partition index of each key, as Kafka's default partitioner computes it.

    ``toPositive(murmur2(key)) % n``, the Java client's rule (kafka-python's too), so records
    keyed by an id land where any other producer would put them.

    >>> from kafka.partitioner.default import murmur2
    >>> keys = [b"imp-1", b"a", b"", b"click-000123"]
    >>> key_partitions(keys, 7) == [(murmur2(k) & 0x7FFFFFFF) % 7 for k in keys]
    True
    """
    lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
    blob = np.frombuffer(b"".join(keys), dtype=np.uint8)
    out = np.empty(len(keys), dtype=np.int64)
    _murmur2_partitions(blob, lengths, n_partitions, out)
    result: list[int] = out.tolist()
    return result


@njit(cache=True, nogil=True)
def _murmur2_partitions(
    blob: npt.NDArray[np.uint8], lengths: npt.NDArray[np.int64], n: int, out: npt.NDArray[np.int64]
) -> None:
    # Numba widens uint32 products to 64 bits: mask back to 32 after each multiply.
    mask = np.uint64(0xFFFFFFFF)
    m = np.uint64(0x5BD1E995)
    start = 0
    for j in range(lengths.shape[0]):
        length = lengths[j]
        h = np.uint64(0x9747B28C) ^ np.uint64(length)
        for b in range(length // 4):
            p = start + 4 * b
            k = (
                np.uint64(blob[p])
                | (np.uint64(blob[p + 1]) << np.uint64(8))
                | (np.uint64(blob[p + 2]) << np.uint64(16))
                | (np.uint64(blob[p + 3]) << np.uint64(24))
            )
            k = (k * m) & mask
            k ^= k >> np.uint64(24)
            k = (k * m) & mask
            h = (h * m) & mask
            h ^= k
        tail = start + (length & ~3)
        extra = length & 3
        if extra >= 3:
            h ^= np.uint64(blob[tail + 2]) << np.uint64(16)
        if extra >= 2:
            h ^= np.uint64(blob[tail + 1]) << np.uint64(8)
        if extra >= 1:
            h ^= np.uint64(blob[tail])
            h = (h * m) & mask
        h ^= h >> np.uint64(13)
        h = (h * m) & mask
        h ^= h >> np.uint64(15)
        out[j] = np.int64(h & np.uint64(0x7FFFFFFF)) % n
        start += length


class EventProducer:
    """A plain producer for the simulator: events keyed by impression id."""

    def __init__(self, bootstrap_servers: str, **security: Any) -> None:
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=bootstrap_servers.split(","),
                linger_ms=5,
                batch_size=262_144,
                acks="all",
                **security,
            )
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot connect to Kafka at {bootstrap_servers}: {error}") from error

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        try:
            self._producer.send(topic, key=key, value=value)
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"cannot publish to {topic}: {error}") from error

    def flush(self, timeout_s: float = 60.0) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"flush failed: {error}") from error

    def close(self) -> None:
        self._producer.close(timeout=10)
