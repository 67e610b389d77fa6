"""README's first command: the demo brings up Kafka, the simulator and the worker, and stops them."""

from __future__ import annotations

import re
import socket
import subprocess
import sys


def test_demo_runs_prints_progress_and_stops_every_child() -> None:
    demo = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_fm",
            "demo",
            "--duration-s",
            "30",
            "--metrics-port",
            "0",
            "--rate",
            "3000",
        ],
        capture_output=True,
        timeout=300,
        text=True,
    )
    output = demo.stdout + demo.stderr
    assert demo.returncode == 0, output[-4000:]
    progress = [line for line in demo.stdout.splitlines() if line.startswith("t=")]
    assert len(progress) >= 4, output[-4000:]
    learned = [
        int(m.group(1).replace(",", ""))
        for m in (re.search(r"learned=([\d,]+)", line) for line in progress)
        if m
    ]
    assert learned[-1] > 0, "the worker learned from joined labels"
    assert re.search(r"logloss=\d+\.\d+", progress[-1]), progress[-1]
    assert "worker stopped" in demo.stdout
    assert "demo: stopped the worker, the simulator and Kafka" in demo.stdout
    # The demo's own broker is gone: nothing listens on its port any more.
    port = re.search(r"on 127\.0\.0\.1:(\d+)", demo.stdout)
    assert port is not None, demo.stdout[:2000]
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", int(port.group(1)))) != 0, (
            "the demo left Kafka running"
        )
