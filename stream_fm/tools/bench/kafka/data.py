"""Topics, the simulated records, preloading them, and reading topics back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import islice

import orjson

from stream_fm.errors import StreamFMError
from stream_fm.kafka.admin import TopicReader, event_producer, read_topic
from stream_fm.kafka.bare import IMPRESSION_PREFIX
from stream_fm.tools.bench.kafka.options import STALL_TIMEOUT_S, KafkaBenchOptions
from stream_fm.tools.bench.kafka.results import PreloadResult
from stream_fm.tools.simulate import SimulationParams, Simulator


def _topics(run_id: str, name: str, labels: bool) -> dict[str, str]:
    topics = {
        "input": f"bench-{run_id}-{name}-input",
        "predictions": f"bench-{run_id}-{name}-predictions",
        "dead_letters": f"bench-{run_id}-{name}-dlq",
    }
    if labels:
        topics["labels"] = f"bench-{run_id}-{name}-labels"
    return topics


def simulated_records(options: KafkaBenchOptions) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of the first ``options.events`` simulated events, in event-time order."""
    params = SimulationParams(
        n_impressions=0,  # unbounded, streamed: the first ``events`` are taken
        n_fields=20,
        impressions_per_s=options.impressions_per_s,
        attribution_window_s=options.attribution_window_s,
        seed=options.seed,
    )
    for event in islice(Simulator(params).events(), options.events):
        yield event["id"].encode(), orjson.dumps(event)


def preload(
    bootstrap_servers: str,
    topic: str,
    options: KafkaBenchOptions,
    impression_keys: set[bytes] | None = None,
) -> PreloadResult:
    """Produce ``options.events`` simulated records; collect the impressions' keys (ids) into
    ``impression_keys`` if given."""
    producer = event_producer(bootstrap_servers, options.load_client)
    records = impressions = size = 0
    started = time.monotonic()
    try:
        for key, value in simulated_records(options):
            producer.send(topic, key, value)
            records += 1
            size += len(value)
            if value.startswith(IMPRESSION_PREFIX):
                impressions += 1
                if impression_keys is not None:
                    impression_keys.add(key)
        producer.flush(timeout_s=600)
    finally:
        producer.close()
    seconds = time.monotonic() - started
    return PreloadResult(
        topic, records, impressions, records - impressions, size, seconds, records / seconds
    )


class Watermarks:
    """Records the broker acknowledged (acks=all) in one topic: its high watermarks' sum."""

    def __init__(self, bootstrap_servers: str, topic: str) -> None:
        self._reader = TopicReader(bootstrap_servers)
        self._topic = topic

    def total(self) -> int:
        return self._reader.total(self._topic)

    def close(self) -> None:
        self._reader.close()


def read_timestamps(
    bootstrap_servers: str, topic: str, expected: int, impressions_only: bool = False
) -> dict[bytes, int]:
    """key -> record timestamp (ms) of a whole topic, read from the beginning."""
    records = read_topic(bootstrap_servers, topic, timeout_s=STALL_TIMEOUT_S)
    if len(records) < expected:
        raise StreamFMError(
            f"bench kafka: {topic} holds {len(records):,} records, {expected:,} expected"
        )
    return {
        r.key or b"": int(r.timestamp)
        for r in records
        if not impressions_only or (r.value or b"").startswith(IMPRESSION_PREFIX)
    }
