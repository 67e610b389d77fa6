"""The model-updates wire format: one worker's increments over one interval as one or more
Kafka records. Compact binary, little-endian, versioned, with a checksum; never pickle.

A record is ``HEADER`` (magic ``SFMU``, format version, the model's shape, this part's index
and the part count, the writer's sequence number, the round it was published in, examples
learned, rows, covered ranges, writer name length, CRC-32 of the body), then the body: the
writer's name; the input ranges the update covers (topic, partition, first offset, next
offset); the touched buckets (the first as uint32, then the gaps between sorted buckets in
the fewest bytes that hold the largest); per bucket the ``lin`` columns the optimizer uses,
the ``v`` and ``v_acc`` increments and the writer's sums before them; the intercept's
increments and its sum before them (float64: a handful of values, kept exact).

Row values travel as ``bfloat16`` (the top half of a float32: its range, 8 significant bits)
or, with ``precision="float32"``, as float32. What bfloat16 leaves out of an increment is
not lost: the writer keeps it and sends it with the bucket's next increment
(``model.rounds``: error feedback), so a peer's weight trails the writer's by at most a
fraction 2^-9 of the bucket's last increment, and no error adds up over rounds. Format 1
(float32, absolute buckets, every ``lin`` column) is still read, so a group can be upgraded
one worker at a time.

An update too large for the topic is split by rows; the intercept and the example count go
with part 0 only, so the parts can be applied in any order, each once.

>>> import numpy as np
>>> from stream_fm.model.delta import Delta
>>> from stream_fm.model.rounds import Bases
>>> shape = Shape(n_buckets=64, k=2, optimizer="adagrad", lin_width=2, has_acc=True)
>>> d = Delta(np.array([3, 9], np.int32), np.ones((2, 2)), np.full((2, 2), 0.1),
...           np.ones((2, 2)), np.zeros(5), learned=2)
>>> g0 = Bases(np.zeros(2), np.zeros(2), 0.0)
>>> update = Update("w1", 7, shape, d, g0, 41, {"ad-events:0": (0, 2)})
>>> [part] = encode(update, limit_bytes=1 << 20)
>>> back = decode(part)
>>> back.writer, back.round, back.delta.buckets.tolist(), back.covered, back.delta.learned
('w1', 41, [3, 9], {'ad-events:0': (0, 2)}, 2)
>>> back.delta.v[0].tolist()  # 0.1 in bfloat16; the writer keeps the rest for next time
[0.10009765625, 0.10009765625]
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_fm.config import MODEL_SYNC_PRECISIONS
from stream_fm.errors import BadModelUpdate
from stream_fm.model import kernel
from stream_fm.model.delta import Delta
from stream_fm.model.rounds import Bases

MAGIC: Final = b"SFMU"
VERSION: Final = 2
READS: Final = (1, 2)  # format 1: float32 rows, absolute buckets, every lin column
# magic, version, optimizer, lin width, flags (has_acc, leaving, crosses, bfloat16), k,
# n_buckets, part, parts, seq, round,
# learned, rows, covered entries, writer bytes, bias length, crc32
HEADER: Final = struct.Struct("<4sBBBBHIHHQqQIHHBI")
_RANGE: Final = struct.Struct("<Iqq")
_FIRST: Final = struct.Struct("<IB")  # the first bucket, the bytes of each gap after it
FLAG_HAS_ACC: Final = 1
FLAG_LEAVING: Final = 2
FLAG_CROSSES: Final = 4  # the weights include crosses (``interactions="all"``)
FLAG_BF16: Final = 8  # row values in bfloat16 (else float32)
PRECISIONS: Final = MODEL_SYNC_PRECISIONS
#: Why a record of the topic was skipped (``BadModelUpdate.reason``).
REJECT_REASONS: Final = (
    "truncated", "not_an_update", "unknown_version", "checksum", "malformed", "other_model"
)  # fmt: skip
_OPTIMIZERS: Final = {code: name for name, code in kernel.OPTIMIZER_CODES.items()}


@dataclass(frozen=True)
class Shape:
    """What a model must share with a peer for their increments to add up."""

    n_buckets: int
    k: int
    optimizer: str
    lin_width: int
    has_acc: bool
    crosses: bool = False  # a crossed model's weights mean something else: never mixed

    @property
    def acc_width(self) -> int:
        """Per-latent optimizer values per bucket: Adam keeps two moments, AdaGrad one sum."""
        return 2 * self.k if self.optimizer == "adam" else self.k

    @property
    def lin_sent(self) -> int:
        """The ``lin`` columns a record carries: those the optimizer writes."""
        return min(self.lin_width, kernel.LIN_USED.get(self.optimizer, self.lin_width))


@dataclass(frozen=True)
class Update:
    """One part (or the whole) of what a worker learned over one interval."""

    writer: str
    seq: int
    shape: Shape
    delta: Delta
    bases: Bases  # the writer's sums before the increments (``model.rounds``)
    round: int  # the wall-clock round it was published in (``model.rounds``)
    covered: Mapping[str, tuple[int, int]]  # "topic:partition" -> (first, next) offset
    part: int = 0
    parts: int = 1
    leaving: bool = False  # the writer's last update: it stops (SIGTERM)


def row_bytes(shape: Shape, precision: str = "bfloat16") -> int:
    """Bytes per touched bucket at most: its gap, the lin columns sent, v, v_acc and the two
    sums before them."""
    values = shape.lin_sent + shape.k + (shape.acc_width if shape.has_acc else 0) + 2
    return 4 + _value_bytes(precision) * values


def rounded(delta: Delta, bases: Bases, precision: str = "bfloat16") -> tuple[Delta, Bases]:
    """The rows as a peer decodes them (the intercept travels exact). The writer's own
    round uses these, so every worker weighs the same numbers."""
    cast = _bf16 if _value_bytes(precision) == 2 else _f32  # an unknown precision fails
    out = replace(delta, lin=cast(delta.lin), v=cast(delta.v), v_acc=cast(delta.v_acc))
    return out, replace(bases, lin=cast(bases.lin), acc=cast(bases.acc))


def encode(update: Update, limit_bytes: int, precision: str = "bfloat16") -> list[bytes]:
    """The update as records of at most ``limit_bytes`` each (split by rows if needed); the
    row values as ``rounded`` gives them."""
    _value_bytes(precision)  # an unknown precision fails here
    fixed = len(_body(update, 0, 0, True, precision)) + _FIRST.size
    room = limit_bytes - HEADER.size - fixed
    per_part = room // row_bytes(update.shape, precision)
    if per_part < 1:
        raise ValueError(f"limit_bytes {limit_bytes} leaves no room for a single bucket")
    rows = len(update.delta)
    cuts = list(range(0, rows, per_part)) or [0]
    return [
        _record(update, start, min(start + per_part, rows), (part, len(cuts)), precision)
        for part, start in enumerate(cuts)
    ]


def _record(
    update: Update, start: int, stop: int, part_of: tuple[int, int], precision: str
) -> bytes:
    part, parts = part_of
    body = _body(update, start, stop, part == 0, precision)
    s = update.shape
    header = HEADER.pack(
        MAGIC,
        VERSION,
        kernel.OPTIMIZER_CODES[s.optimizer],
        s.lin_width,
        int(s.has_acc)
        | (FLAG_LEAVING if update.leaving else 0)
        | (FLAG_CROSSES if s.crosses else 0)
        | (FLAG_BF16 if precision == "bfloat16" else 0),
        s.k,
        s.n_buckets,
        part,
        parts,
        update.seq,
        update.round,
        update.delta.learned if part == 0 else 0,
        stop - start,
        len(update.covered),
        len(update.writer.encode()),
        len(update.delta.bias) if part == 0 else 0,
        zlib.crc32(body),
    )
    return header + body


def _body(update: Update, start: int, stop: int, with_bias: bool, precision: str) -> bytes:
    d, rows = update.delta, slice(start, stop)
    chunks = [update.writer.encode()]
    for key, (first, after) in update.covered.items():
        topic, _, partition = key.rpartition(":")
        name = topic.encode()
        chunks += [struct.pack("<H", len(name)), name, _RANGE.pack(int(partition), first, after)]
    if stop > start:
        chunks.append(_buckets(d.buckets[rows]))
    arrays = [d.lin[rows, : update.shape.lin_sent], d.v[rows]]
    arrays += [d.v_acc[rows]] if update.shape.has_acc else []
    arrays += [update.bases.lin[rows], update.bases.acc[rows]]
    dtype = "<f4" if precision == "float32" else None
    for a in arrays:
        chunks.append(np.ascontiguousarray(a, dtype=dtype).tobytes() if dtype else _bf16_bits(a))
    if with_bias:
        bias = np.append(d.bias, update.bases.bias)
        chunks.append(np.ascontiguousarray(bias, dtype="<f8").tobytes())
    return b"".join(chunks)


def _buckets(buckets: npt.NDArray[np.int32]) -> bytes:
    """The first bucket, then each gap to the next in the fewest whole bytes that hold the
    largest: sorted buckets a round touched are mostly a few hundred apart."""
    gaps = np.diff(buckets.astype(np.int64)).astype("<u4")
    width = max(1, (int(gaps.max()).bit_length() + 7) // 8) if len(gaps) else 1
    packed = gaps.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()
    return _FIRST.pack(int(buckets[0]), width) + packed


def _value_bytes(precision: str) -> int:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return 2 if precision == "bfloat16" else 4


def _f32(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return np.asarray(values, dtype=np.float32).astype(np.float64)


def _bf16_bits(values: npt.NDArray[np.float64]) -> bytes:
    """bfloat16, rounded to nearest even, as little-endian uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype("<u2").tobytes()


def _from_bf16(raw: npt.NDArray[np.uint16]) -> npt.NDArray[np.float64]:
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _bf16(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    raw = np.frombuffer(_bf16_bits(values), dtype="<u2")
    return _from_bf16(raw).reshape(np.shape(values))


def decode(record: bytes) -> Update:
    """One record back; ``BadModelUpdate`` names what is wrong with it."""
    if len(record) < HEADER.size:
        raise BadModelUpdate("truncated", f"{len(record)} bytes, shorter than a header")
    (magic, version, opt, width, flags, k, n_buckets, part, parts, seq, round_id, learned,
     rows, n_covered, n_writer, n_bias, crc) = HEADER.unpack_from(record)  # fmt: skip
    if magic != MAGIC:
        raise BadModelUpdate("not_an_update", f"starts with {magic!r}, not {MAGIC!r}")
    if version not in READS:
        raise BadModelUpdate("unknown_version", f"format {version}, this worker reads {READS}")
    body = memoryview(record)[HEADER.size :]
    if zlib.crc32(body) != crc:
        raise BadModelUpdate("checksum", "the body does not match its CRC-32")
    if opt not in _OPTIMIZERS or part >= parts:
        raise BadModelUpdate("malformed", f"optimizer code {opt}, part {part} of {parts}")
    shape = Shape(
        n_buckets, k, _OPTIMIZERS[opt], width, bool(flags & FLAG_HAS_ACC),
        bool(flags & FLAG_CROSSES),
    )  # fmt: skip
    try:
        counts = (rows, n_covered, n_writer, n_bias)
        update = _Reader(body, shape, version, bool(flags & FLAG_BF16)).update(
            counts, (seq, round_id, learned, part, parts)
        )
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise BadModelUpdate("malformed", str(error)) from error
    return replace(update, leaving=bool(flags & FLAG_LEAVING))


class _Reader:
    """A record's body, read front to back."""

    def __init__(self, body: memoryview, shape: Shape, version: int, bf16: bool) -> None:
        self.body, self.shape, self.version, self.bf16 = body, shape, version, bf16
        self.at = 0

    def take(self, dtype: str, count: int) -> npt.NDArray[np.generic]:
        out = np.frombuffer(self.body, dtype=dtype, count=count, offset=self.at)
        self.at += out.nbytes
        return out

    def values(self, rows: int, width: int) -> npt.NDArray[np.float64]:
        if self.bf16:
            return _from_bf16(self.take("<u2", rows * width)).reshape(rows, width)  # type: ignore[arg-type]
        return self.take("<f4", rows * width).astype(np.float64).reshape(rows, width)

    def buckets(self, rows: int) -> npt.NDArray[np.int32]:
        if self.version == 1:
            buckets = self.take("<i4", rows).astype(np.int64)
        elif rows == 0:
            buckets = np.zeros(0, np.int64)
        else:
            first, width = _FIRST.unpack_from(self.body, self.at)
            self.at += _FIRST.size
            if not 1 <= width <= 4:
                raise ValueError(f"gaps of {width} bytes")
            raw = self.take("u1", (rows - 1) * width).reshape(rows - 1, width)
            padded = np.zeros((rows - 1, 4), np.uint8)
            padded[:, :width] = raw
            gaps = padded.view("<u4").ravel().astype(np.int64)
            buckets = first + np.concatenate(([0], np.cumsum(gaps)))
        if rows and (buckets[0] < 0 or buckets[-1] >= self.shape.n_buckets):
            raise ValueError(f"a bucket outside [0, {self.shape.n_buckets})")
        if rows > 1 and not bool(np.all(np.diff(buckets) > 0)):
            raise ValueError("buckets are not strictly increasing")
        return buckets.astype(np.int32)

    def update(
        self, counts: tuple[int, int, int, int], ids: tuple[int, int, int, int, int]
    ) -> Update:
        rows, n_covered, n_writer, n_bias = counts
        seq, round_id, learned, part, parts = ids
        shape = self.shape
        writer = bytes(self.take("u1", n_writer)).decode()
        covered: dict[str, tuple[int, int]] = {}
        for _ in range(n_covered):
            (length,) = self.take("<u2", 1)
            topic = bytes(self.take("u1", int(length))).decode()
            partition, first, after = _RANGE.unpack_from(self.body, self.at)
            self.at += _RANGE.size
            covered[f"{topic}:{partition}"] = (first, after)
        buckets = self.buckets(rows)
        sent = shape.lin_width if self.version == 1 else shape.lin_sent
        lin = np.zeros((rows, shape.lin_width))
        lin[:, :sent] = self.values(rows, sent)
        v = self.values(rows, shape.k)
        v_acc = self.values(rows if shape.has_acc else 0, shape.acc_width)
        base_lin, base_acc = self.values(rows, 1).ravel(), self.values(rows, 1).ravel()
        bias = (
            self.take("<f8", n_bias + 1).astype(np.float64)
            if n_bias
            else np.zeros(kernel.N_BIAS + 1)
        )
        if self.at != len(self.body):
            raise ValueError(f"{len(self.body) - self.at} bytes after the last array")
        bases = Bases(base_lin, base_acc, float(bias[-1]))
        bias = bias[:-1]
        if len(bias) != kernel.N_BIAS:
            raise ValueError(f"an intercept of {len(bias)} values, expected {kernel.N_BIAS}")
        if not all(np.isfinite(a).all() for a in (lin, v, v_acc, bias, base_lin, base_acc)):
            raise ValueError("a value that is not finite")
        delta = Delta(buckets, lin, v, v_acc, bias, learned)
        return Update(writer, seq, shape, delta, bases, round_id, covered, part, parts)
