"""After a produce failure: how long the worker waits before it redoes anything.

The wait doubles from 1 s to 30 s with each failure until a checkpoint succeeds again, so a
refusal that repeats (a topic limit below every record, a missing ACL) costs one redo per wait,
never a hot loop of duplicates. A transient failure whose broker was seen away and answers
again ends the wait at once: an outage costs its own length, not a doubled wait.

>>> retry = Retry()
>>> retry.failed(ProduceError("x"), checkpoints=0), retry.failed(ProduceError("x"), checkpoints=0)
(1.0, 2.0)
>>> retry.careful(checkpoints=0), retry.careful(checkpoints=1)
(True, False)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from stream_fm.errors import ProduceError

FIRST_WAIT_S: Final = 1.0
LONGEST_WAIT_S: Final = 30.0


class Retry:
    def __init__(self) -> None:
        self._wait_s = 0.0
        self._until_s = 0.0
        self._permanent = False
        self._broker_seen_away = False
        self._checkpoints_at_failure = -1
        self._problem = ""

    def failed(self, error: ProduceError, checkpoints: int) -> float:
        """A produce failure after ``checkpoints`` checkpoints: returns the wait it earned."""
        if not self.careful(checkpoints):
            self._wait_s = 0.0  # a checkpoint succeeded since the last failure: start over
        self._wait_s = min(LONGEST_WAIT_S, self._wait_s * 2) if self._wait_s else FIRST_WAIT_S
        self._until_s = time.monotonic() + self._wait_s
        self._permanent, self._broker_seen_away = error.permanent, False
        self._checkpoints_at_failure = checkpoints
        self._problem = f"{error}; retrying in {self._wait_s:g}s"
        return self._wait_s

    def careful(self, checkpoints: int) -> bool:
        """True from a failure until the next checkpoint: every batch is then acknowledged
        before the next, so a repeat of the failure is met with the least to redo."""
        return checkpoints == self._checkpoints_at_failure

    def problem(self, checkpoints: int) -> str | None:
        """What /readyz says while outputs are failing; None once a checkpoint succeeded."""
        return self._problem if self.careful(checkpoints) else None

    def waiting(self, broker_answers: Callable[[], bool]) -> float:
        """Seconds left to wait now (0: go on)."""
        left = self._until_s - time.monotonic()
        if left <= 0:
            return 0.0
        if not self._permanent:
            if not broker_answers():
                self._broker_seen_away = True
            elif self._broker_seen_away:
                self._until_s = 0.0
                return 0.0
        return left
