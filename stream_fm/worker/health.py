"""/healthz and /readyz: is the loop making progress, and can this worker serve right now."""

from __future__ import annotations

import time
from collections.abc import Callable

from stream_fm.config import Settings
from stream_fm.kafka import KafkaIO
from stream_fm.kafka.refusal import NOTICED
from stream_fm.worker.recovery import Recovery
from stream_fm.worker.retry import Retry


class Health:
    def __init__(self, settings: Settings, recovery: Recovery, retry: Retry) -> None:
        self.settings = settings
        self.recovery = recovery
        self.retry = retry
        self.io: KafkaIO | None = None
        self.refusal: Callable[[], str | None] = lambda: None  # the cluster's refusal, if any
        self.compiled = False  # the kernels are compiled or loaded (``warmup``)
        self._last_beat_s = time.monotonic()

    def beat(self) -> None:
        """The loop went round once."""
        self._last_beat_s = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        """/healthz: false when the loop has not gone round for longer than one batch can take."""
        limit_s = self.settings.poll_timeout_ms / 1000 + self.settings.produce_timeout_s + 5
        idle_s = time.monotonic() - self._last_beat_s
        if idle_s > limit_s:
            return False, f"the loop made no progress for {idle_s:.0f}s"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        """/readyz: state restored, partitions assigned, broker answering, outputs and
        checkpoints going through; otherwise the reason."""
        io, recovery = self.io, self.recovery
        refused = self.refusal() or _noticed(self.settings)
        if refused is not None:
            return False, refused
        if not self.compiled:
            return False, "compiling the model kernels"
        if io is None or not recovery.restored:
            return False, "state not restored yet"
        if not recovery.offsets and not io.assignment():
            return False, "no partitions assigned"
        if not io.reachable():
            return False, "broker unreachable"
        if recovery.problem is not None:
            return False, f"checkpoints failing: {recovery.problem}"
        problem = self.retry.problem(recovery.checkpoints)
        if problem is not None:
            return False, f"outputs rejected: {problem}"
        return True, "ok"


def _noticed(settings: Settings) -> str | None:
    # Before the worker meets a refusal itself (a client still trying to log in), the
    # client's own report of it.
    refusal = NOTICED.recent(settings)
    return None if refusal is None else str(refusal)
