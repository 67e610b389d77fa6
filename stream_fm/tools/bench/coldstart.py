"""``stream-fm bench coldstart``: what a fresh machine's first replay costs against a steady one.

A fresh machine has an empty numba cache. Each step runs as its own process, as a user runs
it, with ``NUMBA_CACHE_DIR`` set to a new empty directory:

1. ``replay`` on the empty cache: what a first run costs when nothing compiled ahead;
2. ``compile`` on another empty cache (what ``make install`` and the Dockerfile run), then
   ``replay`` twice on it: the first run after install, and a steady run.

Reported: wall seconds of each process, the replay reports' ``compile_seconds`` and steady
``examples_per_second``, and the ratio first run / steady run (issue 22's target: <= 1.5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from stream_fm.errors import StreamFMError


@dataclass(frozen=True, slots=True)
class Run:
    """One process: its wall seconds and, for a replay, its report's figures."""

    wall_s: float
    compile_s: float = 0.0
    stream_s: float = 0.0
    examples_per_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ColdStart:
    events: int
    uncompiled_first: Run  # replay on an empty cache
    install: Run  # stream-fm compile on an empty cache
    first: Run  # the first replay after install
    steady: Run  # the replay after that

    @property
    def first_over_steady(self) -> float:
        return self.first.wall_s / self.steady.wall_s

    @property
    def uncompiled_over_steady(self) -> float:
        return self.uncompiled_first.wall_s / self.steady.wall_s

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "first_over_steady": self.first_over_steady,
            "uncompiled_over_steady": self.uncompiled_over_steady,
        }


def _process(command: list[str], cache: Path, report: Path | None = None) -> Run:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise StreamFMError(f"bench coldstart: {' '.join(command)} failed: {done.stderr[-2000:]}")
    if report is None:
        return Run(wall_s)
    figures = json.loads(report.read_text())
    return Run(
        wall_s, figures["compile_seconds"], figures["seconds"], figures["examples_per_second"]
    )


def measure(path: Path, events: int, work: Path) -> ColdStart:
    """The four processes on ``path`` (a JSONL file of ``events`` records)."""
    cli = [sys.executable, "-m", "stream_fm"]
    report = work / "report.json"
    replay = [*cli, "replay", str(path), "--format", "jsonl", "--no-progress"]
    replay += ["--report", str(report)]
    uncompiled = _process(replay, work / "cache-empty", report)
    install = _process([*cli, "compile"], work / "cache-installed")
    first = _process(replay, work / "cache-installed", report)
    steady = _process(replay, work / "cache-installed", report)
    return ColdStart(events, uncompiled, install, first, steady)


def format_coldstart(result: ColdStart) -> str:
    def row(name: str, run: Run) -> str:
        figures = (
            f"compile {run.compile_s:6.2f} s, stream {run.stream_s:6.2f} s "
            f"({run.examples_per_s:,.0f} examples/s)"
            if run.stream_s
            else ""
        )
        return f"  {name:<34} {run.wall_s:7.2f} s  {figures}"

    return "\n".join(
        [
            f"cold start: {result.events:,} simulated events, each step its own process "
            "(wall seconds)",
            row("replay, empty numba cache", result.uncompiled_first),
            row("stream-fm compile (install time)", result.install),
            row("first replay after install", result.first),
            row("steady replay", result.steady),
            f"  first run after install / steady: {result.first_over_steady:.2f}x "
            f"(target <= 1.5x); with nothing compiled ahead: "
            f"{result.uncompiled_over_steady:.2f}x",
        ]
    )


def main_coldstart(impressions: int, json_path: Path | None) -> int:
    from stream_fm.tools.simulate import SimulationParams, write_jsonl

    with tempfile.TemporaryDirectory(prefix="stream-fm-coldstart-") as tmp:
        work = Path(tmp)
        data = work / "stream.jsonl"
        events = write_jsonl(SimulationParams(n_impressions=impressions), data)
        result = measure(data, events, work)
    print(format_coldstart(result), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(result.as_dict(), indent=2))
    return 0
