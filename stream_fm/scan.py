"""A batch of record bytes -> columns (kind, id, ts, label, hashed features), compiled.

``scan`` reads every record of a batch in one compiled pass over their concatenated bytes:
the event's type, id, ts and label, and each feature's bucket (MurmurHash3 of
``"field=value"``, as ``FeatureHasher`` computes it) straight from the bytes, with no Python
object per record or feature. It understands the shape events have in practice - one JSON
object of ``type``, ``id``, ``ts``, ``features`` (and ``label``), ASCII strings without
escapes, categorical, boolean, null or string-list features - and nothing else: a record
outside that shape, or one that could be invalid, is handed back (``FALLBACK``) and
``EventDecoder`` decodes it, so the columns are exactly what decoding each record one by one
gives, and every invalid record gets the decoder's reason.

>>> import numpy as np
>>> from stream_fm.features import FeatureHasher
>>> hasher = FeatureHasher(bits=16)
>>> columns = scan([b'{"type":"impression","id":"a","ts":5,"features":{"site":"s1"}}',
...                 b'{"type":"click","id":"a","ts":9}', b'{"type":"impression"'], hasher)
>>> columns.kind.tolist(), columns.ts.tolist()[:2], columns.id_of(0)
([1, 2, -1], [5, 9], 'a')
>>> int(columns.indices[0]) == hasher.bucket("site=s1")
True
"""

# ruff: noqa: SIM109, SIM110 - compiled code: numba takes loops, not all()/any()/in

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, NamedTuple

import numpy as np
import numpy.typing as npt
from numba import njit

from stream_fm.events import MAX_ID_CHARS, MAX_TS_MS
from stream_fm.features import FeatureHasher, murmur3_32

FALLBACK: Final = -1  # not understood here: decode it one by one (EventDecoder)
INVALID: Final = 0  # set by the caller: rejected
IMPRESSION: Final = 1
CLICK: Final = 2
LABELED: Final = 3

# Byte values of the JSON the scanner understands.
_QUOTE, _COLON, _COMMA, _LBRACE, _RBRACE = 34, 58, 44, 123, 125
_LBRACKET, _RBRACKET, _BACKSLASH, _EQUALS = 91, 93, 92, 61
# Top-level keys, as a bit each (a repeated key is handed back: JSON's last-one-wins).
_K_TYPE, _K_ID, _K_TS, _K_FEATURES, _K_LABEL = 1, 2, 4, 8, 16
# Records with more features than this check repeated names by sorting, not pairwise.
_PAIRWISE_MAX: Final = 48


class Columns(NamedTuple):
    """One batch as columns; row ``i`` of the CSR arrays holds record ``i``'s features."""

    kind: npt.NDArray[np.int8]  # IMPRESSION, CLICK, LABELED or FALLBACK
    ts: npt.NDArray[np.int64]
    label: npt.NDArray[np.int8]
    id_start: npt.NDArray[np.int64]  # the id's bytes in ``text``
    id_end: npt.NDArray[np.int64]
    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]
    text: str  # the batch's bytes as latin-1 (the ids are ASCII)

    def id_of(self, row: int) -> str:
        return self.text[int(self.id_start[row]) : int(self.id_end[row])]

    def ids(self) -> list[str]:
        """Every row's id ("" where the row has none): one slice per row."""
        text = self.text
        return [
            text[a:b] for a, b in zip(self.id_start.tolist(), self.id_end.tolist(), strict=True)
        ]


def scan(
    values: Sequence[bytes],
    hasher: FeatureHasher,
    max_event_bytes: int = 65_536,
    latest_ts_ms: int = MAX_TS_MS,
) -> Columns:
    """Columns of ``values``; rows the scanner hands back are ``FALLBACK`` and empty."""
    n = len(values)
    blob = b"".join(values)
    ends = np.cumsum(np.fromiter(map(len, values), np.int64, n))
    data = np.frombuffer(blob, dtype=np.uint8)
    kind = np.empty(n, dtype=np.int8)
    ts = np.zeros(n, dtype=np.int64)
    label = np.zeros(n, dtype=np.int8)
    id_start = np.zeros(n, dtype=np.int64)
    id_end = np.zeros(n, dtype=np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    # A feature takes at least 4 bytes of JSON ("a",), so this bound is never exceeded.
    buckets = np.empty(len(blob) // 4 + 1, dtype=np.uint32)
    scratch = np.empty(max(max_event_bytes, 16), dtype=np.uint8)
    names = np.empty(hasher.max_features + 1, dtype=np.uint32)
    _scan(
        data, ends, np.uint32(hasher.seed), max_event_bytes, hasher.max_features,
        min(latest_ts_ms, MAX_TS_MS), kind, ts, label, id_start, id_end, indptr, buckets,
        scratch, names,
    )  # fmt: skip
    nnz = int(indptr[-1])
    indices = (buckets[:nnz] & np.uint32((1 << hasher.bits) - 1)).astype(np.int32)
    return Columns(
        kind, ts, label, id_start, id_end, indptr, indices, np.ones(nnz), blob.decode("latin-1")
    )


@njit(cache=True, nogil=True)
def _ws(b: Any, i: int, end: int) -> int:
    while i < end and (b[i] == 32 or b[i] == 10 or b[i] == 13 or b[i] == 9):
        i += 1
    return i


@njit(cache=True, nogil=True)
def _string(b: Any, i: int, end: int) -> int:
    """``b[i]`` opens a string: the index of its closing quote, or -1 if the string has
    escapes, control characters or non-ASCII bytes (or never closes)."""
    i += 1
    while i < end:
        c = b[i]
        if c == _QUOTE:
            return i
        if c == _BACKSLASH or c < 32 or c >= 128:
            return -1
        i += 1
    return -1


@njit(cache=True, nogil=True)
def _is(b: Any, s: int, e: int, word: Any) -> bool:
    if e - s != word.shape[0]:
        return False
    for j in range(word.shape[0]):
        if b[s + j] != word[j]:
            return False
    return True


_TYPE = np.frombuffer(b"type", dtype=np.uint8)
_ID = np.frombuffer(b"id", dtype=np.uint8)
_TS = np.frombuffer(b"ts", dtype=np.uint8)
_FEATURES = np.frombuffer(b"features", dtype=np.uint8)
_LABEL = np.frombuffer(b"label", dtype=np.uint8)
_IMPRESSION = np.frombuffer(b"impression", dtype=np.uint8)
_CLICK = np.frombuffer(b"click", dtype=np.uint8)
_LABELED = np.frombuffer(b"labeled", dtype=np.uint8)
_TRUE = np.frombuffer(b"true", dtype=np.uint8)
_FALSE = np.frombuffer(b"false", dtype=np.uint8)
_NULL = np.frombuffer(b"null", dtype=np.uint8)


@njit(cache=True, nogil=True)
def _ends_value(b: Any, i: int, end: int) -> bool:
    """A scalar token may end here (JSON needs a delimiter or whitespace after it)."""
    if i >= end:
        return False
    c = b[i]
    return bool(
        c == _COMMA or c == _RBRACE or c == _RBRACKET or c == 32 or c == 10 or c == 13 or c == 9
    )


@njit(cache=True, nogil=True)
def _literal(b: Any, i: int, end: int, word: Any) -> int:
    """The index after ``word`` if it starts at ``i`` and ends there, else -1."""
    n = word.shape[0]
    if i + n > end or not _is(b, i, i + n, word):
        return -1
    return i + n if _ends_value(b, i + n, end) else -1


@njit(cache=True, nogil=True)
def _key(scratch: Any, b: Any, s: int, e: int, vs: int, ve: int, seed: Any) -> Any:
    """MurmurHash3 of ``name=value`` from the name's and the value's bytes."""
    n = e - s
    for j in range(n):
        scratch[j] = b[s + j]
    scratch[n] = _EQUALS
    m = ve - vs
    for j in range(m):
        scratch[n + 1 + j] = b[vs + j]
    return murmur3_32(scratch, 0, n + 1 + m, seed)


@njit(cache=True, nogil=True)
def _repeated(names: Any, count: int) -> bool:
    if count <= _PAIRWISE_MAX:
        for x in range(count):
            for y in range(x):
                if names[x] == names[y]:
                    return True
        return False
    ordered = np.sort(names[:count])
    for x in range(1, count):
        if ordered[x] == ordered[x - 1]:
            return True
    return False


@njit(cache=True, nogil=True)
def _features(
    b: Any, i: int, end: int, seed: Any, max_features: int, buckets: Any, pos: int,
    scratch: Any, names: Any,
) -> tuple[int, int]:  # fmt: skip
    """``b[i]`` opens the features object: (index after it, buckets written up to), or
    (-1, pos) if it holds anything but strings, booleans, nulls and lists of strings."""
    i = _ws(b, i + 1, end)
    count = 0
    if i < end and b[i] == _RBRACE:
        return i + 1, pos
    while i < end:
        if b[i] != _QUOTE:
            return -1, pos
        s = i + 1
        e = _string(b, i, end)
        if e <= s:  # an escape, or an empty name (the decoder rejects it)
            return -1, pos
        if count >= max_features:
            return -1, pos
        names[count] = murmur3_32(b, s, e - s, np.uint32(0x9747B28C))
        count += 1
        i = _ws(b, e + 1, end)
        if i >= end or b[i] != _COLON:
            return -1, pos
        i = _ws(b, i + 1, end)
        if i >= end:
            return -1, pos
        c = b[i]
        if c == _QUOTE:
            ve = _string(b, i, end)
            if ve < 0:
                return -1, pos
            buckets[pos] = _key(scratch, b, s, e, i + 1, ve, seed)
            pos += 1
            i = ve + 1
        elif c == 116 or c == 102:  # true, false
            j = _literal(b, i, end, _TRUE)
            if j >= 0:
                buckets[pos] = _key(scratch, b, s, e, i, j, seed)
            else:
                j = _literal(b, i, end, _FALSE)
                if j < 0:
                    return -1, pos
                buckets[pos] = _key(scratch, b, s, e, i, j, seed)
            pos += 1
            i = j
        elif c == 110:  # null: a missing feature
            i = _literal(b, i, end, _NULL)
            if i < 0:
                return -1, pos
        elif c == _LBRACKET:
            i = _ws(b, i + 1, end)
            if i < end and b[i] == _RBRACKET:
                i += 1
            else:
                while True:
                    if i >= end or b[i] != _QUOTE:
                        return -1, pos
                    ve = _string(b, i, end)
                    if ve < 0:
                        return -1, pos
                    buckets[pos] = _key(scratch, b, s, e, i + 1, ve, seed)
                    pos += 1
                    i = _ws(b, ve + 1, end)
                    if i < end and b[i] == _COMMA:
                        i = _ws(b, i + 1, end)
                        continue
                    if i < end and b[i] == _RBRACKET:
                        i += 1
                        break
                    return -1, pos
        else:  # a number (transformed by the decoder) or a nested object
            return -1, pos
        i = _ws(b, i, end)
        if i < end and b[i] == _COMMA:
            i = _ws(b, i + 1, end)
            continue
        if i < end and b[i] == _RBRACE:
            if _repeated(names, count):
                return -1, pos
            return i + 1, pos
        return -1, pos
    return -1, pos


@njit(cache=True, nogil=True)
def _integer(b: Any, i: int, end: int) -> tuple[int, int]:
    """A non-negative JSON integer at ``i``: (value, index after it), or (-1, -1)."""
    j = i
    value = 0
    while j < end and 48 <= b[j] <= 57:
        if j - i >= 18:
            return -1, -1
        value = value * 10 + (b[j] - 48)
        j += 1
    if j == i or (b[i] == 48 and j - i > 1) or not _ends_value(b, j, end):
        return -1, -1  # no digits, a leading zero, or a fraction/exponent follows
    return value, j


@njit(cache=True, nogil=True)
def _record(
    b: Any, start: int, end: int, seed: Any, max_features: int, latest_ts_ms: int,
    out: Any, buckets: Any, pos: int, scratch: Any, names: Any,
) -> tuple[int, int]:  # fmt: skip
    """One record: (kind, buckets written up to); ``out`` gets ts, label, id start and end."""
    i = _ws(b, start, end)
    if i >= end or b[i] != _LBRACE:
        return -1, pos
    seen = 0
    kind = -1
    first = pos
    i = _ws(b, i + 1, end)
    while i < end:
        if b[i] != _QUOTE:
            return -1, first
        s = i + 1
        e = _string(b, i, end)
        if e < 0:
            return -1, first
        i = _ws(b, e + 1, end)
        if i >= end or b[i] != _COLON:
            return -1, first
        i = _ws(b, i + 1, end)
        if i >= end:
            return -1, first
        if _is(b, s, e, _TYPE) and not seen & _K_TYPE:
            seen |= _K_TYPE
            if b[i] != _QUOTE:
                return -1, first
            ve = _string(b, i, end)
            if ve < 0:
                return -1, first
            if _is(b, i + 1, ve, _IMPRESSION):
                kind = 1
            elif _is(b, i + 1, ve, _CLICK):
                kind = 2
            elif _is(b, i + 1, ve, _LABELED):
                kind = 3
            else:
                return -1, first
            i = ve + 1
        elif _is(b, s, e, _ID) and not seen & _K_ID:
            seen |= _K_ID
            if b[i] != _QUOTE:
                return -1, first
            ve = _string(b, i, end)
            if ve <= i + 1 or ve - i - 1 > MAX_ID_CHARS:
                return -1, first
            out[2], out[3] = i + 1, ve
            i = ve + 1
        elif _is(b, s, e, _TS) and not seen & _K_TS:
            seen |= _K_TS
            value, i = _integer(b, i, end)
            if value < 0 or value > latest_ts_ms:
                return -1, first
            out[0] = value
        elif _is(b, s, e, _LABEL) and not seen & _K_LABEL:
            seen |= _K_LABEL
            j = _literal(b, i, end, _TRUE)
            if j >= 0:
                out[1] = 1
            else:
                j = _literal(b, i, end, _FALSE)
                if j >= 0:
                    out[1] = 0
                elif (b[i] == 48 or b[i] == 49) and _ends_value(b, i + 1, end):
                    out[1] = b[i] - 48
                    j = i + 1
                else:
                    return -1, first
            i = j
        elif _is(b, s, e, _FEATURES) and not seen & _K_FEATURES:
            seen |= _K_FEATURES
            if b[i] != _LBRACE:
                return -1, first
            i, pos = _features(b, i, end, seed, max_features, buckets, pos, scratch, names)
            if i < 0:
                return -1, first
        else:  # another key, or one repeated: the decoder's business
            return -1, first
        i = _ws(b, i, end)
        if i < end and b[i] == _COMMA:
            i = _ws(b, i + 1, end)
            continue
        if i < end and b[i] == _RBRACE:
            if _ws(b, i + 1, end) != end:
                return -1, first
            break
        return -1, first
    if i >= end:  # the object never closed
        return -1, first
    required = _K_TYPE | _K_ID | _K_TS
    if kind == 1 or kind == 3:
        required |= _K_FEATURES
    if kind == 3:
        required |= _K_LABEL
    if seen != required:  # something missing, or a key this type does not have
        return -1, first
    return kind, pos


@njit(cache=True, nogil=True)
def _scan(
    b: Any, ends: Any, seed: Any, max_event_bytes: int, max_features: int, latest_ts_ms: int,
    kind: Any, ts: Any, label: Any, id_start: Any, id_end: Any, indptr: Any, buckets: Any,
    scratch: Any, names: Any,
) -> None:  # fmt: skip
    out = np.zeros(4, dtype=np.int64)
    pos = 0
    start = 0
    for r in range(ends.shape[0]):
        end = ends[r]
        k = -1
        if 0 < end - start <= max_event_bytes:
            out[:] = 0
            k, pos = _record(
                b, start, end, seed, max_features, latest_ts_ms, out, buckets, pos, scratch,
                names,
            )  # fmt: skip
            if k > 0:
                ts[r], label[r], id_start[r], id_end[r] = out[0], out[1], out[2], out[3]
        kind[r] = k
        indptr[r + 1] = pos
        start = end
