"""What both clients do the same way, whatever library is behind them: record size limits
per output topic, waiting for topics to appear, the cached readiness probe, and end offsets
read on a connection of their own."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Final

from stream_fm.config import Settings
from stream_fm.errors import BrokerError
from stream_fm.kafka.admin import TopicReader, topic_limits
from stream_fm.kafka.base import Partition
from stream_fm.kafka.probe import any_broker_answers
from stream_fm.kafka.refusal import NOTICED
from stream_fm.kafka.settings import client_setting

log = logging.getLogger("stream_fm.kafka")
# /readyz and the stream_fm_ready gauge ask at every scrape; one probe a second is enough.
REACHABLE_CACHE_S: Final = 1.0


class ClientCommon:
    """The client-independent half of a ``KafkaIO``; a client module subclasses it and
    supplies ``partitions_for``."""

    def __init__(self, settings: Settings, output_topics: Sequence[str]) -> None:
        self.settings = settings
        self._max_request = int(client_setting("max_request_size_bytes"))
        # Kept per topic: a refusal lowers a topic's limit below the refused size.
        self._limits: dict[str, int] = topic_limits(settings, output_topics)
        refusal = NOTICED.recent(settings)
        if refusal is not None:  # the admin login was refused: so would the clients' be
            raise refusal
        self._reachable_at_s = -REACHABLE_CACHE_S
        self._reachable = False
        self._end_reader: TopicReader | None = None

    def partitions_for(self, topic: str) -> set[int]:
        raise NotImplementedError

    @property
    def transactional(self) -> bool:
        return bool(self.settings.transactional_id)

    def batch_size_bytes(self) -> int:
        """A producer batch must fit the smallest output topic, or small records are refused."""
        return min([int(client_setting("batch_size_bytes")), *self._limits.values()])

    def record_limit_bytes(self, topic: str) -> int:
        return min(self._limits.get(topic, self._max_request), self._max_request)

    def record_rejected(self, topic: str, nbytes: int) -> None:
        lowered = min(self.record_limit_bytes(topic), nbytes) * 3 // 4
        log.warning(
            "%s refused a %d-byte record; its records now stay below %d", topic, nbytes, lowered
        )
        self._limits[topic] = lowered

    def wait_for_topics(self, topics: Sequence[str], timeout_s: float) -> list[str]:
        """Wait until the cluster metadata lists ``topics``; return those still missing.

        Subscribing before the metadata arrived gets an empty first assignment.
        """
        deadline = time.monotonic() + timeout_s
        missing = list(topics)
        while missing and time.monotonic() < deadline:
            missing = [t for t in missing if not self.partitions_for(t)]
            refusal = NOTICED.recent(self.settings)
            if missing and refusal is not None:  # not absent: hidden from this principal
                raise refusal
            if missing:
                time.sleep(0.2)
        return missing

    def reachable(self, timeout_s: float = 0.5) -> bool:
        """Whether a bootstrap broker answered a request within the last second (/readyz)."""
        now = time.monotonic()
        if now - self._reachable_at_s >= REACHABLE_CACHE_S:
            self._reachable = any_broker_answers(self.settings, timeout_s)
            self._reachable_at_s = time.monotonic()
        return self._reachable

    def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Log-end offsets on a connection of their own, not the consumer's: a consumer that
        stopped fetching is no witness of how far the log goes (the watchdog asks this)."""
        try:
            if self._end_reader is None:
                self._end_reader = TopicReader(self.settings.bootstrap_servers, self.settings)
            return self._end_reader.end_offsets_of(partitions)
        except BrokerError:
            self._close_end_reader()  # a new connection next time
            raise

    def _close_end_reader(self) -> None:
        if self._end_reader is not None:
            self._end_reader.close()
            self._end_reader = None
