"""The model-updates record format: round trips, splits to fit the topic, and names what is
wrong with a record it cannot use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from stream_fm.errors import BadModelUpdate
from stream_fm.model import kernel
from stream_fm.model.delta import Delta
from stream_fm.model.rounds import Bases
from stream_fm.sync.wire import HEADER, Shape, Update, decode, encode, row_bytes

SHAPE = Shape(n_buckets=1 << 12, k=4, optimizer="adaptive", lin_width=4, has_acc=True)


def update(rows: int = 300, seed: int = 1) -> Update:
    rng = np.random.default_rng(seed)
    buckets = np.sort(rng.choice(SHAPE.n_buckets, rows, replace=False)).astype(np.int32)
    delta = Delta(
        buckets,
        rng.normal(size=(rows, 4)),
        rng.normal(size=(rows, 4)),
        rng.random((rows, 4)),
        rng.normal(size=kernel.N_BIAS),
        learned=123,
    )
    covered = {"ad-events:0": (10, 400), "ad-events:3": (0, 7)}
    bases = Bases(rng.random(rows) * 9, rng.random(rows), 12.5)
    return Update("host_1_abc", 5, SHAPE, delta, bases, 1_765_000_000, covered)


def test_a_round_trip_keeps_everything_at_float32() -> None:
    sent = update()
    [record] = encode(sent, 1 << 20)
    got = decode(record)
    assert (got.writer, got.seq, got.round, got.shape, got.covered) == (
        sent.writer, sent.seq, sent.round, SHAPE, sent.covered,
    )  # fmt: skip
    assert got.delta.buckets.tolist() == sent.delta.buckets.tolist()
    assert got.delta.learned == 123
    np.testing.assert_array_equal(got.delta.bias, sent.delta.bias)  # float64
    assert got.bases.bias == 12.5
    np.testing.assert_allclose(got.bases.lin, sent.bases.lin, rtol=1e-6)
    for name in ("lin", "v", "v_acc"):
        np.testing.assert_allclose(getattr(got.delta, name), getattr(sent.delta, name), rtol=1e-6)
    assert len(record) <= HEADER.size + 200 + 300 * row_bytes(SHAPE)


def test_an_update_too_large_for_the_topic_is_split_and_every_part_fits() -> None:
    sent = update(rows=1000)
    limit = 20_000
    parts = [decode(r) for r in encode(sent, limit)]
    assert len(parts) > 1 and all(len(r) <= limit for r in encode(sent, limit))
    assert [p.part for p in parts] == list(range(len(parts)))
    assert {p.parts for p in parts} == {len(parts)}
    rows = np.concatenate([p.delta.buckets for p in parts])
    assert rows.tolist() == sent.delta.buckets.tolist()
    assert parts[0].delta.learned == 123 and sum(p.delta.learned for p in parts) == 123
    assert all(not p.delta.bias.any() for p in parts[1:])  # the intercept once


def test_an_empty_update_is_one_record() -> None:
    sent = update(rows=0)
    [record] = encode(sent, 1 << 20)
    assert len(decode(record).delta) == 0


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda r: r[:10], "truncated"),
        (lambda r: b"XXXX" + r[4:], "not_an_update"),
        (lambda r: r[:4] + bytes([9]) + r[5:], "unknown_version"),
        (lambda r: r[:-1] + bytes([r[-1] ^ 1]), "checksum"),
        (lambda r: r[:-3], "checksum"),
        (lambda r: b"", "truncated"),
    ],
)
def test_a_damaged_record_is_refused_with_its_reason(
    damage: Callable[[bytes], bytes], reason: str
) -> None:
    [record] = encode(update(), 1 << 20)
    with pytest.raises(BadModelUpdate) as caught:
        decode(damage(record))
    assert caught.value.reason == reason


def test_a_record_whose_rows_do_not_add_up_is_malformed() -> None:
    [record] = encode(update(), 1 << 20)
    fields = list(HEADER.unpack_from(record))
    fields[13] += 1  # one row more than the body holds (the checksum still matches)
    with pytest.raises(BadModelUpdate) as caught:
        decode(HEADER.pack(*fields) + record[HEADER.size :])
    assert caught.value.reason == "malformed"


def test_a_goodbye_travels_in_the_flags() -> None:
    sent = replace(update(rows=3), leaving=True)
    [record] = encode(sent, 1 << 20)
    got = decode(record)
    assert got.leaving and got.shape.has_acc
    assert not decode(encode(update(rows=3), 1 << 20)[0]).leaving


def test_a_crossed_model_says_so_and_is_another_shape() -> None:
    crossed = replace(update(rows=3), shape=replace(SHAPE, crosses=True))
    got = decode(encode(crossed, 1 << 20)[0])
    assert got.shape.crosses and got.shape.has_acc and not got.leaving
    assert got.shape != SHAPE  # a peer without crosses refuses it as "other_model"
    assert not decode(encode(update(rows=3), 1 << 20)[0]).shape.crosses
