"""The report as the text table ``stream-fm bench kafka`` prints."""

from __future__ import annotations

import math

from stream_fm.tools.bench.kafka.options import EXACT_LATENCY_MEASURES, LATENCY_MEASURES
from stream_fm.tools.bench.kafka.results import (
    KafkaBenchReport,
    ReleaseCeiling,
    ScaleOutResult,
    ScaleOutWorker,
    SecuredRun,
    WorkerResult,
)


def _f(value: float | None, fmt: str = ",.0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:{fmt}}{unit}"


def _format_scale_out(so: ScaleOutResult) -> list[str]:
    single, pair = so.single, so.pair
    lines = [
        "",
        f"scale-out: {so.input_records:,} records ({so.impressions:,} impressions) in "
        f"{so.partitions} partitions; one worker in a group, then two started together in one "
        "group sharing one checkpoint directory (fresh output topics each)",
        f"{'':<24} {'events/s':>10} {'records':>10} {'seconds':>9} {'partitions':>11}",
    ]

    def row(label: str, rate: float, records: int, seconds: float, parts: str) -> None:
        lines.append(f"{label:<24} {_f(rate):>10} {records:>10,} {seconds:>9.2f} {parts:>11}")

    def parts(w: ScaleOutWorker) -> str:
        return f"{len(w.partitions)}: " + ",".join(map(str, w.partitions)) if w.partitions else "0"

    (s,) = single.workers
    row("1 worker", single.events_per_s, single.records, single.seconds, parts(s))
    for i, w in enumerate(pair.workers):
        label = f"2 workers: worker {w.name}" if i == 0 else f"{'':<11}worker {w.name}"
        row(label, w.events_per_s, w.records, pair.seconds, parts(w))
    row("2 workers: combined", pair.events_per_s, pair.records, pair.seconds, "")
    if pair.both_busy_seconds is not None and pair.both_busy_events_per_s is not None:
        busy = round(pair.both_busy_events_per_s * pair.both_busy_seconds)
        row("  while both were busy", pair.both_busy_events_per_s, busy, pair.both_busy_seconds, "")
    lines.append(f"{'ratio combined / 1 worker':<24} {_f(so.ratio_pair_to_single, '.3f'):>10}")
    lines.append(
        f"(events/s = {so.measures}; records = processed by the end, all of them; while both "
        "were busy = from the later worker's first batch until one of them had processed all "
        "it would)"
    )
    for name, run in (("1 worker", single), ("2 workers", pair)):
        extra = run.records - so.input_records
        note = (
            "exactly the input"
            if extra == 0
            else f"{extra:+,} vs the input ({'re-processed' if extra > 0 else 'NOT processed'})"
        )
        lines.append(
            f"{name}: records processed in total {run.records:,} of {so.input_records:,} input "
            f"({note}); predictions on the broker {run.predictions_on_broker:,} for "
            f"{so.impressions:,} impressions, {run.impressions_without_prediction:,} without one; "
            f"rate counted from {run.count_at_first:,} records; "
            f"end established by {run.ended_by}; "
            "start-up "
            + " / ".join(_f(w.startup_s, ".1f", " s") for w in run.workers)
            + "; exit codes after SIGTERM "
            + " / ".join(str(w.exit_code) for w in run.workers)
        )
    return lines


def format_report(report: KafkaBenchReport) -> str:
    lines: list[str] = []
    p = report.preload
    lines.append(
        f"stream-fm bench kafka - Apache Kafka {report.kafka_version} on {report.bootstrap_servers}, "
        f"{report.options['partitions']} partitions"
    )
    if p is not None:
        lines.append(
            f"input: {p.records:,} records ({p.impressions:,} impressions, {p.clicks:,} clicks, 20 fields, "
            f"{p.bytes / max(p.records, 1):.0f} B each); preloaded at {p.records_per_s:,.0f}/s"
        )
    if report.client_versions:
        lines.append("clients: " + ", ".join(f"{k} {v}" for k, v in report.client_versions.items()))
    lines += _throughput(report)
    if report.releases:
        lines += _releases(report.releases)
    if report.secured is not None:
        lines += _secured(report.secured)
    if report.scale_out is not None:
        lines += _format_scale_out(report.scale_out)
    if report.latency:
        lines += _latency(report)
    for run in report.clients:
        lines += _memory(run.worker)
    return "\n".join(lines)


def _releases(rows: list[ReleaseCeiling]) -> list[str]:
    base = rows[0].events_per_s
    lines = [
        "",
        "kafka-python releases: the bare loop (consume + produce, flush at end) on the worker's "
        "settings, each in a child process, one after the other over the same topic",
        f"{'release':<24} {'events/s':>10} {'/ installed':>12} {'peak RSS MB':>12}  note",
    ]
    for row in rows:
        label = f"{row.version}" + (" (installed)" if row.requested == "installed" else "")
        lines.append(
            f"{label:<24} {_f(row.events_per_s):>10} {_f(_ratio(row.events_per_s, base), '.3f'):>12}"
            f" {_f(row.peak_rss_mb):>12}  {row.stopped or f'{row.consumed:,} records'}"
        )
    return lines


def _secured(run: SecuredRun) -> list[str]:
    w = run.worker
    return [
        "",
        f"secured: the worker on {run.client} over {run.protocol} ({run.mechanism}, TLS), as a "
        f"user with only the ACLs it needs, same topic right after its PLAINTEXT run",
        f"{'worker on ' + run.protocol + ' (steady state)':<52}{_f(w.events_per_s):>14}",
        f"{'worker on PLAINTEXT (above)':<52}{_f(run.plaintext_events_per_s):>14}",
        f"{'ratio ' + run.protocol + ' / PLAINTEXT':<52}{_f(run.ratio_to_plaintext, '.3f'):>14}",
        f"({w.records:,} records, {w.predictions:,} predictions, exit code {w.exit_code})",
    ]


def _throughput(report: KafkaBenchReport) -> list[str]:
    runs = report.clients
    lines = ["", f"{'throughput (events/s)':<52}" + "".join(f"{r.client:>14}" for r in runs)]

    def row(label: str, values: list[str]) -> None:
        lines.append(f"{label:<52}" + "".join(f"{v:>14}" for v in values))

    row("ceiling: bare consume + produce, flush at end", [_f(r.ceiling.events_per_s) for r in runs])
    row(
        "ceiling: same, flush after every poll",
        [_f(r.ceiling_flush_every_poll.events_per_s) for r in runs],
    )
    row("worker (steady state, from first batch)", [_f(r.worker.events_per_s) for r in runs])
    row("worker incl. start-up", [_f(r.worker.events_per_s_with_startup) for r in runs])
    row("ratio worker / ceiling", [_f(r.ratio_worker_to_ceiling, ".3f") for r in runs])
    row(
        "ratio worker / ceiling flushing every poll",
        [_f(_ratio(r.worker.events_per_s, r.ceiling_flush_every_poll.events_per_s), ".3f")
         for r in runs],
    )  # fmt: skip
    q = report.quix
    if q is not None:
        lines.append(
            f"Quix Streams {q.quixstreams_version} application (JSON in, filter, JSON out, no "
            f"model; its defaults): {_f(q.events_per_s)} events/s over {q.seconds:.2f} s, "
            f"{q.records:,} records, {q.produced:,} produced, start-up {q.startup_s:.1f} s"
        )
        row("ratio worker / Quix Streams", [_f(_ratio(r.worker.events_per_s, q.events_per_s), ".3f")
                                            for r in runs])  # fmt: skip
    for r in runs:
        w = r.worker
        lines.append(
            f"worker on {r.client}: {w.records:,} records ({w.invalid:,} invalid), "
            f"{w.predictions:,} predictions, {w.checkpoints} checkpoints of "
            f"{w.checkpoint_bytes / 1e6:,.0f} MB (last written in {w.checkpoint_write_s:.2f} s "
            f"beside the loop; snapshot pause p99 {_f(w.checkpoint_pause_p99_ms, '.0f')} ms); "
            f"longest loop pause {_f(w.longest_pause_ms, '.0f')} ms; rate counted from "
            f"{w.count_at_first:,} records; start-up {w.startup_s:.1f} s; exit code after "
            f"SIGTERM: {w.exit_code}{' (profiled with py-spy)' if w.profile else ''}"
        )
        if w.profile:
            lines.append(w.profile)
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(b) and b > 0 else math.nan


def _latency(report: KafkaBenchReport) -> list[str]:
    lines = [
        "",
        f"latency: {LATENCY_MEASURES}",
        "(histogram quantiles interpolated inside the buckets 1, 2.5, 5, 10, 25, 50, 100, 250 ms ...: "
        "a quantile in the 100-250 ms bucket only says 'between 100 and 250'; "
        "exact = " + EXACT_LATENCY_MEASURES + ")",
        f"{'client':<13} {'offered/s':>9} {'achieved/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'p99.9 ms':>8} {'exact p50/p99/p99.9/max':>23} {'batch p50/p99':>14} "
        f"{'ckpts':>5} {'pause ms':>8} {'backlog':>8} {'drain s':>7} {'lag':>4} {'kept up':>7}",
    ]
    for r in report.latency:
        exact = "/".join(
            _f(v, ".0f") for v in (r.exact_p50_ms, r.exact_p99_ms, r.exact_p999_ms, r.exact_max_ms)
        )
        batch = _f(r.batch_p50_ms, ".1f") + "/" + _f(r.batch_p99_ms, ".1f")
        lines.append(
            f"{r.client:<13} {r.offered_per_s:>9,.0f} {_f(r.achieved_offered_per_s):>10} "
            f"{_f(r.p50_ms, '.1f'):>7} {_f(r.p99_ms, '.1f'):>7} {_f(r.p999_ms, '.1f'):>8} "
            f"{exact:>23} {batch:>14} {r.checkpoints:>5} {_f(r.longest_pause_ms, '.0f'):>8} "
            f"{r.backlog_at_producer_end:>8,} {r.drain_s:>7.2f} "
            f"{_f(r.final_consumer_lag, '.0f'):>4} {'yes' if r.kept_up else 'NO':>7}"
        )
    lines.append(
        f"(window: after a {report.options['latency_warmup_s']:g} s warm-up until drained; "
        "ckpts = checkpoints written inside it; pause = the worker's longest pause between two "
        "polls; batch = one batch's poll-to-publish time in ms (stream_fm_batch_seconds); "
        "backlog = records not yet processed when the producer finished; kept up = backlog "
        "<= 1 s of offered traffic; lag = the worker's stream_fm_consumer_lag after the drain)"
    )
    return lines


def _memory(w: WorkerResult) -> list[str]:
    return [
        "",
        f"memory of the worker on {w.client} (VmRSS): start {w.rss_start_mib:,.0f} MiB (after "
        f"{w.count_at_first:,} records), 1M {_f(w.rss_1m_mib, ',.0f', ' MiB')}, end "
        f"{w.rss_end_mib:,.0f} MiB; peak {w.rss_peak_mib:,.0f} MiB",
        "RSS by records processed: "
        + ", ".join(f"{x.events:,}: {x.rss_mib:,.0f}" for x in w.rss)
        + " (MiB)",
        f"pending impressions: end {w.pending_end:,}, max {w.pending_max:,}",
    ]
