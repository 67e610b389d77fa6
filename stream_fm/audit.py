"""The apply log: what the worker applied to its state, in order, for exact-state audits.

Off unless ``apply_log_path`` is set. One JSON object per line, appended with a single
``write`` on an ``O_APPEND`` descriptor: a line written is in the kernel's page cache, so it
survives a ``kill -9`` of the worker (not a power cut; that is what checkpoints are for). A
kill during a write longer than a page can leave the line torn (Linux stops copying at a page
boundary once the signal is pending); the next process starts on a fresh line, and readers
drop a torn line that the next process's ``start`` follows.

Events: ``start`` (a process began; ``writer`` names its checkpoint files), ``restore`` (the
model and accumulators were loaded from checkpoint ``path``), ``assign`` (a partition's
pending impressions came from ``path``, reading resumes at ``offset``), ``apply`` (a batch:
``records`` as ``[topic, partition, offset]`` in processing order), ``checkpoint`` (``path``
is durable and covers everything applied so far), ``rollback`` (the state is back at ``path``),
``revoke`` (``partitions`` left this worker).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "apply.jsonl")
>>> log = ApplyLog(path)
>>> log.write("apply", records=[["events", 0, 41], ["events", 0, 42]])
>>> log.close()
>>> read_apply_log(path)
[{'event': 'apply', 'records': [['events', 0, 41], ['events', 0, 42]]}]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson


class ApplyLog:
    """Appends audit events to a JSON-lines file (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._first = True

    def write(self, event: str, **fields: Any) -> None:
        line = orjson.dumps({"event": event, **fields}) + b"\n"
        if self._first:  # ends a line a killed predecessor left torn (an empty line if not)
            line, self._first = b"\n" + line, False
        os.write(self._fd, line)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_apply_log(path: str | Path) -> list[dict[str, Any]]:
    """All complete events of an apply log: a torn line, the one being written or the last
    of a process killed while writing it, is left out."""
    lines = [(number, line) for number, line in enumerate(Path(path).read_bytes().split(b"\n"), 1)]
    lines = [(number, line) for number, line in lines if line]
    events = []
    for i, (number, line) in enumerate(lines):
        try:
            events.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            last = i == len(lines) - 1
            if not last and not lines[i + 1][1].startswith(b'{"event":"start"'):
                raise ValueError(f"{path}:{number}: not a JSON line") from None
    return events
