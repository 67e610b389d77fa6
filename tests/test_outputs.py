"""Output records: predictions, labels, and dead letters that always fit their topic."""

from __future__ import annotations

import hashlib
from collections import namedtuple

import orjson
import pytest

from stream_fm.outputs import (
    DETAIL_BYTES,
    SAFETY_MARGIN_BYTES,
    TRUNCATED_KEY_BYTES,
    dead_letter,
    label_json,
    prediction_records,
    record_size_bytes,
)

MIB = 1 << 20


def test_prediction_record_is_the_design_json() -> None:
    S = namedtuple("S", "id p_served ts_ms model_version")
    keys, values = prediction_records([S('imp-"1"\n', 0.1234, 17, 99)])
    assert keys == [b'imp-"1"\n']
    record = orjson.loads(values[0])
    assert record == {"id": 'imp-"1"\n', "p_click": 0.1234, "ts": 17, "model_version": 99}


def test_label_record() -> None:
    L = namedtuple("L", "id label p_served impression_ts_ms label_ts_ms cause")
    record = orjson.loads(label_json(L("a", 1, 0.5, 10, 20, "click")))
    assert record == {
        "id": "a",
        "label": 1,
        "p_served": 0.5,
        "impression_ts": 10,
        "label_ts": 20,
        "cause": "click",
    }


def _dead(key: bytes | None, value: bytes | None, limit: int = MIB) -> tuple:
    return dead_letter(key, value, "too_large", "detail", "events", 2, 41, limit_bytes=limit)


def test_a_dead_letter_that_fits_keeps_its_bytes_and_names_its_source() -> None:
    key, value, headers = _dead(b"k", b'{"bad": json')
    assert (key, value) == (b"k", b'{"bad": json')
    assert dict(headers) == {
        "reason": b"too_large",
        "detail": b"detail",
        "source_topic": b"events",
        "source_partition": b"2",
        "source_offset": b"41",
    }


@pytest.mark.parametrize("size", [MIB - 600, MIB, 2_549_145, 10 * MIB])
def test_a_dead_letter_too_large_goes_out_truncated_with_size_and_digest(size: int) -> None:
    original = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    key, value, headers = _dead(b"key-1", original)
    h = dict(headers)
    assert record_size_bytes(key, value, headers) <= MIB - SAFETY_MARGIN_BYTES
    assert original.startswith(value) and len(value) > MIB // 2
    assert h["truncated"] == b"true"
    assert h["original_size"] == str(size).encode()
    assert h["original_sha256"] == hashlib.sha256(original).hexdigest().encode()


def test_an_oversized_key_is_cut_with_its_own_size_and_digest() -> None:
    huge_key = b"k" * (3 * MIB)
    key, value, headers = _dead(huge_key, b"{}")
    h = dict(headers)
    assert key == huge_key[:TRUNCATED_KEY_BYTES]
    assert value == b"{}" and "truncated" not in h
    assert h["key_original_size"] == str(3 * MIB).encode()
    assert h["key_original_sha256"] == hashlib.sha256(huge_key).hexdigest().encode()
    assert record_size_bytes(key, value, headers) <= MIB


def test_detail_is_bounded_and_stays_valid_utf8() -> None:
    _, _, headers = dead_letter(None, b"x", "bad_id", "é" * 1000, "events", 0, 1, limit_bytes=MIB)
    detail = dict(headers)["detail"]
    assert len(detail) <= DETAIL_BYTES
    assert detail.decode("utf-8") == "é" * (len(detail) // 2)


def test_a_tombstone_is_dead_lettered_as_empty_bytes() -> None:
    key, value, _ = _dead(None, None)
    assert key is None and value == b""
