"""Small helpers for the worker's integration tests: settings, a worker thread, produce/consume."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stream_fm.config import Settings, build_settings
from stream_fm.kafka.admin import EventProducer, TopicReader
from stream_fm.tools.broker import KafkaBroker
from stream_fm.worker import Worker


def client_under_test() -> str:
    """The client this test runs on: the ``kafka_client`` fixture sets it for the modules that
    run on both, through the same variable a worker reads."""
    return os.environ.get("STREAM_FM_KAFKA_CLIENT", "kafka-python")


def worker_settings(
    broker: KafkaBroker, checkpoint_dir: Path, topics: dict[str, Any], **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "bootstrap_servers": broker.bootstrap_servers,
        "kafka_client": client_under_test(),
        "group_id": f"test-{uuid.uuid4().hex[:8]}",
        "input_topics": topics["input"],
        "predictions_topic": topics["predictions"],
        "dead_letter_topic": topics["dead_letters"],
        "labels_topic": topics.get("labels", ""),
        "checkpoint_dir": str(checkpoint_dir),
        "metrics_port": 0,
        "hash_bits": 16,
        "k": 4,
        "poll_timeout_ms": 100,
        "produce_timeout_s": 10.0,
    }
    values.update(overrides)
    return build_settings(values)


class WorkerThread:
    """Runs ``Worker.run`` in a thread; ``stop()`` drains it like SIGTERM would."""

    def __init__(self, settings: Settings) -> None:
        self.worker = Worker(settings)
        self.error: BaseException | None = None
        self.exit_code: int | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.exit_code = self.worker.run()
        except BaseException as error:
            self.error = error

    def __enter__(self) -> WorkerThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.worker.stop()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the worker did not stop"

    def wait_for(self, condition: Callable[[Worker], bool], timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.error is not None:
                raise AssertionError(f"the worker failed: {self.error!r}") from self.error
            if condition(self.worker):
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout_s}s; totals={dict(self.worker.totals)}")


def produce(
    broker: KafkaBroker,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
    partition: int | None = None,
) -> int:
    n = 0
    with EventProducer(broker.bootstrap_servers) as producer:
        for key, value in records:
            producer.send(topic, key, value, partition=partition)
            n += 1
        producer.flush(30)
    return n


def consume_all(
    broker: KafkaBroker, topic: str, at_least: int, timeout_s: float = 60.0, settle_s: float = 1.0
) -> list[Any]:
    """Every record of ``topic`` from the start: waits for ``at_least``, then ``settle_s`` more."""
    deadline = time.monotonic() + timeout_s
    with TopicReader(broker.bootstrap_servers) as reader:
        while True:
            if reader.total(topic) >= at_least or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        time.sleep(settle_s)
        return reader.read(topic, timeout_s=timeout_s)
