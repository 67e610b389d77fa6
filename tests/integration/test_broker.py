"""The Apache Kafka launcher: start, two independent clients, restart keeps data, clean stop."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from stream_fm.errors import BrokerStartError
from stream_fm.kafka.admin import EventProducer, TopicReader
from stream_fm.tools.broker import DOCKER_ALTERNATIVE, KafkaBroker, find_java, kafka_classpath

UniqueTopic = Callable[..., str]  # the `unique_topic` fixture of conftest.py

pytestmark = pytest.mark.integration

KCAT = shutil.which("kcat") or "/usr/bin/kcat"


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    with EventProducer(bootstrap) as producer:
        for key, value in records:
            producer.send_and_wait(topic, key, value)


def consume_all(bootstrap: str, topic: str, expected: int) -> list[tuple[bytes, bytes]]:
    """Read a topic from the beginning (no group) until `expected` records or 30 s."""
    deadline = time.monotonic() + 30
    with TopicReader(bootstrap) as reader:
        while reader.total(topic) < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return [(r.key or b"", r.value or b"") for r in reader.read(topic)]


def test_broker_answers(kafka_broker: KafkaBroker) -> None:
    assert kafka_broker.is_running()
    assert kafka_broker.kafka_version.startswith("4.")
    host, port = kafka_broker.bootstrap_servers.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with kafka_broker.admin() as admin:
        assert admin.live_brokers() == 1
    assert "Kafka Server started" in kafka_broker.log_tail(10_000)


def test_create_topics_is_idempotent(kafka_broker: KafkaBroker, unique_topic: UniqueTopic) -> None:
    name = unique_topic("idem", partitions=2)
    kafka_broker.create_topics([name], partitions=2)
    kafka_broker.create_topics([name, name])
    with TopicReader(kafka_broker.bootstrap_servers) as reader:
        assert reader.partitions(name) == [0, 1]


def test_kafka_python_round_trip(kafka_broker: KafkaBroker, unique_topic: UniqueTopic) -> None:
    topic = unique_topic("rt", partitions=3)
    records = [(f"imp-{i}".encode(), f'{{"i": {i}}}'.encode()) for i in range(50)]
    produce(kafka_broker.bootstrap_servers, topic, records)
    got = consume_all(kafka_broker.bootstrap_servers, topic, len(records))
    assert sorted(got) == sorted(records)


def test_kcat_to_kafka_python(kafka_broker: KafkaBroker, unique_topic: UniqueTopic) -> None:
    topic = unique_topic("kcat-in", partitions=1)
    lines = "".join(f"k{i}:v{i}\n" for i in range(5))
    subprocess.run(
        [KCAT, "-b", kafka_broker.bootstrap_servers, "-P", "-t", topic, "-K:"],
        input=lines.encode(),
        check=True,
        timeout=60,
        capture_output=True,
    )
    got = consume_all(kafka_broker.bootstrap_servers, topic, 5)
    assert got == [(f"k{i}".encode(), f"v{i}".encode()) for i in range(5)]


def test_kafka_python_to_kcat(kafka_broker: KafkaBroker, unique_topic: UniqueTopic) -> None:
    topic = unique_topic("kcat-out", partitions=1)
    produce(kafka_broker.bootstrap_servers, topic, [(b"imp-1", b'{"p": 0.5}'), (b"imp-2", b"x")])
    out = subprocess.run(
        [KCAT, "-b", kafka_broker.bootstrap_servers, "-C", "-t", topic,
         "-o", "beginning", "-e", "-q", "-f", "%k=%s\\n"],
        check=True,
        timeout=60,
        capture_output=True,
    )  # fmt: skip
    assert out.stdout.decode().splitlines() == ['imp-1={"p": 0.5}', "imp-2=x"]


def _alive_in_group(pgid: int) -> list[str]:
    """Command lines of live (non-zombie) processes in process group `pgid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Fields after the ")" closing the command name: state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            found.append(cmdline)
    return found


def test_restart_keeps_data_and_stop_leaves_no_jvm(tmp_path: Path) -> None:
    broker = KafkaBroker(data_dir=tmp_path / "kafka", partitions=1)
    try:
        broker.start()
        port, cport = broker.port, broker.controller_port
        broker.create_topics(["durable"])
        produce(broker.bootstrap_servers, "durable", [(b"before", b"restart")])
        old_pid = broker.pid

        broker.restart()
        assert (broker.port, broker.controller_port) == (port, cport)
        assert broker.pid != old_pid and broker.is_running()
        produce(broker.bootstrap_servers, "durable", [(b"after", b"restart")])
        got = consume_all(broker.bootstrap_servers, "durable", 2)
        assert got == [(b"before", b"restart"), (b"after", b"restart")]

        pid = broker.pid
        assert pid is not None and old_pid is not None
        broker.stop()
        assert not broker.is_running()
        # The broker runs in its own process group (= its pid); nothing of either run is left.
        for gone in (old_pid, pid):
            assert _alive_in_group(gone) == []
            with pytest.raises(ProcessLookupError):
                os.kill(gone, 0)
    finally:
        broker.close()
    # A kept data_dir survives close().
    assert (tmp_path / "kafka" / "kafka-data" / "meta.properties").is_file()


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        broker = KafkaBroker(data_dir=tmp_path, port=busy)
        with pytest.raises(BrokerStartError, match=f"port 127.0.0.1:{busy} is already in use"):
            broker.start()
        broker.close()


def test_missing_java_names_the_docker_alternative(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(BrokerStartError) as err:
        find_java()
    message = str(err.value)
    assert "\n" not in message
    assert "Java 17+" in message and DOCKER_ALTERNATIVE in message


def test_missing_maven_names_the_docker_alternative(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("KAFKA_HOME", raising=False)
    with pytest.raises(BrokerStartError) as err:
        kafka_classpath(cache_dir=tmp_path)  # empty cache: Maven would be needed
    message = str(err.value)
    assert "\n" not in message
    assert "Maven (mvn) not found" in message and DOCKER_ALTERNATIVE in message


def test_kafka_home_installation_is_used(
    monkeypatch: pytest.MonkeyPatch, kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    # The session broker's jars are laid out like an installation's libs/ directory.
    libs = Path(kafka_classpath().rstrip("*"))
    monkeypatch.setenv("KAFKA_HOME", str(libs.parent))
    assert kafka_classpath(cache_dir=tmp_path) == str(libs / "*")
    monkeypatch.setenv("KAFKA_HOME", str(tmp_path))
    with pytest.raises(BrokerStartError, match="not an Apache Kafka installation"):
        kafka_classpath()
