"""While the cluster refuses the worker: say why once, wait (doubling), give up in the end.

A refusal (a wrong password, an untrusted certificate, a missing ACL) does not pass by
retrying quickly, so the worker backs off from 1 s to 30 s between attempts and /readyz names
the cause. One that lasts ``auth_failure_exit_s`` ends the process with exit code 3 (an
orchestrator shows a crash loop with the reason in the log; the state is whatever the last
checkpoint holds, so nothing is lost). Progress — records fetched, a checkpoint committed —
ends the refusal.

>>> watch = RefusalWatch(exit_after_s=0)
>>> watch.refused(ClusterRefused("authorization", "the principal lacks the ACL GROUP g READ"))
1.0
>>> watch.problem()
'refused by the cluster (authorization): the principal lacks the ACL GROUP g READ'
>>> watch.progressed(); watch.problem() is None
True
"""

from __future__ import annotations

import logging
import time
from typing import Final

from stream_fm.errors import ClusterRefused

log = logging.getLogger("stream_fm.worker")

FIRST_WAIT_S: Final = 1.0
LONGEST_WAIT_S: Final = 30.0
EXIT_CODE: Final = 3


class RefusalWatch:
    def __init__(self, exit_after_s: float) -> None:
        self.exit_after_s = exit_after_s
        self._current: ClusterRefused | None = None
        self._side = "consume"
        self._times = 0  # refusals met in this streak
        self._since = 0.0
        self._wait_s = 0.0

    def refused(
        self, refusal: ClusterRefused, side: str = "consume", since: float | None = None
    ) -> float:
        """Note a refusal met while consuming (or connecting: ``since`` the attempt began) or
        while producing: logged once per distinct cause; returns how long to wait now."""
        if self._current is None:
            self._since = time.monotonic() if since is None else since
            self._times = 0
        self._times += 1
        if self._current is None or str(self._current) != str(refusal):
            log.error("%s", refusal)
        self._current, self._side = refusal, side
        self._wait_s = min(LONGEST_WAIT_S, self._wait_s * 2) if self._wait_s else FIRST_WAIT_S
        return self._wait_s

    def progressed(self, side: str = "produce") -> None:
        """Records came (``consume``: ends a consumer-side refusal) or a checkpoint went
        through (``produce``: outputs and offsets were accepted, which ends any)."""
        if self._current is None or (side == "consume" and self._side == "produce"):
            return
        log.info("the cluster accepts the worker again")
        self._current, self._wait_s = None, 0.0

    def problem(self) -> str | None:
        """What /readyz says while refused."""
        return None if self._current is None else str(self._current)

    def give_up(self) -> ClusterRefused | None:
        """The refusal to end the process with, once it lasted ``exit_after_s``."""
        if self._current is None or not self.exit_after_s or self._times < 2:
            return None  # met once: /readyz says why for one wait at least
        if time.monotonic() - self._since < self.exit_after_s:
            return None
        return self._current
