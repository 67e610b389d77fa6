"""The throughput phases: the bare-client ceiling and the worker on the same topic."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from stream_fm.config import build_settings
from stream_fm.errors import StreamFMError
from stream_fm.kafka.bare import consume_and_produce
from stream_fm.tools.bench.kafka.data import Watermarks
from stream_fm.tools.bench.kafka.metrics import Scrape, histogram_quantile
from stream_fm.tools.bench.kafka.options import (
    STALL_TIMEOUT_S,
    START_TIMEOUT_S,
    KafkaBenchOptions,
    Say,
)
from stream_fm.tools.bench.kafka.processes import PySpy, WorkerProcess
from stream_fm.tools.bench.kafka.profile import profile_file, profile_summary
from stream_fm.tools.bench.kafka.results import CeilingResult, RssSample, WorkerResult


def measure_ceiling(
    bootstrap_servers: str,
    input_topic: str,
    output_topic: str,
    expected: int,
    flush: str,
    client: str = "kafka-python",
) -> CeilingResult:
    """Consume ``expected`` records from the beginning, produce one small record per impression,
    on the worker's own client settings (``stream_fm.kafka.bare``), nothing else."""
    settings = build_settings(
        {
            "bootstrap_servers": bootstrap_servers,
            "kafka_client": client,
            "group_id": f"bench-ceiling-{uuid.uuid4().hex[:8]}",
            "client_id": "stream-fm-bench-ceiling",
        }
    )
    run = consume_and_produce(
        settings,
        input_topic,
        output_topic,
        expected,
        flush_every_poll=flush == "every_poll",
        stall_timeout_s=STALL_TIMEOUT_S,
    )
    seconds = run.ended_s - run.first_s
    return CeilingResult(
        client=client,
        flush=flush,
        records=run.consumed,
        produced=run.produced,
        seconds=seconds,
        seconds_with_join=run.ended_s - run.started_s,
        counted_after_first_poll=run.first_count,
        events_per_s=(run.consumed - run.first_count) / seconds if seconds > 0 else math.nan,
    )


def _milestones(expected: int) -> list[int]:
    """Event counts at which to sample RSS: every tenth of the run, and 1M when it is passed."""
    marks = {max(1, expected * i // 10) for i in range(1, 11)}
    if expected >= 1_000_000:
        marks.add(1_000_000)
    return sorted(marks)


def measure_worker(
    bootstrap_servers: str,
    topics: dict[str, str],
    expected: int,
    expected_predictions: int,
    work: Path,
    options: KafkaBenchOptions,
    say: Say,
    client: str = "kafka-python",
    secured: Mapping[str, str] | None = None,
) -> WorkerResult:
    """``secured``: the worker connects as these STREAM_FM_* say (a SASL_SSL listener); the
    figures are still read on ``bootstrap_servers``."""
    env = dict(secured or {})
    worker = WorkerProcess(
        env.pop("STREAM_FM_BOOTSTRAP_SERVERS", bootstrap_servers),
        topics,
        work,
        f"throughput-{client}" + ("-secured" if secured else ""),
        options.attribution_window_s,
        kafka_client=client,
        extra_env=env,
    )
    profiler: PySpy | None = None
    profile_path: Path | None = None
    watermarks = Watermarks(bootstrap_servers, topics["predictions"])
    try:
        first: tuple[float, int] | None = None
        samples: list[RssSample] = []
        marks = _milestones(expected)
        pending_max = 0
        last: Scrape | None = None
        last_progress = (time.monotonic(), -1)
        report_every_s, last_report = 10.0, time.monotonic()
        while True:
            time.sleep(options.poll_interval_s)
            s = worker.scrape()
            now = time.monotonic()
            if s is None:
                if now - worker.started > START_TIMEOUT_S:
                    raise StreamFMError("bench kafka: the worker's /metrics never answered")
                continue
            last = s
            done = s.processed
            pending_max = max(pending_max, round(s.get("stream_fm_pending_impressions")))
            if done != last_progress[1]:
                last_progress = (now, done)
            elif now - last_progress[0] > (START_TIMEOUT_S if first is None else STALL_TIMEOUT_S):
                raise StreamFMError(
                    f"bench kafka: the worker stalled at {done:,} of {expected:,} records:\n"
                    + worker.log_tail()
                )
            if done > 0 and first is None:
                first = (now, done)
                samples.append(RssSample(done, 0.0, worker.rss_mib()))
                if options.py_spy is not None:
                    profile_path = profile_file(options.py_spy, worker.name)
                    profiler = PySpy(worker.pid, profile_path, work / "py-spy.log")
            if first is not None:
                while marks and marks[0] <= done:
                    marks.pop(0)
                    samples.append(RssSample(done, now - first[0], worker.rss_mib()))
                if now - last_report >= report_every_s:
                    last_report = now
                    rate = (done - first[1]) / max(now - first[0], 1e-9)
                    say(
                        f"bench kafka: worker ({client}) {done:,}/{expected:,} records, "
                        f"{rate:,.0f}/s, "
                        f"RSS {worker.rss_mib():,.0f} MiB"
                    )
            # The worker awaits acknowledgements only before a checkpoint: count what the
            # broker holds, not what the worker queued.
            if done >= expected and watermarks.total() >= expected_predictions:
                ended = now
                break
        assert first is not None and last is not None
        if profiler is not None:
            profiler.stop()
            profiler = None
        peak = worker.peak_mib()
    finally:
        if profiler is not None:
            profiler.stop()
        watermarks.close()
        exit_code = worker.stop()
    steady = ended - first[0]
    rss_1m = next((x.rss_mib for x in samples if x.events >= 1_000_000), None)
    # De-duplicate samples taken at the same scrape (several marks passed at once).
    unique: dict[int, RssSample] = {}
    for sample in samples:
        unique.setdefault(sample.events, sample)
    return WorkerResult(
        client=client,
        records=last.processed,
        invalid=round(last.get("stream_fm_invalid_events_total")),
        predictions=round(last.get("stream_fm_predictions_total")),
        startup_s=first[0] - worker.started,
        count_at_first=first[1],
        steady_seconds=steady,
        events_per_s=(last.processed - first[1]) / steady if steady > 0 else math.nan,
        events_per_s_with_startup=last.processed / (ended - worker.started),
        rss=list(unique.values()),
        rss_start_mib=samples[0].rss_mib,
        rss_1m_mib=rss_1m,
        rss_end_mib=samples[-1].rss_mib,
        # The kernel raises VmHWM lazily (not when madvise frees pages), so a sample may
        # exceed it by a page or so.
        rss_peak_mib=max(peak, *(x.rss_mib for x in samples)),
        pending_end=round(last.get("stream_fm_pending_impressions")),
        pending_max=pending_max,
        checkpoints=round(last.get("stream_fm_checkpoints_total")),
        checkpoint_bytes=round(last.get("stream_fm_checkpoint_bytes")),
        checkpoint_write_s=last.get("stream_fm_checkpoint_write_seconds"),
        checkpoint_pause_p99_ms=histogram_quantile(0.99, last.pause_buckets) * 1000,
        longest_pause_ms=last.get("stream_fm_loop_longest_pause_seconds") * 1000,
        exit_code=exit_code,
        summary=worker.summary(),
        profile=profile_summary(profile_path) if profile_path is not None else "",
    )
