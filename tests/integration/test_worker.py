"""The worker end to end against the real Apache Kafka broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from stream_fm.checkpoint import CheckpointStore
from stream_fm.kafka.admin import commit_offsets
from stream_fm.tools.broker import KafkaBroker
from stream_fm.tools.demo import scrape
from stream_fm.tools.process import free_ports
from stream_fm.tools.simulate import SimulationParams, Simulator
from tests.integration.conftest import UniqueTopic
from tests.integration.kafka_helpers import WorkerThread, consume_all, produce, worker_settings

pytestmark = pytest.mark.usefixtures("kafka_client")

WINDOW_S = 60.0


def _topics(unique_topic: UniqueTopic, partitions: int = 2) -> dict[str, Any]:
    return {
        "input": (unique_topic("events", partitions=partitions),),
        "predictions": unique_topic("predictions", partitions=partitions),
        "dead_letters": unique_topic("dlq", partitions=1),
        "labels": unique_topic("labels", partitions=1),
    }


def _simulated(n: int, seed: int = 11) -> tuple[list[dict[str, Any]], Any]:
    params = SimulationParams(
        n_impressions=n, n_fields=10, max_cardinality=2000, impressions_per_s=50, attribution_window_s=WINDOW_S,
        click_delay_median_s=5, long_tail_mean_s=600, seed=seed,
    )  # fmt: skip
    traffic = Simulator(params).generate()
    return list(traffic.events()), traffic.stats


def _as_records(events: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(e["id"].encode(), orjson.dumps(e)) for e in events]


def _sentinels(broker: KafkaBroker, topic: str, partitions: int, ts_ms: int) -> None:
    """One impression per partition far enough ahead to close every simulated window."""
    for p in range(partitions):
        event = {"type": "impression", "id": f"sentinel-{p}", "ts": ts_ms, "features": {"f00": "x"}}
        produce(broker, topic, [(event["id"].encode(), orjson.dumps(event))], partition=p)


def test_end_to_end_every_impression_predicted_once_and_labels_match_ground_truth(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    topics = _topics(unique_topic)
    events, stats = _simulated(4000)
    produce(kafka_broker, topics["input"][0], _as_records(events))
    last_ts = max(e["ts"] for e in events)
    _sentinels(kafka_broker, topics["input"][0], 2, last_ts + int(WINDOW_S * 1000) * 100)
    settings = worker_settings(
        kafka_broker, tmp_path / "ckpt", topics, attribution_window_s=WINDOW_S
    )
    n_events = len(events) + 2
    with WorkerThread(settings) as running:
        running.wait_for(lambda w: w.totals["events"] >= n_events)
        running.wait_for(lambda w: w.pipeline.evaluator.examples >= stats.impressions)
        worker = running.worker
        assert worker.server is not None
        metrics = scrape(f"{worker.server.url}/metrics")
        registry = worker.registry
        learned_pos = registry.get_sample_value("stream_fm_examples_learned_total", {"label": "1"})
        learned_neg = registry.get_sample_value("stream_fm_examples_learned_total", {"label": "0"})
    predictions = consume_all(kafka_broker, topics["predictions"], at_least=stats.impressions + 2)
    per_id = Counter(r.key.decode() for r in predictions)
    assert len(per_id) == stats.impressions + 2
    assert set(per_id.values()) == {1}, "every impression id gets exactly one prediction"
    sample = orjson.loads(predictions[0].value)
    assert set(sample) == {"id", "p_click", "ts", "model_version"} and 0 < sample["p_click"] < 1
    # Learned labels equal the simulator's ground truth: clicks inside the window.
    assert learned_pos == stats.positives
    assert learned_neg == stats.impressions - stats.positives
    # ... and /metrics, served over HTTP, says the same.
    assert metrics["stream_fm_predictions_total"] == stats.impressions + 2
    assert metrics["stream_fm_examples_learned_total"] == stats.impressions
    assert metrics["stream_fm_events_total"] == n_events
    assert metrics["stream_fm_late_clicks_total"] == stats.clicks_beyond_window
    assert metrics["stream_fm_pending_impressions"] == 2
    labels = consume_all(kafka_broker, topics["labels"], at_least=stats.impressions)
    assert len(labels) == stats.impressions
    assert sum(orjson.loads(r.value)["label"] for r in labels) == stats.positives


def test_kcat_produces_and_reads_back_predictions(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    topics = _topics(unique_topic, partitions=1)
    lines = [
        orjson.dumps(
            {
                "type": "impression",
                "id": f"kc-{i}",
                "ts": 1_700_000_000_000 + i,
                "features": {"site": f"s{i % 3}", "bid": 0.5},
            }
        )
        for i in range(20)
    ]
    kcat = subprocess.run(
        ["kcat", "-b", kafka_broker.bootstrap_servers, "-P", "-t", topics["input"][0], "-K", "\t"],
        input=b"\n".join(f"kc-{i}".encode() + b"\t" + line for i, line in enumerate(lines)) + b"\n",
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert kcat.returncode == 0
    settings = worker_settings(kafka_broker, tmp_path / "ckpt", topics)
    with WorkerThread(settings) as running:
        running.wait_for(lambda w: w.totals["predictions"] >= 20)
    read = subprocess.run(
        [
            "kcat",
            "-b",
            kafka_broker.bootstrap_servers,
            "-C",
            "-t",
            topics["predictions"],
            "-o",
            "beginning",
            "-e",
            "-f",
            "%k\t%s\n",
        ],
        capture_output=True,
        timeout=60,
        check=True,
    )
    rows = [line.split("\t", 1) for line in read.stdout.decode().splitlines() if line]
    assert sorted(key for key, _ in rows) == sorted(f"kc-{i}" for i in range(20))
    assert all(orjson.loads(value)["id"] == key for key, value in rows)


MALFORMED = {
    "not_json": b"{this is not json",
    "not_utf8": b'{"type":"click","id":"\xff","ts":1}',
    "empty": b"",
    "not_object": b"[1, 2, 3]",
    "missing_type": b'{"id":"x","ts":1}',
    "unknown_type": b'{"type":"view","id":"x","ts":1}',
    "missing_id": b'{"type":"click","ts":1}',
    "bad_ts": b'{"type":"click","id":"x","ts":"yesterday"}',
    "missing_features": b'{"type":"impression","id":"x","ts":1}',
    "nested_feature": b'{"type":"impression","id":"x","ts":1,"features":{"geo":{"c":"x"}}}',
    "non_finite_number": b'{"type":"impression","id":"x","ts":1,"features":{"bid":NaN}}',
    "bad_label": b'{"type":"labeled","id":"x","ts":1,"label":7,"features":{}}',
    "too_large": b'{"type":"click","id":"x","ts":1,"pad":"' + b"p" * 5000 + b'"}',
}


def test_malformed_records_go_to_the_dead_letter_topic_once_each(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    topics = _topics(unique_topic, partitions=1)
    records: list[tuple[bytes | None, bytes]] = []
    for i, (reason, raw) in enumerate(MALFORMED.items()):
        good = {
            "type": "impression",
            "id": f"good-{i}",
            "ts": 1_700_000_000_000 + i,
            "features": {"site": "s"},
        }
        records.append((f"good-{i}".encode(), orjson.dumps(good)))
        records.append((reason.encode(), raw))
    produce(kafka_broker, topics["input"][0], records)
    settings = worker_settings(kafka_broker, tmp_path / "ckpt", topics, max_event_bytes=4096)
    with WorkerThread(settings) as running:
        running.wait_for(lambda w: w.totals["events"] >= len(records))
        registry = running.worker.registry
        for reason in MALFORMED:
            assert (
                registry.get_sample_value("stream_fm_invalid_events_total", {"reason": reason}) == 1
            ), reason
    dead = consume_all(kafka_broker, topics["dead_letters"], at_least=len(MALFORMED))
    assert len(dead) == len(MALFORMED)
    by_reason = {dict(r.headers)["reason"].decode(): r for r in dead}
    assert set(by_reason) == set(MALFORMED)
    for reason, record in by_reason.items():
        headers = dict(record.headers)
        assert record.value == MALFORMED[reason], "the original bytes are kept"
        assert headers["source_topic"].decode() == topics["input"][0]
        assert headers["source_partition"] == b"0"
        assert int(headers["source_offset"]) == 2 * list(MALFORMED).index(reason) + 1
    predictions = consume_all(kafka_broker, topics["predictions"], at_least=len(MALFORMED))
    assert sorted(r.key.decode() for r in predictions) == sorted(
        f"good-{i}" for i in range(len(MALFORMED))
    )


_STARTED: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_stray_workers() -> Iterator[None]:
    """A failing test must not leave a worker process behind."""
    yield
    while _STARTED:
        process = _STARTED.pop()
        if process.poll() is None:
            process.kill()
            process.wait()


def _start_worker_process(
    settings_env: dict[str, str], log_path: Path, *flags: str
) -> subprocess.Popen[bytes]:
    env = dict(os.environ) | settings_env
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_fm", "run", *flags],
        env=env,
        stdout=log_path.open("ab"),
        stderr=subprocess.STDOUT,
    )
    _STARTED.append(process)
    return process


def _env(
    broker: KafkaBroker, topics: dict[str, Any], checkpoint_dir: Path, group: str, metrics_port: int
) -> dict[str, str]:
    return {
        "STREAM_FM_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "STREAM_FM_GROUP_ID": group,
        "STREAM_FM_INPUT_TOPICS": topics["input"][0],
        "STREAM_FM_PREDICTIONS_TOPIC": topics["predictions"],
        "STREAM_FM_DEAD_LETTER_TOPIC": topics["dead_letters"],
        "STREAM_FM_CHECKPOINT_DIR": str(checkpoint_dir),
        "STREAM_FM_METRICS_PORT": str(metrics_port),
        "STREAM_FM_HASH_BITS": "16",
        "STREAM_FM_K": "4",
        "STREAM_FM_ATTRIBUTION_WINDOW_S": str(WINDOW_S),
        "STREAM_FM_POLL_TIMEOUT_MS": "100",
        "STREAM_FM_CHECKPOINT_INTERVAL_S": "3600",
    }


def _wait_metric(
    port: int, name: str, at_least: float, process: subprocess.Popen[bytes], timeout_s: float = 90.0
) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, float] = {}
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the worker exited with {process.returncode}"
        try:
            last = scrape(f"http://127.0.0.1:{port}/metrics")
            if last.get(name, 0) >= at_least:
                return last
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{name} did not reach {at_least}: {last.get(name)}")


def _arrays_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, np.ndarray):
            assert value.dtype == b[key].dtype and value.tobytes() == b[key].tobytes(), key
        else:
            assert value == b[key], key


def test_sigterm_checkpoints_and_a_restart_resumes_exactly(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    topics = _topics(unique_topic)
    events, stats = _simulated(3000, seed=5)
    half = len(events) // 2
    produce(kafka_broker, topics["input"][0], _as_records(events[:half]))
    port = free_ports()[0]
    # A group of its own: a member another client left behind must not delay this one's join.
    group = f"sigterm-{topics['input'][0]}"
    env = _env(kafka_broker, topics, tmp_path / "ckpt", group, port)
    log = tmp_path / "worker.log"

    first = _start_worker_process(env, log)
    _wait_metric(port, "stream_fm_events_total", half, first)
    first.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert first.wait(timeout=30) == 0, log.read_text()
    assert time.monotonic() - started < 15, "SIGTERM must drain and exit within seconds"
    assert "worker stopped" in log.read_text()
    store = CheckpointStore(tmp_path / "ckpt")
    saved = store.load_latest()
    assert saved is not None
    saved_state = saved[0]
    assert sum(saved_state["offsets"].values()) == half

    # Restart with no new input: the state it checkpoints on SIGTERM equals the one it loaded.
    second = _start_worker_process(env, log)
    ready_deadline = time.monotonic() + 60
    while time.monotonic() < ready_deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    else:
        pytest.fail("the restarted worker never became ready:\n" + log.read_text()[-3000:])
    time.sleep(1.0)
    assert scrape(f"http://127.0.0.1:{port}/metrics")["stream_fm_events_total"] == 0, (
        "nothing is reprocessed"
    )
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    resaved = store.load_latest()
    assert resaved is not None
    _arrays_equal(saved_state["engine"], resaved[0]["engine"])
    assert resaved[0]["offsets"] == saved_state["offsets"]

    # The rest of the stream: every impression predicted exactly once across the restarts.
    produce(kafka_broker, topics["input"][0], _as_records(events[half:]))
    third = _start_worker_process(env, log)
    _wait_metric(port, "stream_fm_events_total", len(events) - half, third)
    third.send_signal(signal.SIGTERM)
    assert third.wait(timeout=30) == 0
    predictions = consume_all(kafka_broker, topics["predictions"], at_least=stats.impressions)
    per_id = Counter(r.key.decode() for r in predictions)
    assert len(per_id) == stats.impressions and set(per_id.values()) == {1}


def test_committed_offsets_without_checkpoint_are_refused_unless_cold_start(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    topics = _topics(unique_topic, partitions=1)
    group = f"refuse-{topics['input'][0]}"
    commit_offsets(kafka_broker.bootstrap_servers, group, {(topics["input"][0], 0): 0})
    port = free_ports()[0]
    env = _env(kafka_broker, topics, tmp_path / "empty-ckpt", group, port)
    log = tmp_path / "refused.log"
    refused = _start_worker_process(env, log)
    assert refused.wait(timeout=60) != 0
    assert "no checkpoint was found" in log.read_text() and "--cold-start" in log.read_text()

    cold = _start_worker_process(env, tmp_path / "cold.log", "--cold-start")
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and not ready:
            assert cold.poll() is None, (tmp_path / "cold.log").read_text()
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/readyz", timeout=1
                ) as response:
                    ready = response.status == 200
            except OSError:
                time.sleep(0.2)
        assert ready, "--cold-start proceeds to a ready worker"
    finally:
        cold.send_signal(signal.SIGTERM)
        assert cold.wait(timeout=30) == 0


def _impressions(prefix: str, n: int, ts0: int) -> list[tuple[bytes, bytes]]:
    return [
        (
            f"{prefix}-{i}".encode(),
            orjson.dumps(
                {
                    "type": "impression",
                    "id": f"{prefix}-{i}",
                    "ts": ts0 + i,
                    "features": {"s": str(i % 7)},
                }
            ),
        )
        for i in range(n)
    ]


def test_broker_restart_the_worker_waits_and_reconnects(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    # Last in this file: it takes the shared broker down for a few seconds.
    topics = _topics(unique_topic, partitions=1)
    produce(kafka_broker, topics["input"][0], _impressions("before", 200, 1_700_000_000_000))
    # A consumer that fetches nothing once the broker is back (kafka-python did, once, for
    # 120 s: issue 19) is replaced by the watchdog after 10 s.
    settings = worker_settings(
        kafka_broker, tmp_path / "ckpt", topics, produce_timeout_s=5.0, consumer_stall_timeout_s=10
    )
    with WorkerThread(settings) as running:
        running.wait_for(lambda w: w.totals["events"] >= 200)
        kafka_broker.stop()
        running.wait_for(lambda w: not w.ready()[0], timeout_s=20)
        time.sleep(3.0)
        assert running.error is None, "the worker must wait for the broker, not fail"
        kafka_broker.start()
        produce(kafka_broker, topics["input"][0], _impressions("after", 200, 1_700_000_001_000))
        running.wait_for(lambda w: w.totals["events"] >= 400, timeout_s=120)
        running.wait_for(lambda w: w.ready()[0], timeout_s=30)
    predictions = consume_all(kafka_broker, topics["predictions"], at_least=400)
    ids = {r.key.decode() for r in predictions}
    assert ids == {f"before-{i}" for i in range(200)} | {f"after-{i}" for i in range(200)}


def test_refused_updates_and_nonfinite_scores_reach_the_metrics(
    kafka_broker: KafkaBroker, unique_topic: UniqueTopic, tmp_path: Path
) -> None:
    """Numbers so large (identity transform) that the latent sums overflow: the score is not a
    number (served as 0.5) and the numeric guard refuses the update; both are counted."""
    topics = _topics(unique_topic, partitions=1)
    ts = 1_700_000_000_000
    huge = {"type": "impression", "ts": ts, "features": {"a": 1e200, "b": 1e200}}
    records = [(b"h%d" % i, orjson.dumps({**huge, "id": f"h{i}"})) for i in range(3)]
    records += [
        (b"h%d" % i, orjson.dumps({"type": "click", "id": f"h{i}", "ts": ts + 5})) for i in range(3)
    ]
    produce(kafka_broker, topics["input"][0], records)
    settings = worker_settings(
        kafka_broker, tmp_path / "ckpt", topics, numeric_transform="identity"
    )
    with WorkerThread(settings) as running:
        running.wait_for(lambda w: w.totals["learned"] >= 3)
        registry = running.worker.registry
        assert registry.get_sample_value("stream_fm_nonfinite_predictions_total") >= 3
        # fake_negative learns each impression twice: a negative at once, a positive on click.
        assert registry.get_sample_value("stream_fm_refused_updates_total") == 2 * 3
        weights = running.worker.engine.state()
    for name, array in weights.items():
        if isinstance(array, np.ndarray) and array.dtype.kind == "f":
            assert np.isfinite(array).all(), name
    predictions = consume_all(kafka_broker, topics["predictions"], at_least=3)
    assert {orjson.loads(r.value)["p_click"] for r in predictions} == {0.5}
