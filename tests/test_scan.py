"""The compiled scanner against the decoder: a row it reads is exactly what decoding the
record one by one gives; anything else is handed back (FALLBACK), never guessed."""

from __future__ import annotations

import random

import numpy as np
import pytest

from stream_fm.errors import InvalidEvent
from stream_fm.events import Click, EventDecoder, Impression, Labeled
from stream_fm.features import FeatureHasher
from stream_fm.scan import CLICK, FALLBACK, IMPRESSION, LABELED, scan
from stream_fm.tools.simulate import SimulationParams, Simulator

HASHER = FeatureHasher(bits=18, seed=5, max_features=12)
DECODER = EventDecoder(HASHER, max_event_bytes=400)

SHAPES = [
    b'{"type":"impression","id":"i1","ts":12,"features":{"a":"x","b":true,"c":null,'
    b'"d":["p","q"],"e":[],"f":false}}',
    b'{"type":"click","id":"i1","ts":13}',
    b'{"type":"labeled","id":"l","ts":0,"label":1,"features":{"z":"1"}}',
    b' { "ts" : 5 , "features" : { } , "id" : "k" , "type" : "impression" } \n',
    b'{"type":"labeled","id":"l","ts":3,"label":false,"features":{"z":"1","y":false}}',
]
ALPHABET = b'{}[]":,truefalsn0123456789 \\\x00\xc3\xa9-.eE"abtypeidfeatureslabel'
PIECES = [b'"f":"v",', b',"ts":4', b"1", b'"', b"e5", b".0", b'{"a":1}', b'["x",1]',
          b',"type":"click"', b'"a":"b"', b',"label":0', b',"x":"y"', b"\\u0041"]  # fmt: skip


def _mutated(rng: random.Random) -> bytes:
    s = bytearray(rng.choice(SHAPES))
    for _ in range(rng.randint(1, 3)):
        op, pos = rng.random(), rng.randrange(len(s) + 1)
        if op < 0.4 and s:
            del s[min(pos, len(s) - 1)]
        elif op < 0.8:
            s[pos:pos] = bytes([rng.choice(ALPHABET)])
        else:
            s[pos:pos] = rng.choice(PIECES)
    return bytes(s)


def _agrees(records: list[bytes], latest_ts_ms: int = 7_258_118_400_000) -> int:
    """Asserts every row the scanner read equals the decoder's event; returns rows read."""
    columns = scan(records, HASHER, DECODER.max_event_bytes, latest_ts_ms)
    read = 0
    for row, raw in enumerate(records):
        kind = int(columns.kind[row])
        if kind == FALLBACK:
            continue
        read += 1
        event = DECODER.decode(raw, latest_ts_ms)  # raises if the scanner accepted a bad one
        a, b = columns.indptr[row], columns.indptr[row + 1]
        assert (event.id, event.ts_ms) == (columns.id_of(row), int(columns.ts[row])), raw
        if kind == CLICK:
            assert type(event) is Click and a == b, raw
            continue
        assert type(event) is (Impression if kind == IMPRESSION else Labeled), raw
        assert isinstance(event, Impression | Labeled)
        assert HASHER.buckets(event.keys).tolist() == columns.indices[a:b].tolist(), raw
        assert event.values == columns.values[a:b].tolist(), raw
        if kind == LABELED:
            assert isinstance(event, Labeled) and event.label == int(columns.label[row]), raw
    return read


def test_the_canonical_shapes_are_read_not_handed_back() -> None:
    assert _agrees(SHAPES) == len(SHAPES)


def test_simulated_events_are_all_read() -> None:
    simulator = Simulator(SimulationParams(n_impressions=2000, n_fields=20, seed=3))
    records = [__import__("orjson").dumps(e) for e in simulator.events()]
    hasher = FeatureHasher(bits=18)
    columns = scan(records, hasher)
    assert (columns.kind != FALLBACK).all()


@pytest.mark.parametrize("seed", range(4))
def test_mutated_records_are_read_exactly_or_handed_back(seed: int) -> None:
    rng = random.Random(seed)
    records = [_mutated(rng) for _ in range(5000)]
    assert _agrees(records) > 50  # some mutations stay valid and are read


def test_what_the_decoder_rejects_is_handed_back() -> None:
    bad = [
        b"", b"  ", b"[]", b'{"type":"view","id":"x","ts":1}', b'{"type":"click","id":"","ts":1}',
        b'{"type":"click","id":"x","ts":-1}', b'{"type":"click","id":"x","ts":1.0}',
        b'{"type":"click","id":"x","ts":01}', b'{"type":"click","id":"x"}',
        b'{"type":"impression","id":"x","ts":1,"features":{"":"v"}}',
        b'{"type":"impression","id":"x","ts":1,"features":{"a":{"b":"c"}}}',
        b'{"type":"labeled","id":"x","ts":1,"label":2,"features":{}}',
        b'{"type":"click","id":"x","ts":1}x', b'{"type":"click","id":"x","ts":1',
        b'{"type":"impression","id":"x","ts":1,"features":{' + b",".join(
            b'"f%d":"v"' % i for i in range(13)) + b"}}",  # more than max_features
        b'{"type":"impression","id":"x","ts":1,"features":{"a":"' + b"v" * 400 + b'"}}',
    ]  # fmt: skip
    columns = scan(bad, HASHER, DECODER.max_event_bytes)
    assert columns.kind.tolist() == [FALLBACK] * len(bad)
    for raw in bad:
        with pytest.raises(InvalidEvent):
            DECODER.decode(raw)


def test_a_repeated_feature_name_goes_to_the_decoder() -> None:
    record = b'{"type":"impression","id":"x","ts":1,"features":{"a":"x","b":"z","a":"y"}}'
    assert scan([record], HASHER).kind.tolist() == [FALLBACK]
    assert DECODER.decode(record).keys == ["a=y", "b=z"]  # JSON's last one wins, first place


def test_escapes_non_ascii_and_numbers_go_to_the_decoder_and_still_decode() -> None:
    records = [
        b'{"type":"impression","id":"x","ts":1,"features":{"a":"\\u00e9"}}',
        '{"type":"impression","id":"x","ts":1,"features":{"a":"é"}}'.encode(),
        b'{"type":"impression","id":"x","ts":1,"features":{"bid":0.42}}',
    ]
    columns = scan(records, HASHER)
    assert columns.kind.tolist() == [FALLBACK] * 3
    assert all(type(DECODER.decode(r)) is Impression for r in records)


def test_the_clock_bound_hands_future_timestamps_back() -> None:
    records = [b'{"type":"click","id":"x","ts":1000}', b'{"type":"click","id":"x","ts":1001}']
    assert scan(records, HASHER, latest_ts_ms=1000).kind.tolist() == [CLICK, FALLBACK]
    assert _agrees(records, latest_ts_ms=1000) == 1


def test_buckets_match_the_hasher_for_every_key_length() -> None:
    values = ["v" * n for n in range(12)]  # keys of 3 to 14 bytes: every murmur tail
    features = b",".join(b'"f%d":"%s"' % (i, v.encode()) for i, v in enumerate(values))
    record = b'{"type":"impression","id":"x","ts":1,"features":{' + features + b"}}"
    columns = scan([record], HASHER)
    assert columns.indices.tolist() == [HASHER.bucket(f"f{i}={v}") for i, v in enumerate(values)]
    assert np.array_equal(columns.values, np.ones(12))
