"""The report as the text table ``stream-fm bench kafka`` prints."""

from __future__ import annotations

import math

from stream_fm.tools.bench.kafka.options import EXACT_LATENCY_MEASURES, LATENCY_MEASURES
from stream_fm.tools.bench.kafka.results import KafkaBenchReport, ScaleOutResult, ScaleOutWorker


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
    p, c, cp, w = report.preload, report.ceiling, report.ceiling_flush_every_poll, report.worker
    lines.append(
        f"stream-fm bench kafka - Apache Kafka {report.kafka_version} on {report.bootstrap_servers}, "
        f"{report.options['partitions']} partitions"
    )
    if p is not None:
        lines.append(
            f"input: {p.records:,} records ({p.impressions:,} impressions, {p.clicks:,} clicks, 20 fields, "
            f"{p.bytes / max(p.records, 1):.0f} B each); preloaded at {p.records_per_s:,.0f}/s"
        )
    lines.append("")
    lines.append(f"{'throughput':<52} {'events/s':>10} {'seconds':>9}")
    if c is not None:
        lines.append(
            f"{'ceiling: bare consume + produce, flush at end':<52} {_f(c.events_per_s):>10} {c.seconds:>9.2f}"
        )
    if cp is not None:
        lines.append(
            f"{'ceiling: same, flush after every poll':<52} {_f(cp.events_per_s):>10} {cp.seconds:>9.2f}"
        )
    if w is not None:
        lines.append(
            f"{'worker (steady state, from first batch)':<52} {_f(w.events_per_s):>10} {w.steady_seconds:>9.2f}"
        )
        lines.append(
            f"{'worker (incl. start-up ' + format(w.startup_s, '.1f') + ' s)':<52} "
            f"{_f(w.events_per_s_with_startup):>10} {w.startup_s + w.steady_seconds:>9.2f}"
        )
    lines.append(f"{'ratio worker / ceiling':<52} {_f(report.ratio_worker_to_ceiling, '.3f'):>10}")
    if cp is not None and w is not None and cp.events_per_s > 0:
        lines.append(
            f"{'ratio worker / ceiling flushing every poll':<52} {w.events_per_s / cp.events_per_s:>10.3f}"
        )
    if w is not None:
        lines.append(
            f"worker processed {w.records:,} records ({w.invalid:,} invalid), {w.predictions:,} "
            f"predictions, {w.checkpoints} checkpoints; rate counted from {w.count_at_first:,} records; "
            f"exit code after SIGTERM: {w.exit_code}{' (profiled with py-spy)' if w.profiled else ''}"
        )
    if report.scale_out is not None:
        lines += _format_scale_out(report.scale_out)
    if report.latency:
        lines.append("")
        lines.append(f"latency: {LATENCY_MEASURES}")
        lines.append(
            "(histogram quantiles interpolated inside the buckets 1, 2.5, 5, 10, 25, 50, 100, 250 ms ...: "
            "a quantile in the 100-250 ms bucket only says 'between 100 and 250'; "
            "exact = " + EXACT_LATENCY_MEASURES + ")"
        )
        lines.append(
            f"{'offered/s':>10} {'achieved/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
            f"{'mean ms':>8} {'exact p50/p99/p99.9/max':>23} {'batch p50/p99 ms':>17} "
            f"{'backlog':>8} {'drain s':>8} {'lag':>5} {'kept up':>8}"
        )
        for r in report.latency:
            lines.append(
                f"{r.offered_per_s:>10,.0f} {_f(r.achieved_offered_per_s):>10} {_f(r.p50_ms, '.1f'):>8} "
                f"{_f(r.p99_ms, '.1f'):>8} {_f(r.p999_ms, '.1f'):>9} {_f(r.mean_ms, '.1f'):>8} "
                f"{'/'.join(_f(v, '.0f') for v in (r.exact_p50_ms, r.exact_p99_ms, r.exact_p999_ms, r.exact_max_ms)):>23} "
                f"{_f(r.batch_p50_ms, '.1f') + ' / ' + _f(r.batch_p99_ms, '.1f'):>17} "
                f"{r.backlog_at_producer_end:>8,} {r.drain_s:>8.2f} {_f(r.final_consumer_lag, '.0f'):>5} "
                f"{'yes' if r.kept_up else 'NO':>8}"
            )
        lines.append(
            f"(window: after a {report.options['latency_warmup_s']:g} s warm-up until drained; "
            "batch = one batch's poll-to-publish time (stream_fm_batch_seconds); "
            "backlog = records not yet processed when the producer finished; kept up = backlog "
            "<= 1 s of offered traffic; lag = the worker's stream_fm_consumer_lag after the drain)"
        )
    if w is not None:
        lines.append("")
        lines.append(
            f"memory (worker VmRSS): start {w.rss_start_mib:,.0f} MiB (after {w.count_at_first:,} records), "
            f"1M {_f(w.rss_1m_mib, ',.0f', ' MiB')}, end {w.rss_end_mib:,.0f} MiB; "
            f"peak (VmHWM) {w.rss_peak_mib:,.0f} MiB"
        )
        lines.append(
            "RSS by records processed: "
            + ", ".join(f"{x.events:,}: {x.rss_mib:,.0f}" for x in w.rss)
            + " (MiB)"
        )
        lines.append(f"pending impressions: end {w.pending_end:,}, max {w.pending_max:,}")
    return "\n".join(lines)
