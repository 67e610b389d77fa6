"""``stream-fm bench scale``: one group of N = 1, 2 and 4 real ``stream-fm run`` processes on
a real broker, with model sync on (and, for comparison, N workers without it: each its own
model, the group before issue 20), over the same log replayed as events.

Each run gets fresh topics (input with 8 partitions), starts its workers, waits until every
worker owns partitions, then produces the log (librdkafka when installed) at ``--rate``
events/s (0: at once, a backlog) and waits until every record was processed. Figures: the served log loss of every final label in
the labels topic (the p served for the impression before learning, whichever worker served
it), as a ratio to one worker; events per second from the first record produced to the last
processed; model-update bytes each worker published per second, and as a share of the input
bytes. The real logs' labeled rows become ``labeled`` events, TalkingData's rows impressions
and clicks at their real delays (``replay``'s readers, features as the files give them).
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import orjson
from prometheus_client.parser import text_string_to_metric_families

from stream_fm.errors import StreamFMError
from stream_fm.events import Click, Event, Impression, Labeled
from stream_fm.features import FeatureHasher
from stream_fm.kafka.admin import event_producer, read_topic
from stream_fm.replay import ROW_READERS
from stream_fm.tools.bench.kafka.processes import WorkerProcess
from stream_fm.tools.bench.model import STREAM_FILES, say
from stream_fm.tools.broker import KafkaBroker
from stream_fm.tools.simulate import SimulationParams, Simulator

PARTITIONS: Final = 8
STREAMS: Final = ("simulated", "talkingdata", "ipinyou", "criteo-10k", "avazu-9k")
#: Labeled rows carry a row number, not a time: they get one millisecond each from here.
BASE_TS_MS: Final = 1_732_406_400_000
SIMULATED_IMPRESSIONS: Final = 50_000
SIMULATED_WINDOW_S: Final = 60.0  # 10 impressions/s: the stream spans 80 windows
FILE_WINDOW_S: Final = 3600.0
READY_TIMEOUT_S: Final = 180.0
DONE_TIMEOUT_S: Final = 600.0


@dataclass
class ScaleRun:
    stream: str
    workers: int
    sync: bool
    examples: int  # final labels in the labels topic
    logloss: float  # served, over those labels
    records: int
    input_bytes: int
    seconds: float  # first record produced -> every record processed
    update_bytes: int  # model updates the workers published, all together

    @property
    def events_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else math.nan

    @property
    def update_bytes_per_s_per_worker(self) -> float:
        return self.update_bytes / self.seconds / self.workers if self.seconds > 0 else math.nan


def features_of(keys: Sequence[str], values: Sequence[float]) -> dict[str, Any]:
    """A reader's feature keys back as event features: ``field=value`` a string, else a
    number (the reader's hasher keeps numbers as they are: ``identity``)."""
    out: dict[str, Any] = {}
    for key, value in zip(keys, values, strict=True):
        name, eq, text = key.partition("=")
        out[name] = text if eq else value
    return out


def event_json(event: Event, prefix: str, ts_ms: int) -> tuple[bytes, bytes]:
    ident = prefix + event.id
    if type(event) is Click:
        body: dict[str, Any] = {"type": "click", "id": ident, "ts": ts_ms}
    elif type(event) is Impression:
        body = {"type": "impression", "id": ident, "ts": ts_ms}
        body["features"] = features_of(event.keys, event.values)
    else:
        assert type(event) is Labeled
        body = {"type": "labeled", "id": ident, "ts": ts_ms, "label": event.label}
        body["features"] = features_of(event.keys, event.values)
    return ident.encode(), orjson.dumps(body)


def log_records(name: str, data_dir: Path) -> tuple[list[tuple[bytes, bytes]], float]:
    """The stream's events as (key, value) records, and the attribution window they need."""
    if name == "simulated":
        params = SimulationParams(
            n_impressions=SIMULATED_IMPRESSIONS,
            attribution_window_s=SIMULATED_WINDOW_S,
            click_delay_median_s=5.0,
            long_tail_mean_s=30.0,
            seed=11,
        )
        events = Simulator(params).events()
        return [(e["id"].encode(), orjson.dumps(e)) for e in events], SIMULATED_WINDOW_S
    if name not in STREAM_FILES:
        known = ", ".join(("simulated", *STREAM_FILES))
        raise StreamFMError(f"bench scale: unknown stream {name!r}; choose from {known}")
    hasher = FeatureHasher(bits=20, numeric_transform="identity")
    records: list[tuple[bytes, bytes]] = []
    for number, (path, fmt) in enumerate(STREAM_FILES[name][1]):
        file = data_dir / path
        if not file.is_file():
            raise StreamFMError(f"bench scale: {file} not found (--data-dir names the data)")
        for event in ROW_READERS[fmt](file, hasher):
            labeled = type(event) is Labeled
            ts = BASE_TS_MS + len(records) if labeled else event.ts_ms
            records.append(event_json(event, f"{number}-", ts))
    return records, FILE_WINDOW_S


def published_update_bytes(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "stream_fm_model_update_bytes_total"
                and sample.labels.get("direction") == "published"
            ):
                return float(sample.value)
    return 0.0


def _owners(workers: Sequence[WorkerProcess]) -> list[set[int]]:
    owned = []
    for worker in workers:
        scraped = worker.scrape()
        owned.append({p for (_, p) in scraped.lags} if scraped is not None else set())
    return owned


def _wait(condition: Any, timeout_s: float, what: str, workers: Sequence[WorkerProcess]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(w.log_tail(10) for w in workers)
            raise StreamFMError(f"bench scale: no {what} after {timeout_s:.0f}s:\n{tails}")
        time.sleep(0.25)


def run_group(
    broker: KafkaBroker,
    records: list[tuple[bytes, bytes]],
    window_s: float,
    stream: str,
    workers: int,
    sync: bool,
    *,
    interval_ms: int,
    rate: float,
    kafka_client: str,
    work: Path,
) -> ScaleRun:
    run = uuid.uuid4().hex[:8]
    topics = {
        "input": f"scale-{run}-input",
        "predictions": f"scale-{run}-predictions",
        "dead_letters": f"scale-{run}-dlq",
        "labels": f"scale-{run}-labels",
    }
    broker.create_topics([topics["input"]], partitions=PARTITIONS)
    broker.create_topics([topics["predictions"], topics["dead_letters"], topics["labels"]])
    extra = {"STREAM_FM_LOG_LEVEL": "WARNING"}
    if sync:
        extra["STREAM_FM_MODEL_UPDATES_TOPIC"] = f"scale-{run}-model-updates"
        extra["STREAM_FM_MODEL_SYNC_INTERVAL_MS"] = str(interval_ms)
    procs = [
        WorkerProcess(
            broker.bootstrap_servers,
            topics,
            work,
            f"{stream}-{run}-{i}",
            window_s,
            group_id=f"scale-{run}",
            checkpoint_dir=work / f"{run}-checkpoints",
            kafka_client=kafka_client,
            extra_env=extra,
        )
        for i in range(workers)
    ]
    try:
        for proc in procs:
            proc.wait_ready(READY_TIMEOUT_S)

        def settled() -> bool:  # every partition owned, by every worker some
            owned = _owners(procs)
            return set().union(*owned) == set(range(PARTITIONS)) and all(owned)

        _wait(settled, READY_TIMEOUT_S, "group owning every partition", procs)
        started = time.monotonic()
        producer = event_producer(broker.bootstrap_servers, _load_client())
        try:
            for i, (key, value) in enumerate(records):
                producer.send(topics["input"], key, value)
                if rate and i % 100 == 0:  # the stream arrives at ``rate`` events/s
                    ahead_s = i / rate - (time.monotonic() - started)
                    if ahead_s > 0:
                        time.sleep(ahead_s)
            producer.flush(timeout_s=600)
        finally:
            producer.close()

        def processed() -> bool:
            scrapes = [p.scrape() for p in procs]
            return sum(s.processed for s in scrapes if s is not None) >= len(records)

        _wait(processed, DONE_TIMEOUT_S, "processing of every record", procs)
        seconds = time.monotonic() - started
        time.sleep(2 * interval_ms / 1000 if sync else 0)  # the last round's updates leave
        update_bytes = sum(published_update_bytes(p.url) for p in procs) if sync else 0.0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.stop()
        # A run's checkpoints (about 180 MB per file at the default 2^20 buckets) are not
        # needed after it: 25 runs would keep tens of GB.
        shutil.rmtree(work / f"{run}-checkpoints", ignore_errors=True)
    logloss, examples = served_logloss(broker.bootstrap_servers, topics["labels"])
    size = sum(len(v) for _, v in records)
    return ScaleRun(
        stream, workers, sync, examples, logloss, len(records), size, seconds, int(update_bytes)
    )


def _load_client() -> str:
    return "confluent" if importlib.util.find_spec("confluent_kafka") else "kafka-python"


def served_logloss(bootstrap_servers: str, topic: str) -> tuple[float, int]:
    """Log loss of the p served for each final label in the labels topic (one per id)."""
    seen: dict[str, tuple[float, int]] = {}
    for record in read_topic(bootstrap_servers, topic, timeout_s=120):
        body = orjson.loads(record.value or b"{}")
        seen.setdefault(str(body["id"]), (float(body["p_served"]), int(body["label"])))
    if not seen:
        return math.nan, 0
    total = 0.0
    for p, y in seen.values():
        p = min(max(p, 1e-15), 1 - 1e-15)
        total -= math.log(p) if y else math.log(1 - p)
    return total / len(seen), len(seen)


def format_runs(runs: Sequence[ScaleRun]) -> str:
    head = (
        f"{'stream':<12} {'N':>2} {'model':<12} {'labels':>7} {'log loss':>9} {'vs N=1':>7} "
        f"{'events/s':>9} {'vs N=1':>7} {'update B/s/worker':>18} {'of input':>8}"
    )
    lines = [head, "-" * len(head)]
    one = {r.stream: r for r in runs if r.workers == 1}
    for r in runs:
        base = one.get(r.stream)
        ratio = r.logloss / base.logloss if base else math.nan
        speed = r.events_per_s / base.events_per_s if base else math.nan
        share = r.update_bytes / r.input_bytes if r.input_bytes else math.nan
        model = "one (sync)" if r.sync else "independent"
        lines.append(
            f"{r.stream:<12} {r.workers:>2} {model:<12} {r.examples:>7,} {r.logloss:>9.5f} "
            f"{ratio:>7.4f} {r.events_per_s:>9,.0f} {speed:>7.2f} "
            f"{r.update_bytes_per_s_per_worker:>18,.0f} {share:>8.1%}"
        )
    lines.append(
        "served log loss of every final label (labels topic), vs one worker; events/s from the "
        "first record produced to the last processed; update bytes each worker published"
    )
    return "\n".join(lines)


def plan(workers: Sequence[int], independent: bool) -> Iterator[tuple[int, bool]]:
    for n in workers:
        yield n, True
        if independent and n > 1:
            yield n, False


def main_scale_bench(
    streams: Sequence[str],
    workers: Sequence[int],
    *,
    interval_ms: int,
    rate: float,
    independent: bool,
    kafka_client: str,
    data_dir: Path,
    work_dir: Path,
    json_path: Path | None = None,
) -> int:
    if 1 not in workers:
        raise StreamFMError("bench scale: --workers must include 1 (the reference)")
    runs: list[ScaleRun] = []
    work_dir.mkdir(parents=True, exist_ok=True)
    say("bench scale: starting Apache Kafka (KRaft) ...")
    with KafkaBroker(log_path=work_dir / "kafka.log", partitions=PARTITIONS) as broker:
        for stream in streams:
            records, window_s = log_records(stream, data_dir)
            for n, sync in plan(sorted(workers), independent):
                say(f"{stream}: {len(records):,} records, {n} worker(s), sync {sync}")
                runs.append(
                    run_group(
                        broker,
                        records,
                        window_s,
                        stream,
                        n,
                        sync,
                        interval_ms=interval_ms,
                        rate=rate,
                        kafka_client=kafka_client,
                        work=work_dir,
                    )
                )
                say(format_runs(runs[-1:]).splitlines()[2])
            print(format_runs([r for r in runs if r.stream == stream]), flush=True)
    if json_path:
        json_path.write_text(json.dumps([asdict(r) for r in runs], indent=2))
    return 0
