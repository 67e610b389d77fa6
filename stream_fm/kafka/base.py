"""The one interface the worker sees, whatever Kafka client is behind it.

A client module (``kafka_python``, later ``confluent``) implements ``KafkaIO``: a consumer of
the input topics that hands out raw records (no deserializer, so a bad record can never raise
inside ``poll`` or stall its partition) and never auto-commits, and a producer of the output
topics whose failures come back as our ``ProduceError``, classified as permanent or not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

Partition = tuple[str, int]
Headers = list[tuple[str, bytes]]
Rebalance = Callable[[list[Partition]], None]


class Record(Protocol):
    """A consumed record, as the client library gives it (no copy)."""

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


class UnreadableRecord:
    """A record the client could not parse (a corrupt batch): skipped and handed on in its
    place, so the worker dead-letters what is known of it and its partition never stalls."""

    __slots__ = ("error", "offset", "partition", "timestamp", "topic")
    key: bytes | None = None
    value: bytes | None = None

    def __init__(self, topic: str, partition: int, offset: int, error: str) -> None:
        self.topic, self.partition, self.offset, self.error = topic, partition, offset, error
        self.timestamp = int(time.time() * 1000)


class KafkaIO(Protocol):
    """Consumer of the input topics and producer of the output topics of one worker."""

    @property
    def transactional(self) -> bool: ...

    # consumer
    def subscribe(
        self, topics: Sequence[str], on_assigned: Rebalance, on_revoked: Rebalance
    ) -> None: ...
    def poll(self, timeout_ms: int, max_records: int) -> list[Record]:
        """Records of the assigned partitions, each partition's in offset order."""
        ...

    def seek(self, partition: Partition, offset: int) -> None: ...
    def committed(self, partition: Partition) -> int | None: ...
    def position(self, partition: Partition) -> int:
        """The offset of the next record ``poll`` will hand out from an assigned partition
        (its seek, else the group's committed offset, else the reset; blocking)."""
        ...

    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Log-end offsets, read on a connection other than the consumer's."""
        ...

    def rebuild_consumer(self) -> None:
        """Replace the consumer by a new one subscribed as it was. The old one leaves the group
        without calling back: the caller has released its partitions first."""
        ...

    def commit(self, offsets: Mapping[Partition, int], wait: bool = True) -> None: ...
    def commit_transaction(self, offsets: Mapping[Partition, int]) -> None: ...
    def assignment(self) -> list[Partition]: ...
    def lag(self) -> dict[Partition, int]: ...
    def reachable(self) -> bool: ...
    def partitions_for(self, topic: str) -> set[int]: ...
    def wait_for_topics(self, topics: Sequence[str], timeout_s: float) -> list[str]: ...

    # producer
    def record_limit_bytes(self, topic: str) -> int:
        """The largest record ``topic`` and the producer accept (what a dead letter must fit)."""
        ...

    def record_rejected(self, topic: str, nbytes: int) -> None:
        """A record of ``nbytes`` was refused as too large: lower ``topic``'s limit below it."""
        ...

    def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None = None
    ) -> None: ...
    def send_keyed(self, topic: str, keys: list[bytes], values: list[bytes]) -> None: ...
    def check(self) -> None: ...
    def flush(self) -> int: ...
    def discard_unacknowledged(self) -> None: ...
    def close(self) -> None: ...
