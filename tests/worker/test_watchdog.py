"""The consumer watchdog's clock: when it looks, and what it counts as behind."""

from __future__ import annotations

from stream_fm.worker.watchdog import Watchdog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_empty_polls_do_not_reset_the_clock_and_records_do() -> None:
    clock = Clock()
    dog = Watchdog(timeout_s=10, clock=clock)
    clock.now += 6
    dog.polled(0)
    clock.now += 6
    assert dog.due()
    dog.polled(1)
    assert not dog.due()


def test_a_deliberate_wait_is_no_stall() -> None:
    clock = Clock()
    dog = Watchdog(timeout_s=10, clock=clock)
    clock.now += 9
    dog.rest()
    clock.now += 9
    assert not dog.due()


def test_zero_turns_it_off() -> None:
    clock = Clock()
    dog = Watchdog(timeout_s=0, clock=clock)
    clock.now += 1e6
    assert not dog.due()


def test_behind_compares_each_owned_partition_with_its_log_end() -> None:
    dog = Watchdog(timeout_s=1, clock=Clock())
    ends = {("t", 0): 50, ("t", 1): 70, ("t", 2): 9}
    positions = {("t", 0): 50, ("t", 1): 64}  # t:2 not owned any more: not judged
    assert dog.behind(ends, positions) == {("t", 1): (64, 70)}
    assert dog.behind({("t", 0): 50}, {("t", 0): 50}) == {}
