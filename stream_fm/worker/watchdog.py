"""The consumer watchdog: a consumer that is behind the log end and fetches nothing is replaced.

A client can stop fetching while its partitions have records (kafka-python once fetched
nothing for 120 s after a broker came back). The loop reports every poll; once nothing came
for ``consumer_stall_timeout_s``, the watchdog reads the owned partitions' log-end offsets on
a connection of its own and compares them with the worker's positions. Behind: the consumer
is stalled and the loop replaces it. Caught up: the stream is only quiet, and the clock starts
again (so a quiet stream costs one end-offset request per timeout).

>>> clock = [0.0]
>>> dog = Watchdog(timeout_s=60, clock=lambda: clock[0])
>>> dog.polled(300); clock[0] = 59.0; dog.due()
False
>>> clock[0] = 61.0; dog.due()
True
>>> dog.behind({("t", 0): 10, ("t", 1): 7}, {("t", 0): 10, ("t", 1): 5})
{('t', 1): (5, 7)}
>>> dog.due()  # every check starts the clock again
False
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from stream_fm.kafka import Partition

Behind = dict[Partition, tuple[int, int]]  # partition -> (position, log end)


class Watchdog:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self._clock = clock
        self._since = clock()  # the last poll that brought records, or the last check

    def polled(self, records: int) -> None:
        if records:
            self._since = self._clock()

    def rest(self) -> None:
        """A deliberate wait (a back-off) or a new consumer: not a stall, start again."""
        self._since = self._clock()

    def due(self) -> bool:
        """Nothing fetched for the timeout: time to compare positions with the log end."""
        return self.timeout_s > 0 and self._clock() - self._since >= self.timeout_s

    def behind(self, ends: Mapping[Partition, int], positions: Mapping[Partition, int]) -> Behind:
        """The partitions whose log goes further than the worker's position (a check: the
        clock starts again whatever it finds)."""
        self._since = self._clock()
        return {
            tp: (positions[tp], end)
            for tp, end in sorted(ends.items())
            if tp in positions and end > positions[tp]
        }
