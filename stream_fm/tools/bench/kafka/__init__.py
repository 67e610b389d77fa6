"""``stream-fm bench kafka``: the worker against the bare clients, on a real broker (see ``run``)."""

from __future__ import annotations

from stream_fm.tools.bench.kafka.options import KafkaBenchOptions
from stream_fm.tools.bench.kafka.report import format_report
from stream_fm.tools.bench.kafka.run import main_kafka_bench, run_kafka_bench

__all__ = ["KafkaBenchOptions", "format_report", "main_kafka_bench", "run_kafka_bench"]
