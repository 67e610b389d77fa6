"""The scale-out phase: one worker against two in one group over the same topic."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from stream_fm.errors import StreamFMError
from stream_fm.tools.bench.kafka.data import Watermarks, _topics, preload, read_timestamps
from stream_fm.tools.bench.kafka.metrics import Scrape
from stream_fm.tools.bench.kafka.options import (
    LAG_REFRESH_WAIT_S,
    STALL_TIMEOUT_S,
    START_TIMEOUT_S,
    KafkaBenchOptions,
    Say,
)
from stream_fm.tools.bench.kafka.processes import WorkerProcess
from stream_fm.tools.bench.kafka.results import (
    PreloadResult,
    ScaleOutResult,
    ScaleOutRun,
    ScaleOutWorker,
)
from stream_fm.tools.broker import KafkaBroker

LAG_CONFIRM_S = 2 * LAG_REFRESH_WAIT_S  # how long a run waits for its lag series after the counts


@dataclass(frozen=True, slots=True)
class _Window:
    first_s: float  # the first processed batch of any worker was seen
    counts_at_first: list[int]
    own_first_s: list[float | None]  # each worker's own first batch
    ended_s: float
    last: list[Scrape]  # each worker's final scrape
    on_broker: int  # high watermarks of the predictions topic at the end
    ended_by: str
    both_busy: tuple[float, int] | None  # (seconds, records) while every worker was busy


def _all_consumed(scrapes: Sequence[Scrape], topic: str, partitions: int) -> bool:
    """Every partition of ``topic`` in some worker's lag series, and all of them at 0."""
    lags = [(p, lag) for s in scrapes for (t, p), lag in s.lags.items() if t == topic]
    return {p for p, _ in lags} == set(range(partitions)) and all(lag == 0 for _, lag in lags)


def _both_busy(
    samples: Sequence[tuple[float, list[int], int]], final: Sequence[int]
) -> tuple[float, int] | None:
    """(seconds, records) from the first scrape at which every worker had processed something
    to the first at which one of them had processed all it would: the shared stretch, without
    the start (one worker alone until the rebalance) and the tail (one worker left)."""
    start = next((x for x in samples if all(c > 0 for c in x[1])), None)
    end = next((x for x in samples if any(c >= f for c, f in zip(x[1], final, strict=True))), None)
    if start is None or end is None or end[0] <= start[0]:
        return None
    return end[0] - start[0], sum(end[1]) - sum(start[1])


def _watch_group(
    workers: Sequence[WorkerProcess],
    watermarks: Watermarks,
    topic: str,
    partitions: int,
    expected: int,
    impressions: int,
    options: KafkaBenchOptions,
    say: Say,
    label: str,
) -> _Window:
    """Scrape ``workers`` (one group over ``topic``) until the input is processed.

    Done ("counts") when the processed total is exactly the input and the predictions topic
    holds exactly one record per impression, as many as the workers counted; otherwise
    (records re-processed, or some never processed) done ("lag") when every partition is seen
    at lag 0 in the workers' lag series and the predictions topic holds every prediction the
    workers counted; failing that ("timeout"), ``LAG_CONFIRM_S`` after the counts reached the
    input and stopped moving. The end is then the first scrape at which the processed total
    and the watermarks had reached their final values, so waiting for the lag series (5 s
    refresh) does not lengthen the window.
    """
    started = min(w.started for w in workers)
    last: list[Scrape | None] = [None] * len(workers)
    own_first: list[float | None] = [None] * len(workers)
    first: tuple[float, list[int]] | None = None
    samples: list[tuple[float, list[int], int]] = []  # (time, processed by each, watermarks)
    changed = (time.monotonic(), -1, -1)  # last time the (processed, watermarks) pair moved
    report_every_s, last_report = 10.0, time.monotonic()
    while True:
        time.sleep(options.poll_interval_s)
        for i, worker in enumerate(workers):
            s = worker.scrape()
            if s is not None:
                last[i] = s
        now = time.monotonic()
        scrapes = [s for s in last if s is not None]
        if len(scrapes) < len(workers):
            if now - started > START_TIMEOUT_S:
                raise StreamFMError(f"bench kafka: {label}: a worker's /metrics never answered")
            continue
        counts = [s.processed for s in scrapes]
        total = sum(counts)
        for i, count in enumerate(counts):
            if own_first[i] is None and count > 0:
                own_first[i] = now
        if first is None:
            if total == 0:
                if now - started > START_TIMEOUT_S:
                    raise StreamFMError(
                        f"bench kafka: {label}: nothing processed after {START_TIMEOUT_S:.0f}s:\n"
                        + "\n".join(w.log_tail(5) for w in workers)
                    )
                continue
            first = (now, counts)
        on_broker = watermarks.total()
        samples.append((now, counts, on_broker))
        if (total, on_broker) != changed[1:]:
            changed = (now, total, on_broker)
        predicted = sum(round(s.get("stream_fm_predictions_total")) for s in scrapes)
        reached = total >= expected and on_broker >= impressions
        if total == expected and on_broker == predicted == impressions:
            ended_by = "counts"
            break
        if _all_consumed(scrapes, topic, partitions) and on_broker >= predicted:
            ended_by = "lag"
            break
        if reached and now - changed[0] > LAG_CONFIRM_S:
            ended_by = "timeout"
            break
        if not reached and now - changed[0] > STALL_TIMEOUT_S:
            raise StreamFMError(
                f"bench kafka: {label}: stalled at {total:,} of {expected:,} records, "
                f"{on_broker:,} of {impressions:,} predictions:\n"
                + "\n".join(w.log_tail(5) for w in workers)
            )
        if now - last_report >= report_every_s:
            last_report = now
            rate = (total - sum(first[1])) / max(now - first[0], 1e-9)
            say(
                f"bench kafka: {label}: {total:,}/{expected:,} records "
                f"({' + '.join(f'{c:,}' for c in counts)}), {rate:,.0f}/s"
            )
    assert first is not None
    final_counts, final_on_broker = samples[-1][1], samples[-1][2]
    ended = next(
        t
        for t, c, b in samples
        if b >= final_on_broker and all(x >= f for x, f in zip(c, final_counts, strict=True))
    )
    return _Window(
        first_s=first[0],
        counts_at_first=first[1],
        own_first_s=own_first,
        ended_s=ended,
        last=scrapes,
        on_broker=final_on_broker,
        ended_by=ended_by,
        both_busy=_both_busy(samples, final_counts) if len(workers) > 1 else None,
    )


def _await_partitions(
    workers: Sequence[WorkerProcess], topic: str, partitions: int
) -> list[list[int]]:
    """Each worker's partitions of ``topic``, from its lag series (refreshed every 5 s): waits
    up to ``LAG_REFRESH_WAIT_S`` for the series to cover every partition exactly once, after
    the measured window; else what they show then."""
    deadline = time.monotonic() + LAG_REFRESH_WAIT_S
    while True:
        scrapes = [w.scrape() for w in workers]
        owned = [
            sorted(p for t, p in s.lags if t == topic) if s is not None else [] for s in scrapes
        ]
        flat = [p for ps in owned for p in ps]
        if sorted(flat) == list(range(partitions)) or time.monotonic() > deadline:
            return owned
        time.sleep(0.25)


def _scale_out_run(
    bootstrap_servers: str,
    topics: dict[str, str],
    names: Sequence[str],
    inputs: PreloadResult,
    impression_keys: set[bytes],
    work: Path,
    options: KafkaBenchOptions,
    say: Say,
    label: str,
) -> ScaleOutRun:
    """``len(names)`` workers started together in one fresh group sharing one checkpoint dir."""
    group_id = f"bench-{label}-{uuid.uuid4().hex[:8]}"
    checkpoints = work / f"{label}-checkpoints"
    workers: list[WorkerProcess] = []
    watermarks = Watermarks(bootstrap_servers, topics["predictions"])
    try:
        for name in names:
            workers.append(
                WorkerProcess(
                    bootstrap_servers,
                    topics,
                    work,
                    f"{label}-{name}" if len(names) > 1 else label,
                    options.attribution_window_s,
                    group_id=group_id,
                    checkpoint_dir=checkpoints,
                    kafka_client=options.load_client,
                )
            )
        window = _watch_group(
            workers,
            watermarks,
            topics["input"],
            options.scale_out_partitions,
            inputs.records,
            inputs.impressions,
            options,
            say,
            label,
        )
        owned = _await_partitions(workers, topics["input"], options.scale_out_partitions)
    finally:
        watermarks.close()
        for worker in workers:
            worker.terminate()
        exit_codes = [worker.stop() for worker in workers]
    seconds = window.ended_s - window.first_s
    predicted = read_timestamps(bootstrap_servers, topics["predictions"], window.on_broker)
    missing = len(impression_keys - predicted.keys())
    results = []
    for i, (name, worker) in enumerate(zip(names, workers, strict=True)):
        s = window.last[i]
        counted = s.processed - window.counts_at_first[i]
        own_first = window.own_first_s[i]
        results.append(
            ScaleOutWorker(
                name=name,
                records=s.processed,
                counted=counted,
                events_per_s=counted / seconds if seconds > 0 else math.nan,
                predictions=round(s.get("stream_fm_predictions_total")),
                checkpoints=round(s.get("stream_fm_checkpoints_total")),
                startup_s=own_first - worker.started if own_first is not None else None,
                partitions=owned[i],
                exit_code=exit_codes[i],
                summary=worker.summary(),
            )
        )
    counted = sum(w.counted for w in results)
    busy = window.both_busy
    return ScaleOutRun(
        workers=results,
        group_id=group_id,
        records=sum(w.records for w in results),
        counted=counted,
        count_at_first=sum(window.counts_at_first),
        seconds=seconds,
        events_per_s=counted / seconds if seconds > 0 else math.nan,
        predictions_on_broker=window.on_broker,
        impressions_without_prediction=missing,
        ended_by=window.ended_by,
        both_busy_seconds=busy[0] if busy is not None else None,
        both_busy_events_per_s=busy[1] / busy[0] if busy is not None else None,
    )


def measure_scale_out(
    broker: KafkaBroker, run_id: str, work: Path, options: KafkaBenchOptions, say: Say
) -> ScaleOutResult:
    """One worker over a topic, then two workers in one group over the same topic."""
    bootstrap = broker.bootstrap_servers
    n = options.scale_out_partitions
    input_topic = _topics(run_id, "scale-out", False)["input"]
    runs = {
        label: {**_topics(run_id, label, options.labels), "input": input_topic}
        for label in ("scale-out-1", "scale-out-2")
    }
    outputs = [t for topics in runs.values() for name, t in topics.items() if name != "input"]
    broker.create_topics([input_topic, *outputs], partitions=n)
    say(
        f"bench kafka: scale-out: preloading {options.scale_out_events:,} simulated records "
        f"into {input_topic} ({n} partitions) ..."
    )
    impression_keys: set[bytes] = set()
    events = replace(options, events=options.scale_out_events)
    inputs = preload(bootstrap, input_topic, events, impression_keys)
    if len(impression_keys) != inputs.impressions:
        raise StreamFMError(
            f"bench kafka: scale-out: {len(impression_keys):,} distinct impression ids in "
            f"{inputs.impressions:,} impressions"
        )
    say(f"bench kafka: scale-out: one worker over {inputs.records:,} records ...")
    single = _scale_out_run(
        bootstrap, runs["scale-out-1"], ["single"], inputs, impression_keys, work, options, say,
        "scale-out-1",
    )  # fmt: skip
    say(f"bench kafka: scale-out: one worker {single.events_per_s:,.0f} events/s")
    say("bench kafka: scale-out: two workers in one group, started together ...")
    pair = _scale_out_run(
        bootstrap, runs["scale-out-2"], ["a", "b"], inputs, impression_keys, work, options, say,
        "scale-out-2",
    )  # fmt: skip
    say(
        f"bench kafka: scale-out: two workers {pair.events_per_s:,.0f} events/s together "
        f"({' + '.join(f'{w.events_per_s:,.0f}' for w in pair.workers)}), "
        f"{pair.records:,} records processed for {inputs.records:,} input"
    )
    return ScaleOutResult(
        input_topic=input_topic,
        partitions=n,
        input_records=inputs.records,
        impressions=inputs.impressions,
        preload_records_per_s=inputs.records_per_s,
        single=single,
        pair=pair,
        ratio_pair_to_single=(
            pair.events_per_s / single.events_per_s if single.events_per_s > 0 else None
        ),
    )


# --- the run -------------------------------------------------------------------------------
