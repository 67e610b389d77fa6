"""The benchmark's ceiling: a bare consume-and-produce loop on the worker's own client settings.

It reads the input topic from the beginning and produces one small record per impression and
nothing else, so the gap between it and the worker is what the worker's own work costs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer

from stream_fm.config import Settings
from stream_fm.errors import StreamFMError
from stream_fm.kafka import lenient  # noqa: F401 - readable header keys, see there
from stream_fm.kafka.settings import consumer_config, producer_config

IMPRESSION_PREFIX = b'{"type":"impression"'


@dataclass(frozen=True, slots=True)
class BareRun:
    consumed: int
    produced: int
    started_s: float  # monotonic: consumer created
    first_s: float  # first records received
    first_count: int  # records the first poll returned
    ended_s: float  # everything acknowledged


def consume_and_produce(
    settings: Settings,
    input_topic: str,
    output_topic: str,
    expected: int,
    *,
    flush_every_poll: bool,
    stall_timeout_s: float = 120.0,
) -> BareRun:
    """Consume ``expected`` records, produce one ~60-byte record per impression."""
    started = time.monotonic()
    consumer = KafkaConsumer(**consumer_config(settings))
    producer = KafkaProducer(**producer_config(settings))
    try:
        consumer.subscribe([input_topic])
        consumed = produced = 0
        first: tuple[float, int] | None = None
        last_progress = time.monotonic()
        send = producer.send
        while consumed < expected:
            batches = consumer.poll(
                timeout_ms=settings.poll_timeout_ms, max_records=settings.max_poll_records
            )
            if not batches:
                if time.monotonic() - last_progress > stall_timeout_s:
                    raise StreamFMError(
                        f"bench kafka: ceiling stalled at {consumed:,} of {expected:,} records"
                    )
                continue
            for records in batches.values():
                for r in records:
                    if r.value.startswith(IMPRESSION_PREFIX):
                        key = r.key
                        send(
                            output_topic,
                            key=key,
                            value=b'{"id":"%s","p_click":0.5,"ts":0,"model_version":0}' % key,
                        )
                        produced += 1
                consumed += len(records)
            if first is None:
                first = (time.monotonic(), consumed)
            if flush_every_poll:
                producer.flush()
            last_progress = time.monotonic()
        producer.flush()
        ended = time.monotonic()
    finally:
        producer.close(timeout=5)
        consumer.close()
    assert first is not None
    return BareRun(consumed, produced, started, first[0], first[1], ended)
