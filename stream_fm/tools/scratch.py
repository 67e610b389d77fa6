"""Scratch directories of the tools: a new temp dir whose bulk is removed when the tool ends.

A demo or a benchmark writes checkpoints of hundreds of MB. Left in /tmp run after run, they
fill a machine's disk; the logs, a few kB, stay for the post-mortem.

>>> with scratch_dir(None, "stream-fm-doc-", bulk=("checkpoints",)) as work:
...     (work / "checkpoints").mkdir()
...     _ = (work / "worker.log").write_text("kept")
>>> sorted(p.name for p in work.iterdir())
['worker.log']
>>> shutil.rmtree(work)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_dir(given: Path | None, prefix: str, bulk: Sequence[str]) -> Iterator[Path]:
    """``given`` as it is (the user keeps all of it), or a new temp dir minus ``bulk`` at exit.

    ``bulk`` are glob patterns of directories under it (e.g. ``"*-checkpoints"``).
    """
    work = given or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if given is None:
            remove_bulk(work, bulk)


def remove_bulk(work: Path, bulk: Sequence[str]) -> None:
    """Delete the directories matching ``bulk`` under ``work``; files (the logs) stay."""
    for pattern in bulk:
        for path in work.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)  # best effort, like pytest's cleanup
