"""The Kafka worker (``stream-fm run``): one consumer-group member.

- ``loop``: the loop itself (poll, pipeline, publish, observe, checkpoint);
- ``recovery``: checkpoints, restore, assignment, revocation, rollback, commits;
- ``snapshot``: the checkpoint's layout;
- ``publish``, ``observe``, ``health``, ``retry``: outputs, metrics, probes, back-off;
- ``watchdog``: a consumer that fetches nothing while behind the log end is replaced.
"""

from __future__ import annotations

import ctypes
import logging
import signal
from types import FrameType

from stream_fm.config import Settings
from stream_fm.worker.loop import Worker

__all__ = ["Worker", "run_worker"]

log = logging.getLogger("stream_fm.worker")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def pin_malloc_mmap_threshold(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation above ``threshold_bytes`` from its own mapping (glibc only).

    glibc raises its mmap threshold after freeing a large block, so the next blocks of that
    size (a checkpoint's 16 MiB copy of the linear weights, say) come from the heap, which
    fragments and never shrinks: resident memory then creeps up checkpoint after checkpoint.
    A fixed threshold keeps large temporaries in mappings that are returned when freed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


def run_worker(settings: Settings) -> int:
    """The ``stream-fm run`` entry point: signals drain the loop, then exit 0."""
    pin_malloc_mmap_threshold()
    logging.getLogger().setLevel(settings.log_level)
    if settings.log_level == "DEBUG":
        logging.getLogger("kafka").setLevel(logging.DEBUG)
    worker = Worker(settings)

    def drain(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: finishing the batch, then checkpoint and exit", signal.Signals(signum).name)
        worker.stop()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    return worker.run()
