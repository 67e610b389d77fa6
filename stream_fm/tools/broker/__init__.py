"""The Apache Kafka broker launcher: jars, Java, the broker process (see ``launcher``)."""

from __future__ import annotations

from stream_fm.tools.broker.jars import (
    DOCKER_ALTERNATIVE,
    KAFKA_VERSION,
    default_cache_root,
    kafka_classpath,
    kafka_version,
)
from stream_fm.tools.broker.java import find_java
from stream_fm.tools.broker.launcher import KafkaBroker

__all__ = [
    "DOCKER_ALTERNATIVE",
    "KAFKA_VERSION",
    "KafkaBroker",
    "default_cache_root",
    "find_java",
    "kafka_classpath",
    "kafka_version",
]
