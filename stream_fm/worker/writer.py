"""Checkpoints written beside the loop: the loop pauses only for a consistent in-memory copy.

``CheckpointWriter`` runs one ``CheckpointStore.save`` at a time on its own thread
(serialization, checksum, write, fsync, rename, fsync of the directory) and hands the outcome
back when the loop asks; the loop commits the offsets only then, so nothing past a durable
checkpoint is ever committed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_fm.checkpoint import CheckpointStore
from stream_fm.errors import CheckpointError


@dataclass(frozen=True, slots=True)
class Written:
    """A finished save: its file, or the error; how long it took."""

    tag: Any
    path: Path | None
    error: CheckpointError | None
    seconds: float


class CheckpointWriter:
    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._thread: threading.Thread | None = None
        self._done: Written | None = None

    @property
    def busy(self) -> bool:
        """A save was started and its outcome not yet taken."""
        return self._thread is not None

    def start(self, tree: Callable[[], dict[str, Any]], tag: Any) -> None:
        """Build the tree (``tree()``: the encoding of captured state) and save it beside the
        loop; ``tag`` comes back with the outcome."""
        if self._thread is not None:
            raise RuntimeError("a checkpoint is being written already")
        self._done = None
        self._thread = threading.Thread(
            target=self._save, args=(tree, tag), name="stream-fm-checkpoint", daemon=True
        )
        self._thread.start()

    def _save(self, tree: Callable[[], dict[str, Any]], tag: Any) -> None:
        started = time.perf_counter()
        try:
            path = self.store.save(tree())
        except CheckpointError as error:
            self._done = Written(tag, None, error, time.perf_counter() - started)
            return
        except Exception as error:  # a bug must not vanish with the thread: it fails the save
            failure = CheckpointError(f"checkpoint not written: {error!r}")
            self._done = Written(tag, None, failure, time.perf_counter() - started)
            return
        self._done = Written(tag, path, None, time.perf_counter() - started)

    def take(self, wait: bool = False) -> Written | None:
        """The outcome of the save in flight once it finished (``wait``: wait for it)."""
        thread = self._thread
        if thread is None:
            return None
        if wait:
            thread.join()
        elif thread.is_alive():
            return None
        self._thread = None
        return self._done
