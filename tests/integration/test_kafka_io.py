"""The Kafka I/O package on the real broker: limits read from topics, refusals classified,
records no client can stall on, offsets committed and read back."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from stream_fm.config import Settings, build_settings
from stream_fm.errors import ProduceError
from stream_fm.kafka import connect
from stream_fm.kafka.admin import EventProducer, TopicReader, commit_offsets, committed_offsets
from stream_fm.kafka.settings import client_setting
from stream_fm.tools.broker import KafkaBroker
from tests.integration.conftest import UniqueTopic
from tests.integration.kafka_helpers import client_under_test

pytestmark = pytest.mark.usefixtures("kafka_client")


def _settings(broker: KafkaBroker, **values: object) -> Settings:
    return build_settings(
        {
            "bootstrap_servers": broker.bootstrap_servers,
            "kafka_client": client_under_test(),
            "group_id": f"io-{uuid.uuid4().hex[:8]}",
            "produce_timeout_s": 10.0,
            **values,
        }
    )


def test_record_limits_come_from_the_topics_and_the_producer(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic
) -> None:
    small = unique_topic("small", partitions=1)
    with kafka_broker.admin() as admin:
        admin.alter_topic_config(small, {"max.message.bytes": "200000"})
    default = unique_topic("default", partitions=1)
    io = connect(_settings(kafka_broker), [small, default])
    try:
        assert io.record_limit_bytes(small) == 200_000
        # The broker's default (1048588) is above the producer's own bound.
        assert io.record_limit_bytes(default) == client_setting("max_request_size_bytes")
        assert io.record_limit_bytes("not-read") == client_setting("max_request_size_bytes")
        io.record_rejected(small, 150_000)
        assert io.record_limit_bytes(small) < 150_000
    finally:
        io.close()


def test_a_record_the_topic_refuses_is_a_permanent_failure_with_its_size(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic
) -> None:
    topic = unique_topic("refusing", partitions=1)
    with kafka_broker.admin() as admin:
        admin.alter_topic_config(topic, {"max.message.bytes": "1000"})
    io = connect(_settings(kafka_broker), [])  # limits not read: the broker must say it
    try:
        io.send(topic, b"k", b"x" * 5000)
        with pytest.raises(ProduceError) as refused:
            io.flush()
        assert refused.value.permanent and refused.value.topic == topic
        assert refused.value.nbytes is not None and refused.value.nbytes >= 5000
        io.discard_unacknowledged()
        io.send(topic, b"k", b"fits")
        assert io.flush() == 1
    finally:
        io.close()


def test_header_keys_that_are_not_utf8_do_not_stall_the_partition(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic
) -> None:
    topic = unique_topic("raw-headers", partitions=1)
    for n, header in enumerate([b"ok=1", b"\xff\xfe=raw", b"ok=2"]):
        done = subprocess.run(
            [
                "kcat",
                "-b",
                kafka_broker.bootstrap_servers,
                "-P",
                "-t",
                topic,
                "-k",
                f"k{n}",
                "-H",
                header,
            ],
            input=b"value\n",
            capture_output=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
    settings = _settings(kafka_broker, poll_timeout_ms=200)
    io = connect(settings)
    try:
        got = []
        io.subscribe([topic], lambda _: None, lambda _: None)
        deadline = time.monotonic() + 30
        while len(got) < 3 and time.monotonic() < deadline:
            got += io.poll(500, 100)
        assert [r.offset for r in got] == [0, 1, 2]
    finally:
        io.close()
    with TopicReader(kafka_broker.bootstrap_servers) as reader:
        (_, raw, _) = reader.read(topic)
    # The key's bytes survive: read leniently, given back unchanged when encoded.
    assert [(k.encode(), v) for k, v in raw.headers] == [(b"\xff\xfe", b"raw")]


def test_offsets_committed_for_a_group_are_read_back(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic
) -> None:
    topic = unique_topic("offsets", partitions=2)
    with EventProducer(kafka_broker.bootstrap_servers) as producer:
        for n in range(10):
            producer.send(topic, b"k%d" % n, b"v", partition=n % 2)
        producer.flush()
    group = f"g-{uuid.uuid4().hex[:8]}"
    assert committed_offsets(kafka_broker.bootstrap_servers, group, topic) == {
        f"{topic}:0": None,
        f"{topic}:1": None,
    }
    commit_offsets(kafka_broker.bootstrap_servers, group, {(topic, 0): 3, (topic, 1): 5})
    assert committed_offsets(kafka_broker.bootstrap_servers, group, topic) == {
        f"{topic}:0": 3,
        f"{topic}:1": 5,
    }
    with TopicReader(kafka_broker.bootstrap_servers) as reader:
        assert reader.end_offsets(topic) == {f"{topic}:0": 5, f"{topic}:1": 5}
        assert reader.total(topic) == 10
