"""The model-updates record format: round trips, splits to fit the topic, and names what is
wrong with a record it cannot use."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest

from stream_fm.errors import BadModelUpdate
from stream_fm.model import kernel
from stream_fm.model.delta import Delta
from stream_fm.model.rounds import Bases
from stream_fm.sync.wire import HEADER, Shape, Update, decode, encode, rounded, row_bytes

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


@pytest.mark.parametrize(("precision", "rtol"), [("float32", 1e-6), ("bfloat16", 2**-8)])
def test_a_round_trip_keeps_everything_at_its_precision(precision: str, rtol: float) -> None:
    sent = update()
    [record] = encode(sent, 1 << 20, precision)
    got = decode(record)
    assert (got.writer, got.seq, got.round, got.shape, got.covered) == (
        sent.writer, sent.seq, sent.round, SHAPE, sent.covered,
    )  # fmt: skip
    assert got.delta.buckets.tolist() == sent.delta.buckets.tolist()
    assert got.delta.learned == 123
    np.testing.assert_array_equal(got.delta.bias, sent.delta.bias)  # float64
    assert got.bases.bias == 12.5
    np.testing.assert_allclose(got.bases.lin, sent.bases.lin, rtol=rtol)
    exact, exact_bases = rounded(sent.delta, sent.bases, precision)  # what the writer counts
    np.testing.assert_array_equal(got.bases.acc, exact_bases.acc)
    for name in ("v", "v_acc"):
        np.testing.assert_allclose(getattr(got.delta, name), getattr(sent.delta, name), rtol=rtol)
        np.testing.assert_array_equal(getattr(got.delta, name), getattr(exact, name))
    np.testing.assert_array_equal(got.delta.lin[:, :3], exact.lin[:, :3])
    assert not got.delta.lin[:, 3].any()  # adaptive's padding column is not sent
    assert len(record) <= HEADER.size + 200 + 300 * row_bytes(SHAPE, precision)


def test_records_are_under_half_of_format_1() -> None:
    sent = update(rows=2000)
    [small] = encode(sent, 1 << 20)
    [large] = encode(sent, 1 << 20, "float32")
    assert len(small) < 0.55 * len(large) and len(small) < 0.5 * len(format_1(sent))
    assert row_bytes(SHAPE) == 4 + 2 * (3 + 4 + 4 + 2)


@pytest.mark.parametrize(
    "buckets", [[0], [SHAPE.n_buckets - 1], [0, SHAPE.n_buckets - 1], [5, 6, 7, 300, 4000]]
)
def test_buckets_travel_as_gaps_of_any_width(buckets: list[int]) -> None:
    rows = len(buckets)
    sent = update(rows=rows)
    sent = replace(sent, delta=replace(sent.delta, buckets=np.array(buckets, np.int32)))
    [record] = encode(sent, 1 << 20)
    assert decode(record).delta.buckets.tolist() == buckets


def test_a_format_1_record_of_a_worker_not_yet_upgraded_is_read() -> None:
    sent = update(rows=50)
    got = decode(format_1(sent))
    assert got.delta.buckets.tolist() == sent.delta.buckets.tolist()
    np.testing.assert_allclose(got.delta.lin, sent.delta.lin, rtol=1e-6)  # all four columns
    np.testing.assert_allclose(got.delta.v_acc, sent.delta.v_acc, rtol=1e-6)
    assert got.covered == sent.covered and got.delta.learned == 123


def format_1(sent: Update) -> bytes:
    """A record as format 1 wrote it: float32 rows, absolute buckets, every lin column."""
    d, b = sent.delta, sent.bases
    chunks = [sent.writer.encode()]
    for key, (first, after) in sent.covered.items():
        topic, _, partition = key.rpartition(":")
        chunks += [struct.pack("<H", len(topic)), topic.encode()]
        chunks.append(struct.pack("<Iqq", int(partition), first, after))
    chunks.append(d.buckets.astype("<i4").tobytes())
    for array in (d.lin, d.v, d.v_acc, b.lin, b.acc):
        chunks.append(np.ascontiguousarray(array, dtype="<f4").tobytes())
    chunks.append(np.append(d.bias, b.bias).astype("<f8").tobytes())
    body = b"".join(chunks)
    header = HEADER.pack(
        b"SFMU", 1, kernel.OPTIMIZER_CODES["adaptive"], 4, 1, SHAPE.k, SHAPE.n_buckets, 0, 1,
        sent.seq, sent.round, d.learned, len(d), len(sent.covered), len(sent.writer),
        kernel.N_BIAS, zlib.crc32(body),
    )  # fmt: skip
    return header + body


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
