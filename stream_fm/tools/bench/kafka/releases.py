"""kafka-python releases side by side: each one's bare ceiling over the same topic.

Each release is installed with pip into the work directory and put first on ``PYTHONPATH``
of a child process that runs ``stream_fm/tools/kafka_python_ceiling.py`` on the worker's
client settings. The installed release runs through the same script, so every row is
measured the same way, one after the other, on one broker. A release may be named twice (an
A-B-A-B order shows the machine's drift).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from stream_fm.config import build_settings
from stream_fm.errors import StreamFMError
from stream_fm.kafka.settings import consumer_config, producer_config
from stream_fm.tools.bench.kafka.options import STALL_TIMEOUT_S, Say
from stream_fm.tools.bench.kafka.results import ReleaseCeiling
from stream_fm.tools.broker import KafkaBroker

# Run by path from a directory with no ``kafka`` package in it (the script's directory
# comes first on sys.path, and bench/ holds bench/kafka/).
CEILING_SCRIPT = Path(__file__).resolve().parents[2] / "kafka_python_ceiling.py"
#: A release whose loop grows past this stops (kafka-python 3.0.0 once grew to 23 GB).
RSS_LIMIT_MB = 4096
INSTALLED = "installed"


def install_release(version: str, work: Path) -> Path:
    """``kafka-python==version`` in a directory of its own (pip, from the package index)."""
    target = work / f"kafka-python-{version}"
    if not (target / "kafka").is_dir():
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
        command += ["--target", str(target), f"kafka-python=={version}"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise StreamFMError(f"bench kafka: pip could not install kafka-python=={version}: "
                                f"{done.stderr.strip()[-500:]}")  # fmt: skip
    return target


def measure_release(
    broker: KafkaBroker, requested: str, input_topic: str, expected: int, work: Path
) -> ReleaseCeiling:
    """One release's bare loop over ``input_topic`` from the beginning, in a child process."""
    output = f"bench-ceiling-kafka-python-{uuid.uuid4().hex[:8]}"
    broker.create_topics([output])
    settings = build_settings(
        {
            "bootstrap_servers": broker.bootstrap_servers,
            "group_id": f"bench-release-{uuid.uuid4().hex[:8]}",
            "client_id": "stream-fm-bench-release",
        }
    )
    job: dict[str, Any] = {
        "consumer": consumer_config(settings),
        "producer": producer_config(settings),
        "topic": input_topic,
        "output": output,
        "expected": expected,
        "poll_timeout_ms": settings.poll_timeout_ms,
        "max_poll_records": settings.max_poll_records,
        "rss_limit_mb": RSS_LIMIT_MB,
        "stall_timeout_s": STALL_TIMEOUT_S,
    }
    env = dict(os.environ)
    if requested != INSTALLED:
        env["PYTHONPATH"] = str(install_release(requested, work))
    done = subprocess.run(
        [sys.executable, str(CEILING_SCRIPT), json.dumps(job)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise StreamFMError(f"bench kafka: the kafka-python {requested} loop failed: "
                            f"{done.stderr.strip()[-1500:]}")  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return ReleaseCeiling(requested=requested, **result)


def measure_releases(
    broker: KafkaBroker,
    versions: tuple[str, ...],
    input_topic: str,
    expected: int,
    work: Path,
    say: Say,
) -> list[ReleaseCeiling]:
    """The installed release, then each of ``versions`` in the order given."""
    rows = []
    for requested in (INSTALLED, *versions):
        say(f"bench kafka: bare loop on kafka-python {requested} (child process) ...")
        row = measure_release(broker, requested, input_topic, expected, work)
        note = f" (stopped: {row.stopped})" if row.stopped else ""
        say(f"bench kafka: kafka-python {row.version} {row.events_per_s:,.0f} events/s, "
            f"peak RSS {row.peak_rss_mb:,.0f} MB{note}")  # fmt: skip
        rows.append(row)
    return rows
