"""The only package that imports a Kafka client library.

- ``base``: the ``KafkaIO`` interface the worker is written against, and ``Record``;
- ``kafka_python``: ``KafkaIO`` on kafka-python (the default client);
- ``confluent``: ``KafkaIO`` on librdkafka (confluent-kafka, the ``librdkafka`` extra);
- ``settings``: every client setting in one documented table;
- ``admin``: admin calls, plain producers and topic reads for the tools and the tests;
- ``partitioner``, ``probe``: Kafka's default partitioner compiled, and the readiness probe.

Client errors never leave the package: they become ``BrokerError`` or ``ProduceError``.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream_fm.config import Settings
from stream_fm.kafka.base import Headers, KafkaIO, Partition, Record, UnreadableRecord

__all__ = ["Headers", "KafkaIO", "Partition", "Record", "UnreadableRecord", "connect"]


def connect(settings: Settings, output_topics: Sequence[str] = ()) -> KafkaIO:
    """The worker's consumer and producer on ``settings.kafka_client``; ``output_topics`` get
    their size limits read."""
    if settings.kafka_client == "confluent":
        from stream_fm.kafka.confluent import ConfluentIO

        return ConfluentIO(settings, output_topics)
    from stream_fm.kafka.kafka_python import KafkaPythonIO

    return KafkaPythonIO(settings, output_topics)
