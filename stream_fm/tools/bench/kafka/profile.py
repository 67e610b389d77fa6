"""Where the worker's main thread spends its time, from py-spy's raw (collapsed) stacks.

Each sample of the main thread goes to the first part of the worker it finds walking its
stack from the root (so a poll inside a commit counts as the commit), or to "other":

>>> stacks = [
...     "thread (1): MainThread;Worker.run (loop.py:1);Worker.step (loop.py:2);"
...     "KafkaPythonIO.poll (kafka_python.py:3) 3",
...     "thread (1): MainThread;Worker.run (loop.py:1);Worker.step (loop.py:2);"
...     "Pipeline.decode (pipeline.py:4) 1",
...     "thread (2): kafka-io;NetworkSelector.run (selector.py:5) 9",
... ]
>>> [(part, round(share, 2)) for part, share in main_thread_shares(stacks)]
[('client: poll', 0.75), ('decode (scan, features)', 0.25)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Final

#: (part, frame-name prefixes), in the order they are looked for within one frame.
PARTS: Final = (
    (
        "checkpoint (snapshot, settle, commit)",
        ("Recovery.begin_checkpoint", "Recovery.settle", "Recovery.checkpoint"),
    ),
    ("client: poll", ("KafkaPythonIO.poll", "ConfluentIO.poll")),
    ("client: send", ("KafkaPythonIO.send", "ConfluentIO.send", "ConfluentIO._produce")),
    ("client: commit", ("KafkaPythonIO.commit", "ConfluentIO.commit")),
    ("client: flush", ("KafkaPythonIO.flush", "ConfluentIO.flush")),
    ("decode (scan, features)", ("Pipeline.decode",)),
    ("join, engine, evaluation", ("Pipeline._run",)),
    ("prediction records", ("prediction_records",)),
    ("apply log", ("Recovery.applied_batch",)),
    ("metrics", ("Observer.",)),
)
OTHER: Final = "other"


def _part(frames: list[str]) -> str:
    for frame in frames:
        name = frame.split(" (", 1)[0]
        for part, prefixes in PARTS:
            if name.startswith(prefixes):
                return part
    return OTHER


def main_thread_shares(lines: Iterable[str]) -> list[tuple[str, float]]:
    """Share of the main thread's samples per part, largest first."""
    counts: Counter[str] = Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        if not count.isdigit() or "MainThread" not in frames[0]:
            continue
        counts[_part(frames[1:])] += int(count)
    total = sum(counts.values())
    return [(part, n / total) for part, n in counts.most_common()] if total else []


def profile_file(requested: Path, worker: str) -> Path:
    """The file of one worker's profile: the requested name with the worker's in it, so the
    runs of one bench (clients, the secured run) do not write over each other."""
    return requested.with_name(f"{requested.stem}-{worker}{requested.suffix}")


def profile_summary(path: Path) -> str:
    """One line for the report: the main thread's time by part (raw stacks only)."""
    if path.suffix in (".svg", ".json"):
        return f"py-spy profile in {path}"
    if not path.exists():
        return f"py-spy wrote no profile ({path} is missing; see py-spy.log)"
    with path.open(encoding="utf-8", errors="replace") as lines:
        shares = main_thread_shares(lines)
    if not shares:
        return f"py-spy: no main-thread samples in {path}"
    parts = ", ".join(f"{part} {share:.1%}" for part, share in shares)
    return f"py-spy ({path.name}), the main thread's wall time: {parts}"
