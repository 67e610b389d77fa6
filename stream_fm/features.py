"""Event features -> hashed bucket indices and values.

Each feature becomes one or more ``(bucket, x)`` pairs:

- string or bool: categorical, bucket of ``"field=value"``, x = 1;
- int or float: numeric, bucket of ``"field"``, x = transform(value);
- list of strings: multi-hot, one ``"field=item"`` bucket per item, x = 1;
- None (or absent): missing, nothing.

Hashing is MurmurHash3 (32-bit) with a configurable seed, never Python's salted ``hash()``,
so a model trained in one process serves in another.

>>> hasher = FeatureHasher(bits=18, seed=1)
>>> idx, val = [], []
>>> hasher.add_features({"site": "a1", "hour": 13, "tags": ["x", "y"], "gone": None}, idx, val)
>>> len(idx), val
(4, [1.0, 2.6390573296152584, 1.0, 1.0])
>>> idx[0] == hasher.bucket("site=a1")
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Final

import mmh3
import numpy as np

from stream_fm.errors import ConfigError, InvalidEvent
from stream_fm.model.base import SparseExample

NUMERIC_TRANSFORMS: Final = ("signed_log1p", "identity", "log_bucket")

# A cache entry per distinct "field=value"; bounded so a stream of unique values
# (ids leaking into features) cannot grow memory without limit.
_CACHE_LIMIT: Final = 1 << 20


def _signed_log1p(value: float) -> float:
    return math.log1p(value) if value >= 0.0 else -math.log1p(-value)


def _identity(value: float) -> float:
    return value


class FeatureHasher:
    """Turns a feature mapping into bucket indices and values, appended to flat lists.

    Appending to caller-owned lists lets a whole batch be hashed into one CSR buffer with no
    per-example array allocation.
    """

    __slots__ = ("_cache", "_mask", "_transform", "bits", "max_features", "numeric_transform", "seed")

    def __init__(
        self,
        bits: int = 20,
        seed: int = 0,
        numeric_transform: str = "signed_log1p",
        max_features: int = 1000,
    ) -> None:
        if not 1 <= bits <= 30:
            raise ConfigError("hash_bits", f"must be between 1 and 30, got {bits}")
        if numeric_transform not in NUMERIC_TRANSFORMS:
            raise ConfigError(
                "numeric_transform",
                f"must be one of {', '.join(NUMERIC_TRANSFORMS)}, got {numeric_transform!r}",
            )
        if max_features < 1:
            raise ConfigError("max_features", f"must be at least 1, got {max_features}")
        self.bits = bits
        self.seed = seed
        self.numeric_transform = numeric_transform
        self.max_features = max_features
        self._mask = (1 << bits) - 1
        self._cache: dict[str, int] = {}
        self._transform: Callable[[float], float] | None = {
            "signed_log1p": _signed_log1p,
            "identity": _identity,
            "log_bucket": None,
        }[numeric_transform]

    @property
    def n_buckets(self) -> int:
        return 1 << self.bits

    def bucket(self, key: str) -> int:
        """The bucket of one hashed key such as ``"site_id=a1b2"``."""
        found = self._cache.get(key)
        if found is None:
            found = mmh3.hash(key, self.seed, signed=False) & self._mask
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = found
        return found

    def add_features(
        self, features: Mapping[str, Any], indices: list[int], values: list[float]
    ) -> None:
        """Append the hashed features to ``indices``/``values``; raise InvalidEvent if bad.

        On error nothing is guaranteed about what was appended: callers truncate back.
        """
        if len(features) > self.max_features:
            raise InvalidEvent("too_many_features", f"{len(features)} > {self.max_features}")
        bucket = self.bucket
        append_index = indices.append
        append_value = values.append
        transform = self._transform
        for name, value in features.items():
            kind = type(value)
            if kind is str:
                append_index(bucket(name + "=" + value))
                append_value(1.0)
            elif kind is int or kind is float:
                if kind is float and not math.isfinite(value):
                    raise InvalidEvent("non_finite_number", f"feature {name!r}")
                if transform is None:
                    append_index(bucket(name + "=" + _log_bucket(value)))
                    append_value(1.0)
                else:
                    append_index(bucket(name))
                    append_value(transform(value))
            elif value is None:
                continue
            elif kind is bool:
                append_index(bucket(name + ("=true" if value else "=false")))
                append_value(1.0)
            elif kind is list:
                for item in value:
                    if type(item) is not str:
                        raise InvalidEvent(
                            "bad_feature_list", f"feature {name!r} has a non-string list item"
                        )
                    append_index(bucket(name + "=" + item))
                    append_value(1.0)
            elif kind is dict:
                raise InvalidEvent("nested_feature", f"feature {name!r} is an object")
            else:
                raise InvalidEvent("bad_feature_value", f"feature {name!r} has type {kind.__name__}")
            if not name:
                raise InvalidEvent("bad_feature_name", "empty feature name")

    def hash_one(self, features: Mapping[str, Any]) -> SparseExample:
        """Hash one feature mapping into a ``SparseExample``."""
        indices: list[int] = []
        values: list[float] = []
        self.add_features(features, indices, values)
        return SparseExample(np.array(indices, dtype=np.int32), np.array(values, dtype=np.float64))

    def hash_pairs(self, pairs: list[tuple[str, float]]) -> SparseExample:
        """Hash pre-named ``(key, x)`` pairs, as libsvm rows give them."""
        return SparseExample(
            np.array([self.bucket(key) for key, _ in pairs], dtype=np.int32),
            np.array([x for _, x in pairs], dtype=np.float64),
        )


def _log_bucket(value: float) -> str:
    """Criteo-style bucket: small values kept exact, larger ones by floor(log(v)^2)."""
    if value < 2.0 and value > -2.0:
        return str(int(value))
    magnitude = int(math.log(abs(value)) ** 2)
    return f"b{magnitude}" if value > 0 else f"n{magnitude}"
