"""Fixtures for tests that talk to a real Apache Kafka broker (see stream_fm.tools.broker).

The broker is never skipped: if it cannot start, every integration test errors with the
reason and the broker's log tail, locally as on CI, so a broken setup cannot pass silently.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_fm.errors import BrokerStartError
from stream_fm.tools.broker import KafkaBroker
from tests.integration.oracle import FaultRig

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/integration needs the broker; mark it so `-m "not integration"`
    # gives the fast unit-test run.
    for item in items:
        if _HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    broker = KafkaBroker()
    try:
        broker.start()
    except BrokerStartError as exc:
        broker.close()
        pytest.fail(f"cannot start the Apache Kafka test broker: {exc}", pytrace=False)
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(params=["kafka-python", "confluent"])
def kafka_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once per Kafka client; modules use it with ``pytest.mark.usefixtures``.
    Set through the variable the worker reads, so child workers inherit it."""
    client = str(request.param)
    monkeypatch.setenv("STREAM_FM_KAFKA_CLIENT", client)
    return client


@pytest.fixture
def rig(kafka_broker: KafkaBroker, tmp_path: Path) -> Iterator[FaultRig]:
    """The fault suite's topics, group and directories, its workers stopped afterwards."""
    rig = FaultRig(kafka_broker, tmp_path)
    try:
        yield rig
    finally:
        rig.close()


UniqueTopic = Callable[..., str]


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest, kafka_broker: KafkaBroker) -> UniqueTopic:
    """Factory: ``unique_topic("clicks", partitions=2)`` -> a fresh, created topic name.

    ``create=False`` only returns the name (e.g. to test auto-creation by the code under test).
    """
    base = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name)[:80].strip("-.") or "test"

    def make(suffix: str = "t", *, partitions: int | None = None, create: bool = True) -> str:
        name = f"{base}-{suffix}-{uuid.uuid4().hex[:8]}"
        if create:
            kafka_broker.create_topics([name], partitions=partitions)
        return name

    return make
