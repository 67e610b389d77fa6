"""A bare kafka-python consume-and-produce loop, run as a script under any kafka-python release.

``stream-fm bench kafka --kafka-python-versions`` runs this file (by path, not as a module: it
imports nothing from stream_fm, whose Kafka package needs kafka-python 3) with each release
on ``PYTHONPATH``. The loop is ``stream_fm.kafka.bare``'s, on the client arguments the parent
computed from the worker's settings. It prints one JSON line; a loop whose peak resident
memory passes the limit stops and says so instead of exhausting the machine.

Arguments: a JSON document with ``consumer``, ``producer``, ``topic``, ``output``,
``expected``, ``poll_timeout_ms``, ``max_poll_records``, ``rss_limit_mb`` and
``stall_timeout_s``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

IMPRESSION_PREFIX = b'{"type":"impression"'
OUTPUT = b'{"id":"%s","p_click":0.5,"ts":0,"model_version":0}'


def peak_rss_mb() -> float:
    """VmHWM of this process, in MB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def guard_memory(limit_mb: float, progress: list[int]) -> None:
    """Ends the process when its peak RSS passes the limit, even inside a poll that never returns.

    kafka-python 3.0.0 grew to 19 GB inside ``poll`` without yielding a record, so the check
    cannot wait for the loop to come round.
    """
    while True:
        time.sleep(0.2)
        if peak_rss_mb() > limit_mb:
            stopped = f"peak RSS above {limit_mb:,} MB at {progress[0]:,} records"
            version = getattr(sys.modules.get("kafka"), "__version__", "")
            result = {
                "version": version,
                "consumed": progress[0],
                "produced": 0,
                "seconds": float("nan"),
                "events_per_s": float("nan"),
                "peak_rss_mb": peak_rss_mb(),
                "stopped": stopped,
            }
            print(json.dumps(result), flush=True)
            os._exit(0)


def run(job: dict[str, Any]) -> dict[str, Any]:
    import kafka
    from kafka import KafkaConsumer, KafkaProducer

    consumer = KafkaConsumer(**job["consumer"])
    producer = KafkaProducer(**job["producer"])
    output, expected = job["output"], job["expected"]
    consumed = produced = first_count = 0
    started = time.monotonic()
    first_s = last_progress = None
    stopped = ""
    progress = [0]
    threading.Thread(target=guard_memory, args=(job["rss_limit_mb"], progress), daemon=True).start()
    try:
        consumer.subscribe([job["topic"]])
        while consumed < expected:
            batches = consumer.poll(
                timeout_ms=job["poll_timeout_ms"], max_records=job["max_poll_records"]
            )
            now = time.monotonic()
            if not batches:
                if now - (last_progress or started) > job["stall_timeout_s"]:
                    stopped = f"stalled at {consumed:,} records"
                    break
                continue
            for records in batches.values():
                for r in records:
                    if r.value is not None and r.value.startswith(IMPRESSION_PREFIX):
                        producer.send(output, key=r.key, value=OUTPUT % r.key)
                        produced += 1
                consumed += len(records)
            progress[0] = consumed
            if first_s is None:
                first_s, first_count = now, consumed
            last_progress = now
        producer.flush()
    finally:
        producer.close(timeout=5)
        consumer.close()
    ended = time.monotonic()
    seconds = ended - first_s if first_s is not None else float("nan")
    return {
        "version": kafka.__version__,
        "consumed": consumed,
        "produced": produced,
        "seconds": seconds,
        "events_per_s": (consumed - first_count) / seconds if seconds > 0 else float("nan"),
        "peak_rss_mb": peak_rss_mb(),
        "stopped": stopped,
    }


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
