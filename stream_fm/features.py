"""Event features -> hashed bucket indices and values.

Each feature becomes one or more ``(bucket, x)`` pairs:

- string or bool: categorical, bucket of ``"field=value"``, x = 1;
- int or float: numeric, bucket of ``"field"``, x = transform(value);
- list of strings: multi-hot, one ``"field=item"`` bucket per item, x = 1;
- None (or absent): missing, nothing.

Hashing is MurmurHash3 (32-bit) with a configurable seed, never Python's salted ``hash()``,
so a model trained in one process serves in another.

>>> hasher = FeatureHasher(bits=18, seed=1)
>>> keys, values = [], []
>>> hasher.add_features({"site": "a1", "hour": 13, "tags": ["x", "y"], "gone": None}, keys, values)
>>> keys, [round(v, 4) for v in values]
(['site=a1', 'hour', 'tags=x', 'tags=y'], [1.0, 2.6391, 1.0, 1.0])
>>> int(hasher.buckets(keys)[0]) == hasher.bucket("site=a1")
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from itertools import repeat
from typing import Any, Final

import mmh3
import numpy as np
import numpy.typing as npt
from numba import njit

from stream_fm.errors import ConfigError, InvalidEvent

NUMERIC_TRANSFORMS: Final = ("signed_log1p", "identity", "log_bucket")


def _signed_log1p(value: float) -> float:
    return math.log1p(value) if value >= 0.0 else -math.log1p(-value)


def _identity(value: float) -> float:
    return value


def check_hashing(bits: int, seed: int, numeric_transform: str, max_features: int) -> None:
    """The hashing settings' one check; ``ConfigError`` names the setting."""
    if not 1 <= bits <= 30:
        raise ConfigError("hash_bits", f"must be between 1 and 30, got {bits}")
    if numeric_transform not in NUMERIC_TRANSFORMS:
        raise ConfigError(
            "numeric_transform",
            f"must be one of {', '.join(NUMERIC_TRANSFORMS)}, got {numeric_transform!r}",
        )
    if max_features < 1:
        raise ConfigError("max_features", f"must be at least 1, got {max_features}")
    if not 0 <= seed < 2**32:
        raise ConfigError("hash_seed", f"must be between 0 and 2^32-1, got {seed}")


class FeatureHasher:
    """Turns feature mappings into hash keys and values, then keys into buckets in bulk.

    ``add_features`` appends ``"field=value"`` keys to a caller-owned list; ``buckets`` hashes
    a whole batch of keys in one compiled call. Keeping the per-feature Python work to a
    C-level ``map`` is what lets the pipeline decode well over 100k events/s.
    """

    __slots__ = ("_mask", "_transform", "bits", "max_features", "numeric_transform", "seed")

    def __init__(
        self,
        bits: int = 20,
        seed: int = 0,
        numeric_transform: str = "signed_log1p",
        max_features: int = 1000,
    ) -> None:
        check_hashing(bits, seed, numeric_transform, max_features)
        self.bits = bits
        self.seed = seed
        self.numeric_transform = numeric_transform
        self.max_features = max_features
        self._mask = (1 << bits) - 1
        self._transform: Callable[[float], float] | None = {
            "signed_log1p": _signed_log1p,
            "identity": _identity,
            "log_bucket": None,
        }[numeric_transform]

    @property
    def n_buckets(self) -> int:
        return 1 << self.bits

    def bucket(self, key: str) -> int:
        """The bucket of one key such as ``"site_id=a1b2"``."""
        return int(mmh3.hash(key, self.seed, signed=False)) & self._mask

    def buckets(self, keys: list[str]) -> npt.NDArray[np.int32]:
        """Buckets of many keys at once (MurmurHash3 x86_32, identical to ``bucket``)."""
        out = np.empty(len(keys), dtype=np.uint32)
        if not keys:
            return out.astype(np.int32)
        blob = np.frombuffer("\x00".join(keys).encode("utf-8", "surrogatepass"), dtype=np.uint8)
        if _hash_segments(blob, self.seed, out) != len(keys):
            # A key with a NUL character in it: hash one by one.
            out = np.array(
                [
                    mmh3.hash(k.encode("utf-8", "surrogatepass"), self.seed, signed=False)
                    for k in keys
                ],
                dtype=np.uint32,
            )
        return (out & np.uint32(self._mask)).astype(np.int32)

    def add_features(
        self, features: Mapping[str, Any], keys: list[str], values: list[float]
    ) -> None:
        """Append the features' hash keys and x values; raise InvalidEvent if one is bad.

        On error what was appended is unspecified: callers drop the lists.
        """
        n = len(features)
        if n > self.max_features:
            raise InvalidEvent("too_many_features", f"{n} > {self.max_features}")
        before = len(keys)
        try:
            # All-string features, the common case, never leave C: "field=value" for each.
            keys += map(_join, features.items())
        except TypeError:
            del keys[before:]
            self._add_mixed(features, keys, values)
            return
        if "" in features:
            raise InvalidEvent("bad_feature_name", "empty feature name")
        values += repeat(1.0, n)

    def _add_mixed(self, features: Mapping[str, Any], keys: list[str], values: list[float]) -> None:
        append_key = keys.append
        append_value = values.append
        transform = self._transform
        for name, value in features.items():
            if not name:
                raise InvalidEvent("bad_feature_name", "empty feature name")
            kind = type(value)
            if kind is str:
                append_key(name + "=" + value)
                append_value(1.0)
            elif kind is int or kind is float:
                if kind is float and not math.isfinite(value):
                    raise InvalidEvent("non_finite_number", f"feature {name!r}")
                if transform is None:
                    append_key(name + "=" + _log_bucket(value))
                    append_value(1.0)
                else:
                    append_key(name)
                    append_value(transform(value))
            elif value is None:
                continue
            elif kind is bool:
                append_key(name + ("=true" if value else "=false"))
                append_value(1.0)
            elif kind is list:
                for item in value:
                    if type(item) is not str:
                        raise InvalidEvent(
                            "bad_feature_list", f"feature {name!r} has a non-string list item"
                        )
                    append_key(name + "=" + item)
                    append_value(1.0)
            elif kind is dict:
                raise InvalidEvent("nested_feature", f"feature {name!r} is an object")
            else:
                raise InvalidEvent(
                    "bad_feature_value", f"feature {name!r} has type {kind.__name__}"
                )


_join = "=".join


def _log_bucket(value: float) -> str:
    """Criteo-style bucket: small values kept exact, larger ones by floor(log(v)^2)."""
    if value < 2.0 and value > -2.0:
        return str(int(value))
    magnitude = int(math.log(abs(value)) ** 2)
    return f"b{magnitude}" if value > 0 else f"n{magnitude}"


# MurmurHash3 x86_32 (Appleby, public domain), the same function mmh3 computes.
@njit(cache=True, nogil=True)
def _rotl(x: Any, r: int) -> Any:
    return ((x << np.uint32(r)) | (x >> np.uint32(32 - r))) & np.uint32(0xFFFFFFFF)


@njit(cache=True, nogil=True)
def murmur3_32(blob: Any, start: int, length: int, seed: Any) -> Any:
    """MurmurHash3 x86_32 of ``blob[start:start + length]`` (a uint8 array)."""
    c1 = np.uint32(0xCC9E2D51)
    c2 = np.uint32(0x1B873593)
    h = np.uint32(seed)
    nblocks = length // 4
    for b in range(nblocks):
        p = start + 4 * b
        k = (
            np.uint32(blob[p])
            | (np.uint32(blob[p + 1]) << np.uint32(8))
            | (np.uint32(blob[p + 2]) << np.uint32(16))
            | (np.uint32(blob[p + 3]) << np.uint32(24))
        )
        k = (k * c1) & np.uint32(0xFFFFFFFF)
        k = _rotl(k, 15)
        k = (k * c2) & np.uint32(0xFFFFFFFF)
        h ^= k
        h = _rotl(h, 13)
        h = (h * np.uint32(5) + np.uint32(0xE6546B64)) & np.uint32(0xFFFFFFFF)
    tail = start + 4 * nblocks
    rem = length & 3
    k = np.uint32(0)
    if rem >= 3:
        k ^= np.uint32(blob[tail + 2]) << np.uint32(16)
    if rem >= 2:
        k ^= np.uint32(blob[tail + 1]) << np.uint32(8)
    if rem >= 1:
        k ^= np.uint32(blob[tail])
        k = (k * c1) & np.uint32(0xFFFFFFFF)
        k = _rotl(k, 15)
        k = (k * c2) & np.uint32(0xFFFFFFFF)
        h ^= k
    h ^= np.uint32(length)
    h ^= h >> np.uint32(16)
    h = (h * np.uint32(0x85EBCA6B)) & np.uint32(0xFFFFFFFF)
    h ^= h >> np.uint32(13)
    h = (h * np.uint32(0xC2B2AE35)) & np.uint32(0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    return h


@njit(cache=True, nogil=True)
def _hash_segments(blob: Any, seed: int, out: Any) -> int:
    """MurmurHash3 x86_32 of each NUL-separated segment of blob; returns segment count."""
    n = blob.shape[0]
    count = 0
    start = 0
    for i in range(n + 1):
        if i == n or blob[i] == 0:
            if count >= out.shape[0]:
                return count + 1
            out[count] = murmur3_32(blob, start, i - start, seed)
            count += 1
            start = i + 1
    return count
