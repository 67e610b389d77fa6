"""The back-off after produce failures: doubling, capped, reset by a checkpoint."""

from __future__ import annotations

import time

from stream_fm.errors import ProduceError
from stream_fm.worker.retry import FIRST_WAIT_S, LONGEST_WAIT_S, Retry


def test_waits_double_up_to_the_cap_until_a_checkpoint_succeeds() -> None:
    retry = Retry()
    waits = [retry.failed(ProduceError("refused", permanent=True), checkpoints=4) for _ in range(8)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert retry.careful(checkpoints=4) and retry.problem(checkpoints=4) is not None
    # A checkpoint since the last failure: the next failure starts over.
    assert not retry.careful(checkpoints=5) and retry.problem(checkpoints=5) is None
    assert retry.failed(ProduceError("again"), checkpoints=5) == FIRST_WAIT_S
    assert LONGEST_WAIT_S == 30.0


def test_a_permanent_refusal_waits_the_whole_time() -> None:
    retry = Retry()
    retry.failed(ProduceError("too large", permanent=True), checkpoints=0)
    assert retry.waiting(lambda: False) > 0.5
    assert retry.waiting(lambda: True) > 0.5, "a broker that answers does not fix a refusal"


def test_a_broker_seen_away_that_answers_again_ends_the_wait() -> None:
    retry = Retry()
    retry.failed(ProduceError("timed out"), checkpoints=0)
    assert retry.waiting(lambda: True) > 0, "answering all along: the wait stands"
    assert retry.waiting(lambda: False) > 0
    assert retry.waiting(lambda: True) == 0.0


def test_the_wait_runs_out() -> None:
    retry = Retry()
    retry.failed(ProduceError("x"), checkpoints=0)
    retry._until_s = time.monotonic() - 0.01  # as if a second had passed
    assert retry.waiting(lambda: True) == 0.0
