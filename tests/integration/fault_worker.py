"""`stream-fm run` with a test-only fault: SIGKILL itself at a checkpoint step.

Settings come from STREAM_FM_* as for `stream-fm run`. ``FAULT_STEP`` (one of the steps
``CheckpointStore.fault`` is called with: restoring, temp_written, renamed, committing,
committed) and
``FAULT_NTH`` (kill at the n-th time that step is reached) arm the fault; unset, this is the
plain worker.
"""

from __future__ import annotations

import os
import signal
import sys

from stream_fm.checkpoint import CheckpointStore
from stream_fm.cli import main

_reached = 0


def _crash_at(step: str, nth: int) -> None:
    def fault(self: CheckpointStore, reached: str) -> None:
        global _reached
        if reached == step:
            _reached += 1
            if _reached == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    CheckpointStore.fault = fault  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("FAULT_STEP"):
        _crash_at(os.environ["FAULT_STEP"], int(os.environ.get("FAULT_NTH", "1")))
    sys.exit(main(["run"]))
