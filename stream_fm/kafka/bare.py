"""The benchmark's ceilings: a bare consume-and-produce loop on the worker's own client settings.

It reads the input topic from the beginning and produces one small record per impression and
nothing else, so the gap between it and the worker is what the worker's own work costs. One
loop per client (``settings.kafka_client``), each written the fastest plain way its library
allows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from stream_fm.config import Settings
from stream_fm.errors import StreamFMError

IMPRESSION_PREFIX = b'{"type":"impression"'
OUTPUT = b'{"id":"%s","p_click":0.5,"ts":0,"model_version":0}'


@dataclass(frozen=True, slots=True)
class BareRun:
    consumed: int
    produced: int
    started_s: float  # monotonic: consumer created
    first_s: float  # first records received
    first_count: int  # records the first poll returned
    ended_s: float  # everything acknowledged


class _Progress:
    """Counts, the first poll's time and the stall check shared by both loops."""

    def __init__(self, expected: int, stall_timeout_s: float) -> None:
        self.started = time.monotonic()
        self.expected, self.stall_timeout_s = expected, stall_timeout_s
        self.consumed = self.produced = 0
        self.first: tuple[float, int] | None = None
        self.last_progress = time.monotonic()

    @property
    def done(self) -> bool:
        return self.consumed >= self.expected

    def idle(self) -> None:
        if time.monotonic() - self.last_progress > self.stall_timeout_s:
            raise StreamFMError(
                f"bench kafka: ceiling stalled at {self.consumed:,} of {self.expected:,} records"
            )

    def polled(self, n: int) -> None:
        self.consumed += n
        if self.first is None:
            self.first = (time.monotonic(), self.consumed)
        self.last_progress = time.monotonic()

    def result(self) -> BareRun:
        assert self.first is not None
        ended = time.monotonic()
        return BareRun(
            self.consumed, self.produced, self.started, self.first[0], self.first[1], ended
        )


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
    progress = _Progress(expected, stall_timeout_s)
    loop = _confluent if settings.kafka_client == "confluent" else _kafka_python
    loop(settings, input_topic, output_topic, progress, flush_every_poll)
    return progress.result()


def _impressions(
    values_and_keys: Iterable[tuple[bytes | None, bytes | None]],
    send: Callable[[bytes | None], None],
) -> int:
    produced = 0
    for value, key in values_and_keys:
        if value is not None and value.startswith(IMPRESSION_PREFIX):
            send(key)
            produced += 1
    return produced


def _kafka_python(
    settings: Settings, input_topic: str, output_topic: str, progress: _Progress, flush: bool
) -> None:
    from kafka import KafkaConsumer, KafkaProducer

    from stream_fm.kafka import lenient  # noqa: F401 - readable header keys, see there
    from stream_fm.kafka.settings import consumer_config, producer_config

    consumer = KafkaConsumer(**consumer_config(settings))
    producer = KafkaProducer(**producer_config(settings))

    def send(key: bytes | None) -> None:
        producer.send(output_topic, key=key, value=OUTPUT % key)

    try:
        consumer.subscribe([input_topic])
        while not progress.done:
            batches = consumer.poll(
                timeout_ms=settings.poll_timeout_ms, max_records=settings.max_poll_records
            )
            if not batches:
                progress.idle()
                continue
            for records in batches.values():
                progress.produced += _impressions(((r.value, r.key) for r in records), send)
                progress.polled(len(records))
            if flush:
                producer.flush()
        producer.flush()
    finally:
        producer.close(timeout=5)
        consumer.close()


def _confluent(
    settings: Settings, input_topic: str, output_topic: str, progress: _Progress, flush: bool
) -> None:
    from confluent_kafka import Consumer, Producer

    from stream_fm.kafka.settings import librdkafka_consumer, librdkafka_producer

    consumer = Consumer(librdkafka_consumer(settings))
    producer = Producer(librdkafka_producer(settings))
    produce = producer.produce

    def send(key: bytes | None) -> None:
        try:
            produce(output_topic, OUTPUT % key, key)
        except BufferError:  # the local queue is full: let it drain, then send again
            producer.poll(0.05)
            send(key)

    try:
        consumer.subscribe([input_topic])
        while not progress.done:
            messages = consumer.consume(
                num_messages=settings.max_poll_records, timeout=settings.poll_timeout_ms / 1000
            )
            producer.poll(0)
            records = [m for m in messages if m.error() is None]
            if not records:
                progress.idle()
                continue
            progress.produced += _impressions(((m.value(), m.key()) for m in records), send)
            progress.polled(len(records))
            if flush:
                producer.flush()
        producer.flush()
    finally:
        producer.flush(5)
        consumer.close()
