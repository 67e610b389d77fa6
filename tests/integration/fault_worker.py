"""`stream-fm run` with a test-only fault: SIGKILL itself at a checkpoint step.

Settings come from STREAM_FM_* as for `stream-fm run`. ``FAULT_STEP`` (one of the steps
``CheckpointStore.fault`` is called with: restoring, temp_written, renamed, committing,
committed) and
``FAULT_NTH`` (kill at the n-th time that step is reached) arm the fault. ``FAULT_WEDGE_AFTER``
wedges the consumer once it handed out that many records: its client is told to pause every
assigned partition behind the worker's back, so it fetches nothing while the log goes on (the
hang a broker restart once left kafka-python in); only the first consumer is wedged. Unset,
this is the plain worker.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

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


def _wedge_after(records: int) -> None:
    from stream_fm.kafka.confluent import ConfluentIO
    from stream_fm.kafka.kafka_python import KafkaPythonIO

    seen = 0
    wedged: list[object] = []

    def wedging(poll: Any) -> Any:
        def wedged_poll(self: Any, timeout_ms: int, max_records: int) -> Any:
            nonlocal seen
            out = poll(self, timeout_ms, max_records)
            seen += len(out)
            consumer = self._consumer
            if seen >= records and not wedged and consumer.assignment():
                wedged.append(consumer)
                if isinstance(self, KafkaPythonIO):
                    consumer.pause(*consumer.assignment())
                else:
                    consumer.pause(consumer.assignment())
                print(f"fault: consumer wedged after {seen} records", flush=True)
            return out

        return wedged_poll

    for client in (KafkaPythonIO, ConfluentIO):
        client.poll = wedging(client.poll)  # type: ignore[method-assign]


if __name__ == "__main__":
    if os.environ.get("FAULT_WEDGE_AFTER"):
        _wedge_after(int(os.environ["FAULT_WEDGE_AFTER"]))
    if os.environ.get("FAULT_STEP"):
        _crash_at(os.environ["FAULT_STEP"], int(os.environ.get("FAULT_NTH", "1")))
    sys.exit(main(["run"]))
