"""The compiled partitioner picks the partitions Kafka's default partitioner picks."""

from __future__ import annotations

import random

import pytest

from stream_fm.kafka.partitioner import key_partitions


def murmur2(data: bytes) -> int:
    """Kafka's Utils.murmur2 (Java), written out plainly as the reference."""
    m, r, mask = 0x5BD1E995, 24, 0xFFFFFFFF
    h = (0x9747B28C ^ len(data)) & mask
    whole = len(data) // 4 * 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = (h * m) & mask
        h ^= k
    tail = data[whole:]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def test_the_reference_matches_kafkas_published_values() -> None:
    # From Kafka's UtilsTest.testMurmur2 (signed 32-bit results).
    for text, expected in [
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
    ]:
        value = murmur2(text.encode())
        assert (value - (1 << 32) if value >= 1 << 31 else value) == expected, text


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_same_partition_as_kafkas_default_partitioner(n: int) -> None:
    rng = random.Random(n)
    keys = [b"", b"a", b"imp-1"] + [rng.randbytes(rng.randrange(1, 300)) for _ in range(2000)]
    assert key_partitions(keys, n) == [(murmur2(k) & 0x7FFFFFFF) % n for k in keys]
