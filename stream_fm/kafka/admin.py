"""Admin calls, plain producers and whole-topic reads: what the broker launcher, the simulator,
the benchmarks and the tests need from Kafka, through the same package as the worker.

Every function takes the bootstrap servers (and optionally the worker's ``Settings`` for TLS
and SASL); client errors come back as ``BrokerError`` or ``ProduceError``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, NamedTuple, Protocol

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.admin import (
    ACL,
    ACLFilter,
    ACLOperation,
    ACLPermissionType,
    ACLResourcePatternType,
    ConfigResource,
    ConfigResourceType,
    KafkaAdminClient,
    NewTopic,
    ResourcePattern,
    ResourcePatternFilter,
    ResourceType,
    UserScramCredentialUpsertion,
)
from kafka.structs import OffsetAndMetadata

from stream_fm.config import Settings
from stream_fm.errors import BrokerError, ProduceError
from stream_fm.kafka import last_words, lenient  # noqa: F401 - kafka-python fixes, see there
from stream_fm.kafka.acls import AclNeed
from stream_fm.kafka.settings import client_setting, security_config

log = logging.getLogger("stream_fm.kafka")

MAX_MESSAGE_BYTES = "max.message.bytes"


class ConsumedRecord(NamedTuple):
    """One record read back from a topic."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    timestamp: int


def _servers(bootstrap_servers: str) -> list[str]:
    return [s.strip() for s in bootstrap_servers.split(",") if s.strip()]


class Admin:
    """``with Admin(bootstrap) as admin: admin.create_topics([...])``."""

    def __init__(
        self,
        bootstrap_servers: str,
        settings: Settings | None = None,
        request_timeout_ms: int = 30_000,
    ) -> None:
        try:
            self._client = KafkaAdminClient(
                bootstrap_servers=_servers(bootstrap_servers),
                client_id="stream-fm-admin",
                request_timeout_ms=request_timeout_ms,
                **security_config(settings),
            )
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot reach Kafka at {bootstrap_servers}: {error}") from error

    def __enter__(self) -> Admin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def live_brokers(self) -> int:
        """Brokers the controller has unfenced (0 while a new broker starts)."""
        try:
            cluster = self._client.describe_cluster()
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"describe cluster failed: {error}") from error
        return sum(1 for b in cluster.get("brokers") or [] if not b.get("is_fenced", False))

    def create_topics(
        self,
        names: Iterable[str],
        partitions: int,
        replication: int = 1,
        configs: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        """Create the topics that do not exist yet; wait until every partition has a leader."""
        wanted = list(dict.fromkeys(names))
        try:
            for name in wanted:
                topic = NewTopic(name, partitions, replication, topic_configs=dict(configs or {}))
                with contextlib.suppress(kafka_errors.TopicAlreadyExistsError):
                    self._client.create_topics([topic], timeout_ms=int(timeout_s * 1000))
            if wanted:
                self._client.wait_for_topics(wanted, timeout_ms=int(timeout_s * 1000))
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot create topics {wanted}: {error}") from error

    def topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` exists and this principal may see it (DESCRIBE, which READ and
        WRITE imply)."""
        try:
            return topic in set(self._client.list_topics())
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot list topics: {error}") from error

    def topic_config(self, topic: str, name: str) -> str | None:
        """The effective value of one topic setting (defaults included), None if unreadable."""
        try:
            described = self._client.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all"
            )
        except kafka_errors.KafkaError as error:
            log.debug("cannot describe %s: %s", topic, error)
            return None
        entry = described.get("topic", {}).get(topic, {}).get(name)
        value = entry.get("value") if isinstance(entry, dict) else entry
        return None if value is None else str(value)

    def grant(self, principal: str, needs: Iterable[AclNeed]) -> None:
        """ALLOW ``principal`` (``User:name``) each need, from any host."""
        acls = [
            ACL(
                principal, "*", ACLOperation[n.operation], ACLPermissionType.ALLOW,
                ResourcePattern(ResourceType[n.resource], n.name, ACLResourcePatternType.LITERAL),
            )
            for n in needs
        ]  # fmt: skip
        try:
            result = self._client.create_acls(acls)
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot create ACLs for {principal}: {error}") from error
        if result.get("failed"):
            raise BrokerError(f"ACLs refused for {principal}: {result['failed']}")

    def revoke(self, principal: str, need: AclNeed) -> None:
        """Delete the ALLOW ACL ``grant`` made for ``need``."""
        pattern = ResourcePatternFilter(
            ResourceType[need.resource], need.name, ACLResourcePatternType.LITERAL
        )
        acl = ACLFilter(
            principal, "*", ACLOperation[need.operation], ACLPermissionType.ALLOW, pattern
        )
        try:
            self._client.delete_acls([acl])
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot delete an ACL of {principal}: {error}") from error

    def set_scram_password(self, user: str, mechanism: str, password: str) -> None:
        """Create or rotate a SCRAM credential (the broker stores only its salted hash)."""
        upsert = UserScramCredentialUpsertion(user, mechanism, password)
        try:
            errors = self._client.alter_user_scram_credentials([upsert])
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot set the SCRAM credential of {user}: {error}") from error
        if errors and any(errors.values()):
            raise BrokerError(f"cannot set the SCRAM credential of {user}: {errors}")

    def alter_topic_config(self, topic: str, configs: Mapping[str, str]) -> None:
        try:
            self._client.alter_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic, configs=dict(configs))]
            )
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot alter {topic}: {error}") from error


def topic_limits(settings: Settings, topics: Sequence[str]) -> dict[str, int]:
    """Each topic's ``max.message.bytes`` where it can be read (topics that do not exist yet,
    or a missing DescribeConfigs ACL, leave the producer's own bound in charge)."""
    limits: dict[str, int] = {}
    if not topics:
        return limits
    try:
        with Admin(settings.bootstrap_servers, settings, request_timeout_ms=10_000) as admin:
            unread = []
            for topic in dict.fromkeys(topics):
                value = admin.topic_config(topic, MAX_MESSAGE_BYTES)
                if value is not None and value.isdigit():
                    limits[topic] = int(value)
                else:
                    unread.append(topic)
            if unread:  # said once, at start-up: the fallback this worker uses
                log.warning(
                    "cannot read max.message.bytes of %s (absent, or no DESCRIBE_CONFIGS ACL): "
                    "records are bounded by the producer's max_request_size_bytes instead",
                    ", ".join(unread),
                )
    except BrokerError as error:
        log.warning("cannot read the output topics' size limits (%s); using the producer's", error)
    return limits


class EventProducer:
    """A plain producer for the simulator, the benchmarks and the tests."""

    def __init__(
        self,
        bootstrap_servers: str,
        settings: Settings | None = None,
        max_request_size_bytes: int | None = None,
    ) -> None:
        """``max_request_size_bytes`` raises the producer's bound (a test's oversized record)."""
        try:
            self._producer = KafkaProducer(
                bootstrap_servers=_servers(bootstrap_servers),
                linger_ms=client_setting("tool_linger_ms"),
                batch_size=client_setting("batch_size_bytes"),
                max_request_size=max_request_size_bytes or client_setting("max_request_size_bytes"),
                acks=client_setting("acks"),
                **security_config(settings),
            )
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot connect to Kafka at {bootstrap_servers}: {error}") from error

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        try:
            self._producer.send(topic, key=key, value=value, partition=partition, headers=headers)
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"cannot publish to {topic}: {error}") from error

    def send_and_wait(self, topic: str, key: bytes | None, value: bytes | None) -> int:
        """Send one record and wait for it; returns its offset."""
        try:
            metadata = self._producer.send(topic, key=key, value=value).get(timeout=30)
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"cannot publish to {topic}: {error!r}") from error
        return int(metadata.offset)

    def flush(self, timeout_s: float = 60.0) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except kafka_errors.KafkaError as error:
            raise ProduceError(f"flush failed: {error}") from error

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._producer.close(timeout=10)


class Sender(Protocol):
    """What the simulator and the benchmarks produce with."""

    def send(self, topic: str, key: bytes | None, value: bytes | None) -> None: ...
    def flush(self, timeout_s: float = 60.0) -> None: ...
    def close(self) -> None: ...


def event_producer(bootstrap_servers: str, client: str = "kafka-python") -> Sender:
    """A plain producer on ``client`` (``kafka_client``'s values): librdkafka offers load at
    rates the pure-Python client cannot on the same core."""
    if client == "confluent":
        from stream_fm.kafka.confluent import ConfluentEventProducer

        return ConfluentEventProducer(bootstrap_servers)
    return EventProducer(bootstrap_servers)


class TopicReader:
    """Reads topics without a group: partitions, end offsets, every record."""

    def __init__(
        self,
        bootstrap_servers: str,
        settings: Settings | None = None,
        isolation_level: str = "read_uncommitted",
    ) -> None:
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=_servers(bootstrap_servers),
                enable_auto_commit=False,
                group_id=None,
                max_poll_records=10_000,
                fetch_max_bytes=client_setting("fetch_max_bytes"),
                isolation_level=isolation_level,
                **security_config(settings),
            )
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot connect to Kafka at {bootstrap_servers}: {error}") from error

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._consumer.close()

    def partitions(self, topic: str) -> list[int]:
        return sorted(self._consumer.partitions_for_topic(topic) or ())

    def end_offsets(self, topic: str) -> dict[str, int]:
        """``"topic:partition"`` -> log-end offset."""
        parts = [TopicPartition(topic, p) for p in self.partitions(topic)]
        if not parts:
            return {}
        return {
            f"{tp.topic}:{tp.partition}": int(o)
            for tp, o in self._consumer.end_offsets(parts).items()
        }

    def end_offsets_of(
        self, partitions: Iterable[tuple[str, int]], timeout_ms: int = 5_000
    ) -> dict[tuple[str, int], int]:
        """(topic, partition) -> log-end offset, for the partitions given."""
        parts = [TopicPartition(topic, partition) for topic, partition in partitions]
        if not parts:
            return {}
        try:
            ends = self._consumer.end_offsets(parts, timeout_ms=timeout_ms)
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read end offsets: {error}") from error
        return {(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def total(self, topic: str) -> int:
        """Records in ``topic`` (the sum of its partitions' end offsets)."""
        return sum(self.end_offsets(topic).values())

    def read_until_idle(self, topic: str, idle_s: float = 3.0) -> list[ConsumedRecord]:
        """Every record of ``topic`` from the start until none came for ``idle_s``
        (``read_committed`` readers: the end is where the open transactions begin)."""
        parts = [TopicPartition(topic, p) for p in self.partitions(topic)]
        self._consumer.assign(parts)
        self._consumer.seek_to_beginning(*parts)
        records: list[ConsumedRecord] = []
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < idle_s:
            for batch in self._consumer.poll(timeout_ms=200).values():
                records += [_record(r) for r in batch]
                idle_since = time.monotonic()
        return records

    def read(self, topic: str, timeout_s: float = 60.0) -> list[ConsumedRecord]:
        """Every record of ``topic`` up to its end offsets now."""
        parts = [TopicPartition(topic, p) for p in self.partitions(topic)]
        if not parts:
            return []
        self._consumer.assign(parts)
        self._consumer.seek_to_beginning(*parts)
        ends = self._consumer.end_offsets(parts)
        records: list[ConsumedRecord] = []
        deadline = time.monotonic() + timeout_s
        while any(self._consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot read {topic} to its end in {timeout_s:.0f}s")
            for batch in self._consumer.poll(timeout_ms=200).values():
                records += [
                    _record(r)
                    for r in batch
                    if r.offset < ends[TopicPartition(r.topic, r.partition)]
                ]
        return records


class TopicFollower:
    """Every partition of one topic, read without a group from offsets the caller keeps (the
    model-updates topic: every worker reads all of it and records where it stands)."""

    def __init__(self, settings: Settings, topic: str, read_committed: bool = False) -> None:
        self.topic = topic
        self._reader = TopicReader(
            settings.bootstrap_servers,
            settings,
            isolation_level="read_committed" if read_committed else "read_uncommitted",
        )
        self._consumer = self._reader._consumer
        self._parts: list[TopicPartition] = []

    def start(self, positions: Mapping[int, int], timeout_s: float = 30.0) -> dict[int, int]:
        """Read from ``positions`` (partition -> next offset; the beginning of a partition
        not in it). Returns where each partition starts."""
        deadline = time.monotonic() + timeout_s
        try:
            while not (partitions := self._reader.partitions(self.topic)):
                if time.monotonic() > deadline:
                    raise BrokerError(f"topic {self.topic} has no partitions after {timeout_s}s")
                time.sleep(0.2)
            self._parts = [TopicPartition(self.topic, p) for p in partitions]
            self._consumer.assign(self._parts)
            begin = self._consumer.beginning_offsets(self._parts)
            started = {}
            for tp in self._parts:
                # Retention may have removed what a position points at: the oldest left.
                at = max(positions.get(tp.partition, 0), int(begin[tp]))
                self._consumer.seek(tp, at)
                started[tp.partition] = at
            return started
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read {self.topic}: {error}") from error

    def end_offsets(self) -> dict[int, int]:
        """Each partition's log end (``read_committed``: where the open transactions begin)."""
        try:
            ends = self._consumer.end_offsets(self._parts)
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read the end of {self.topic}: {error}") from error
        return {tp.partition: int(offset) for tp, offset in ends.items()}

    def positions(self) -> dict[int, int]:
        """Each partition's next offset to read: past transaction markers and aborted
        records too, which never come out as records."""
        try:
            return {tp.partition: int(self._consumer.position(tp)) for tp in self._parts}
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read positions in {self.topic}: {error}") from error

    def fetch(self, timeout_ms: int, max_records: int) -> list[ConsumedRecord]:
        """The next records of every partition, each partition's in offset order."""
        try:
            batches = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except kafka_errors.KafkaError as error:
            raise BrokerError(f"cannot read {self.topic}: {error}") from error
        return [_record(r) for batch in batches.values() for r in batch]

    def close(self) -> None:
        self._reader.close()


def _record(r: Any) -> ConsumedRecord:
    return ConsumedRecord(
        r.topic, r.partition, r.offset, r.key, r.value, list(r.headers), int(r.timestamp)
    )


def read_topic(bootstrap_servers: str, topic: str, timeout_s: float = 60.0) -> list[ConsumedRecord]:
    """Every record of ``topic`` up to its current end offsets."""
    with TopicReader(bootstrap_servers) as reader:
        return reader.read(topic, timeout_s)


def end_offsets(bootstrap_servers: str, topic: str) -> dict[str, int]:
    with TopicReader(bootstrap_servers) as reader:
        return reader.end_offsets(topic)


def _group_consumer(bootstrap_servers: str, group_id: str) -> Any:
    return KafkaConsumer(
        bootstrap_servers=_servers(bootstrap_servers),
        group_id=group_id,
        enable_auto_commit=False,
    )


def committed_offsets(bootstrap_servers: str, group_id: str, topic: str) -> dict[str, int | None]:
    """``"topic:partition"`` -> the group's committed offset (None where it has none)."""
    try:
        consumer = _group_consumer(bootstrap_servers, group_id)
        try:
            parts = sorted(consumer.partitions_for_topic(topic) or ())
            return {f"{topic}:{p}": consumer.committed(TopicPartition(topic, p)) for p in parts}
        finally:
            consumer.close()
    except kafka_errors.KafkaError as error:
        raise BrokerError(f"cannot read group {group_id}'s offsets of {topic}: {error}") from error


def commit_offsets(
    bootstrap_servers: str, group_id: str, offsets: Mapping[tuple[str, int], int]
) -> None:
    """Commit offsets for a group from outside it (operators' tooling, tests)."""
    consumer = _group_consumer(bootstrap_servers, group_id)
    try:
        consumer.commit(
            {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        )
    finally:
        consumer.close()
