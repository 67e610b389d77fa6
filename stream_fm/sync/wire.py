"""The model-updates wire format: one worker's increments over one interval as one or more
Kafka records. Compact binary, little-endian, versioned, with a checksum; never pickle.

A record is ``HEADER`` (magic ``SFMU``, format version, the model's shape, this part's index
and the part count, the writer's sequence number, the round it was published in, examples learned, rows, covered ranges,
writer name length, CRC-32 of the body), then the body: the writer's name; the input ranges
the update covers (topic, partition, first offset, next offset); the touched buckets (int32);
their ``lin``, ``v``, ``v_acc`` increments and the writer's sums before them (float32: an
increment needs no more); the intercept's increments and its sum before them (float64).
An update too large for the topic is split by rows; the intercept and the example count go
with part 0 only, so the parts can be applied in any order, each once.

>>> import numpy as np
>>> from stream_fm.model.delta import Delta
>>> from stream_fm.model.rounds import Bases
>>> shape = Shape(n_buckets=64, k=2, optimizer="adagrad", lin_width=2, has_acc=True)
>>> d = Delta(np.array([3, 9], np.int32), np.ones((2, 2)), np.ones((2, 2)), np.ones((2, 2)),
...           np.zeros(5), learned=2)
>>> g0 = Bases(np.zeros(2), np.zeros(2), 0.0)
>>> update = Update("w1", 7, shape, d, g0, 41, {"ad-events:0": (0, 2)})
>>> [part] = encode(update, limit_bytes=1 << 20)
>>> back = decode(part)
>>> back.writer, back.round, back.delta.buckets.tolist(), back.covered, back.delta.learned
('w1', 41, [3, 9], {'ad-events:0': (0, 2)}, 2)
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_fm.errors import BadModelUpdate
from stream_fm.model import kernel
from stream_fm.model.delta import Delta
from stream_fm.model.rounds import Bases

MAGIC: Final = b"SFMU"
VERSION: Final = 1
# magic, version, optimizer, lin width, flags (has_acc, leaving, crosses), k, n_buckets, part, parts,
# seq, round,
# learned, rows, covered entries, writer bytes, bias length, crc32
HEADER: Final = struct.Struct("<4sBBBBHIHHQqQIHHBI")
_RANGE: Final = struct.Struct("<Iqq")
FLAG_HAS_ACC: Final = 1
FLAG_LEAVING: Final = 2
FLAG_CROSSES: Final = 4  # the weights include crosses (``interactions="all"``)
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


def row_bytes(shape: Shape) -> int:
    """Bytes per touched bucket: its id, lin, v, v_acc and its sum after, in float32."""
    return 4 + 4 * (shape.lin_width + shape.k + (shape.acc_width if shape.has_acc else 0) + 2)


def encode(update: Update, limit_bytes: int) -> list[bytes]:
    """The update as records of at most ``limit_bytes`` each (split by rows if needed)."""
    fixed = len(_body(update, 0, 0, with_bias=True))
    room = limit_bytes - HEADER.size - fixed
    per_part = room // row_bytes(update.shape)
    if per_part < 1:
        raise ValueError(f"limit_bytes {limit_bytes} leaves no room for a single bucket")
    rows = len(update.delta)
    cuts = list(range(0, rows, per_part)) or [0]
    return [
        _record(update, start, min(start + per_part, rows), part, len(cuts))
        for part, start in enumerate(cuts)
    ]


def _record(update: Update, start: int, stop: int, part: int, parts: int) -> bytes:
    body = _body(update, start, stop, with_bias=part == 0)
    s = update.shape
    header = HEADER.pack(
        MAGIC,
        VERSION,
        kernel.OPTIMIZER_CODES[s.optimizer],
        s.lin_width,
        int(s.has_acc)
        | (FLAG_LEAVING if update.leaving else 0)
        | (FLAG_CROSSES if s.crosses else 0),
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


def _body(update: Update, start: int, stop: int, with_bias: bool) -> bytes:
    d, rows = update.delta, slice(start, stop)
    chunks = [update.writer.encode()]
    for key, (first, after) in update.covered.items():
        topic, _, partition = key.rpartition(":")
        name = topic.encode()
        chunks += [struct.pack("<H", len(name)), name, _RANGE.pack(int(partition), first, after)]
    chunks.append(np.ascontiguousarray(d.buckets[rows], dtype="<i4").tobytes())
    arrays = [d.lin[rows], d.v[rows]] + ([d.v_acc[rows]] if update.shape.has_acc else [])
    arrays += [update.bases.lin[rows], update.bases.acc[rows]]
    chunks += [np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays]
    if with_bias:
        bias = np.append(d.bias, update.bases.bias)
        chunks.append(np.ascontiguousarray(bias, dtype="<f8").tobytes())
    return b"".join(chunks)


def decode(record: bytes) -> Update:
    """One record back; ``BadModelUpdate`` names what is wrong with it."""
    if len(record) < HEADER.size:
        raise BadModelUpdate("truncated", f"{len(record)} bytes, shorter than a header")
    (magic, version, opt, width, has_acc, k, n_buckets, part, parts, seq, round_id, learned,
     rows, n_covered, n_writer, n_bias, crc) = HEADER.unpack_from(record)  # fmt: skip
    if magic != MAGIC:
        raise BadModelUpdate("not_an_update", f"starts with {magic!r}, not {MAGIC!r}")
    if version != VERSION:
        raise BadModelUpdate("unknown_version", f"format {version}, this worker reads {VERSION}")
    body = memoryview(record)[HEADER.size :]
    if zlib.crc32(body) != crc:
        raise BadModelUpdate("checksum", "the body does not match its CRC-32")
    if opt not in _OPTIMIZERS or part >= parts:
        raise BadModelUpdate("malformed", f"optimizer code {opt}, part {part} of {parts}")
    shape = Shape(
        n_buckets, k, _OPTIMIZERS[opt], width, bool(has_acc & FLAG_HAS_ACC),
        bool(has_acc & FLAG_CROSSES),
    )  # fmt: skip
    try:
        counts = (rows, n_covered, n_writer, n_bias)
        update = _parse(body, shape, counts, seq, round_id, learned, part, parts)
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise BadModelUpdate("malformed", str(error)) from error
    return replace(update, leaving=bool(has_acc & FLAG_LEAVING))


def _parse(
    body: memoryview,
    shape: Shape,
    counts: tuple[int, int, int, int],
    seq: int,
    round_id: int,
    learned: int,
    part: int,
    parts: int,
) -> Update:
    rows, n_covered, n_writer, n_bias = counts
    at = n_writer
    writer = bytes(body[:at]).decode()
    covered: dict[str, tuple[int, int]] = {}
    for _ in range(n_covered):
        (length,) = struct.unpack_from("<H", body, at)
        topic = bytes(body[at + 2 : at + 2 + length]).decode()
        partition, first, after = _RANGE.unpack_from(body, at + 2 + length)
        covered[f"{topic}:{partition}"] = (first, after)
        at += 2 + length + _RANGE.size

    def take(dtype: str, count: int) -> npt.NDArray[np.generic]:
        nonlocal at
        out = np.frombuffer(body, dtype=dtype, count=count, offset=at)
        at += out.nbytes
        return out

    buckets = take("<i4", rows).astype(np.int32)
    if rows and (buckets[0] < 0 or buckets[-1] >= shape.n_buckets):
        raise ValueError(f"a bucket outside [0, {shape.n_buckets})")
    if rows > 1 and not bool(np.all(np.diff(buckets) > 0)):
        raise ValueError("buckets are not strictly increasing")
    lin = take("<f4", rows * shape.lin_width).astype(np.float64).reshape(rows, shape.lin_width)
    v = take("<f4", rows * shape.k).astype(np.float64).reshape(rows, shape.k)
    acc_rows = rows if shape.has_acc else 0
    width = shape.acc_width
    v_acc = take("<f4", acc_rows * width).astype(np.float64).reshape(acc_rows, width)
    base_lin = take("<f4", rows).astype(np.float64)
    base_acc = take("<f4", rows).astype(np.float64)
    bias = take("<f8", n_bias + 1).astype(np.float64) if n_bias else np.zeros(kernel.N_BIAS + 1)
    if at != len(body):
        raise ValueError(f"{len(body) - at} bytes after the last array")
    bases = Bases(base_lin, base_acc, float(bias[-1]))
    bias = bias[:-1]
    if len(bias) != kernel.N_BIAS:
        raise ValueError(f"an intercept of {len(bias)} values, expected {kernel.N_BIAS}")
    if not all(np.isfinite(a).all() for a in (lin, v, v_acc, bias, base_lin, base_acc, bias)):
        raise ValueError("a value that is not finite")
    delta = Delta(buckets, lin, v, v_acc, bias, learned)
    return Update(writer, seq, shape, delta, bases, round_id, covered, part, parts)
