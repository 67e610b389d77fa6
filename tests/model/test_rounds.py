"""Peers' increments absorbed per round: every worker ends a round at the same model whatever
order its peers arrive in, nothing echoes back, and a lone worker is the engine bit for bit."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from stream_fm.model import FastFM, SparseExample
from stream_fm.model.delta import DeltaTracker
from stream_fm.model.rounds import Hold, Rounds
from stream_fm.sync.wire import rounded
from tests.model.test_delta import OPTIMIZERS, examples, params


def workers(
    n: int, optimizer: str, precision: str | None = None, hold: Hold | None = None
) -> list[Rounds]:
    rounder = partial(rounded, precision=precision) if precision else None
    return [
        Rounds(DeltaTracker(FastFM(params(optimizer))), rounder=rounder, hold=hold)
        for _ in range(n)
    ]


def learn(rounds: list[Rounds], round_: int) -> None:
    for w, one in enumerate(rounds):
        for x, y in examples(15, seed=100 * round_ + w):
            one.tracker.learn_one(x, y)


def post(rounds: list[Rounds], round_: int, order: list[int] | None = None) -> None:
    sent = [one.publish(round_) for one in rounds]
    for j, one in enumerate(rounds):
        for i in order or range(len(rounds)):
            if i != j:
                one.absorb(*sent[i], round_)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_workers_end_every_round_at_one_model(optimizer: str) -> None:
    absorbed = workers(3, optimizer)
    for round_ in range(5):
        learn(absorbed, round_)
        post(absorbed, round_)
        first = absorbed[0].tracker.engine.live_arrays()
        for one in absorbed[1:]:
            for name, array in one.tracker.engine.live_arrays().items():
                np.testing.assert_allclose(array, first[name], rtol=1e-9, atol=1e-12, err_msg=name)
    assert all(one.tracker.n_learned == 3 * 5 * 15 for one in absorbed)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_the_order_peers_arrive_in_does_not_matter(optimizer: str) -> None:
    a, b = workers(3, optimizer), workers(3, optimizer)
    for round_ in range(3):
        learn(a, round_)
        learn(b, round_)
        post(a, round_, order=[0, 1, 2])
        post(b, round_, order=[2, 1, 0])
    for x, y in zip(a, b, strict=True):
        for name, array in x.tracker.engine.live_arrays().items():
            np.testing.assert_allclose(array, y.tracker.engine.live_arrays()[name], rtol=1e-9)


def test_an_absorbed_increment_never_echoes_back() -> None:
    a, b = workers(2, "adaptive")
    learn([a], 0)
    b.absorb(*a.publish(0), 0)
    assert len(b.publish(1)[0]) == 0  # b learned nothing itself: nothing to send
    x = SparseExample(np.array([1, 2], dtype=np.int32), np.ones(2))
    b.tracker.learn_one(x, 1)
    assert b.publish(2)[0].buckets.tolist() == [1, 2]


@pytest.mark.parametrize("hold", [None, Hold(0.5, 3)])
@pytest.mark.parametrize("precision", [None, "bfloat16"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_worker_alone_is_the_engine_bit_for_bit(
    optimizer: str, precision: str | None, hold: Hold | None
) -> None:
    alone = FastFM(params(optimizer))
    [one] = workers(1, optimizer, precision, hold)
    for round_ in range(4):
        for x, y in examples(30, seed=round_):
            assert alone.predict_proba_one(x) == one.tracker.predict_proba_one(x)
            alone.learn_one(x, y)
            one.tracker.learn_one(x, y)
        one.publish(round_)
    for name, array in alone.live_arrays().items():
        assert np.array_equal(array, one.tracker.engine.live_arrays()[name]), name


def test_a_late_peer_of_an_older_round_still_counts_once() -> None:
    a, b = workers(2, "adagrad")
    learn([a], 0)
    late = a.publish(0)
    for round_ in range(1, 7):  # b moves on past what it remembers
        learn([b], round_)
        b.publish(round_)
    before = b.tracker.n_learned
    b.absorb(*late, 0)
    assert b.tracker.n_learned == before + 15
    assert np.isfinite(b.tracker.engine.live_arrays()["lin"]).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam"])
def test_what_the_wire_rounds_off_goes_with_the_next_increment(optimizer: str) -> None:
    a, b = workers(2, optimizer, "bfloat16")
    for round_ in range(6):
        learn([a], round_)
        delta, bases = a.publish(round_)
        assert np.array_equal(delta.v, rounded(delta, bases)[0].v)  # exactly what travels
        b.absorb(delta, bases, round_)
        mine, theirs = a.tracker.engine.live_arrays(), b.tracker.engine.live_arrays()
        _, base = a.tracker.model_and_base()
        kept = {name: mine[name] - base[name] for name in ("v", "v_acc")}
        for name in ("v", "v_acc"):  # the peer lacks exactly what the writer kept back
            np.testing.assert_allclose(theirs[name] + kept[name], mine[name], atol=1e-12)
        sent_rows = delta.buckets  # what stays back is below 2^-8 of what went
        assert np.all(np.abs(kept["v"][sent_rows]) <= 2**-8 * np.abs(delta.v))
    assert 0 < np.abs(kept["v"]).max() < 2**-8 * np.abs(mine["v"]).max()
    assert b.tracker.n_learned == a.tracker.n_learned


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_small_increments_wait_their_rounds_and_a_flush_sends_them_all(optimizer: str) -> None:
    a, b = workers(2, optimizer, hold=Hold(threshold=10.0, rounds=3))  # every increment waits
    waited = []
    for round_ in range(4):
        learn([a], round_)
        delta, bases = a.publish(round_)
        waited.append(len(delta))
        b.absorb(delta, bases, round_)
    assert waited[:3] == [0, 0, 0] and waited[3] > 0  # the fourth round sends what waited 3
    assert b.tracker.n_learned == a.tracker.n_learned  # the counts never wait
    learn([a], 4)
    b.absorb(*a.publish(4, flush=True), 4)
    mine, theirs = a.tracker.engine.live_arrays(), b.tracker.engine.live_arrays()
    for name in ("v", "v_acc"):
        np.testing.assert_allclose(theirs[name], mine[name], rtol=1e-12, err_msg=name)
    np.testing.assert_allclose(theirs["lin"][:, 0], mine["lin"][:, 0], rtol=1e-12)


def test_a_hold_is_bounded() -> None:
    with pytest.raises(ValueError):
        Hold(0.1, 0)
    with pytest.raises(ValueError):
        Hold(-1, 5)


def test_an_increment_that_moves_a_prediction_goes_at_once() -> None:
    [held], [plain] = workers(1, "adaptive", hold=Hold(1e-9, 25)), workers(1, "adaptive")
    for one in (held, plain):
        learn([one], 0)
    assert held.publish(0)[0].buckets.tolist() == plain.publish(0)[0].buckets.tolist()
