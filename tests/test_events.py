"""Decoding: every malformed form gets its own reason; good events keep their fields."""

from __future__ import annotations

import pytest

from stream_fm.errors import InvalidEvent
from stream_fm.events import REASONS, Click, EventDecoder, Impression, Labeled
from stream_fm.features import FeatureHasher


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(FeatureHasher(bits=16, seed=3, max_features=50), max_event_bytes=2048)


MALFORMED = [
    pytest.param(
        b'{"type":"click","id":"' + b"x" * 3000 + b'","ts":1}', "too_large", id="over-size-limit"
    ),
    pytest.param(b"", "empty", id="empty"),
    pytest.param(b"   \n", "empty", id="whitespace"),
    pytest.param(b'{"type":"click","id":"\xff\xfe","ts":1}', "not_utf8", id="bad-utf8"),
    pytest.param(b"{type: click}", "not_json", id="not-json"),
    pytest.param(b'{"type":"click","id":"a","ts":1', "not_json", id="truncated-json"),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{"bid":NaN}}',
        "non_finite_number",
        id="nan",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{"bid":Infinity}}',
        "non_finite_number",
        id="infinity",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{"bid":1e400}}',
        "non_finite_number",
        id="overflow-to-inf",
    ),
    pytest.param(b'[{"type":"click"}]', "not_object", id="array"),
    pytest.param(b'"click"', "not_object", id="string"),
    pytest.param(b"42", "not_object", id="number"),
    pytest.param(b'{"id":"a","ts":1}', "missing_type", id="missing-type"),
    pytest.param(b'{"type":"view","id":"a","ts":1}', "unknown_type", id="unknown-type"),
    pytest.param(b'{"type":7,"id":"a","ts":1}', "unknown_type", id="type-not-string"),
    pytest.param(b'{"type":"click","ts":1}', "missing_id", id="missing-id"),
    pytest.param(b'{"type":"click","id":17,"ts":1}', "bad_id", id="id-not-string"),
    pytest.param(b'{"type":"click","id":"","ts":1}', "bad_id", id="id-empty"),
    pytest.param(b'{"type":"click","id":"a"}', "missing_ts", id="missing-ts"),
    pytest.param(b'{"type":"click","id":"a","ts":"2024-11-24"}', "bad_ts", id="ts-string"),
    pytest.param(b'{"type":"click","id":"a","ts":1.5}', "bad_ts", id="ts-float"),
    pytest.param(b'{"type":"click","id":"a","ts":true}', "bad_ts", id="ts-bool"),
    pytest.param(b'{"type":"click","id":"a","ts":-5}', "ts_out_of_range", id="ts-negative"),
    pytest.param(
        b'{"type":"click","id":"a","ts":1732406400123000000}',
        "ts_out_of_range",
        id="ts-nanoseconds",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1}', "missing_features", id="missing-features"
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":[1,2]}',
        "bad_features",
        id="features-array",
    ),
    pytest.param(
        b'{"type":"labeled","id":"a","ts":1,"features":{}}', "missing_label", id="missing-label"
    ),
    pytest.param(
        b'{"type":"labeled","id":"a","ts":1,"label":2,"features":{}}', "bad_label", id="label-2"
    ),
    pytest.param(
        b'{"type":"labeled","id":"a","ts":1,"label":"yes","features":{}}',
        "bad_label",
        id="label-string",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{"geo":{"city":"x"}}}',
        "nested_feature",
        id="nested-object",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{"tags":["a",3]}}',
        "bad_feature_list",
        id="list-with-number",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{"tags":[["a"]]}}',
        "bad_feature_list",
        id="nested-list",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{"":"x"}}',
        "bad_feature_name",
        id="empty-feature-name",
    ),
    pytest.param(
        b'{"type":"impression","id":"a","ts":1,"features":{'
        + b",".join(b'"f%d":1' % i for i in range(60))
        + b"}}",
        "too_many_features",
        id="too-many-features",
    ),
]


@pytest.mark.parametrize(("raw", "reason"), MALFORMED)
def test_malformed_event_gets_its_reason(decoder: EventDecoder, raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decoder.decode(raw)
    assert caught.value.reason == reason
    assert reason in REASONS


def test_at_least_twenty_malformed_forms_are_covered() -> None:
    assert len(MALFORMED) >= 20
    assert len({p.values[1] for p in MALFORMED}) >= 20


def test_impression_features_of_every_kind(decoder: EventDecoder) -> None:
    event = decoder.decode(
        b'{"type":"impression","id":"imp-1","ts":1732406400123,"features":'
        b'{"site":"a1","hour":13,"bid":0.42,"mobile":true,"tags":["x","y"],"gone":null}}'
    )
    assert isinstance(event, Impression)
    assert (event.id, event.ts_ms) == ("imp-1", 1732406400123)
    assert event.keys == ["site=a1", "hour", "bid", "mobile=true", "tags=x", "tags=y"]
    hasher = decoder.hasher
    assert hasher.buckets(event.keys).tolist() == [hasher.bucket(k) for k in event.keys]
    assert event.values[0] == 1.0 and event.values[3:] == [1.0, 1.0, 1.0]
    assert event.values[1] == pytest.approx(2.6390573296)  # log1p(13)


def test_click_and_labeled(decoder: EventDecoder) -> None:
    assert decoder.decode(b'{"type":"click","id":"imp-1","ts":5}') == Click("imp-1", 5)
    labeled = decoder.decode(
        b'{"type":"labeled","id":"ex-9","ts":5,"label":true,"features":{"a":"b"}}'
    )
    assert isinstance(labeled, Labeled) and labeled.label == 1
    assert labeled.keys == ["a=b"]


def test_extra_fields_are_ignored(decoder: EventDecoder) -> None:
    event = decoder.decode(b'{"type":"click","id":"a","ts":5,"campaign":"c9"}')
    assert event == Click("a", 5)


def test_bulk_hashing_equals_one_by_one() -> None:
    hasher = FeatureHasher(bits=24, seed=99)
    keys = [
        "",
        "a",
        "ab",
        "abc",
        "abcd",
        "abcde",
        "ñandú=€",
        "site_id=a1b2",
        "nul\x00inside",
        "x" * 300,
    ]
    assert hasher.buckets(keys).tolist() == [hasher.bucket(k) for k in keys]
    assert hasher.buckets([]).tolist() == []


def test_all_string_fast_path_and_mixed_path_agree() -> None:
    hasher = FeatureHasher(bits=16)
    fast_keys: list[str] = []
    fast_values: list[float] = []
    hasher.add_features({"a": "1", "b": "2"}, fast_keys, fast_values)
    mixed_keys: list[str] = []
    mixed_values: list[float] = []
    hasher.add_features({"a": "1", "b": "2", "c": None}, mixed_keys, mixed_values)
    assert (fast_keys, fast_values) == (mixed_keys, mixed_values) == (["a=1", "b=2"], [1.0, 1.0])


def test_hash_is_stable_across_processes() -> None:
    # Known answers: a model trained in one process must find the same buckets in another,
    # so these never change (Python's salted hash() would).
    assert FeatureHasher(bits=20, seed=0).bucket("site_id=a1b2") == 702688
    assert FeatureHasher(bits=20, seed=1).bucket("site_id=a1b2") == 816025
    assert FeatureHasher(bits=30, seed=42).bucket("hour") == 243892351


def test_a_ts_too_far_ahead_of_the_clock_is_refused_only_when_a_clock_is_given() -> None:
    hour_ms = 3_600_000
    decoder = EventDecoder(FeatureHasher(bits=16), max_future_skew_ms=hour_ms)
    now = 1_732_406_400_000
    latest = decoder.latest_ts_ms(now)
    ok = b'{"type":"click","id":"a","ts":%d}' % (now + hour_ms)
    ahead = b'{"type":"click","id":"a","ts":%d}' % (now + hour_ms + 1)
    assert decoder.decode(ok, latest).ts_ms == now + hour_ms
    with pytest.raises(InvalidEvent) as refused:
        decoder.decode(ahead, latest)
    assert refused.value.reason == "ts_in_future"
    # A file replayed has no "now": years-old and far-future files alike are read as they are.
    assert decoder.decode(ahead, decoder.latest_ts_ms(None)).ts_ms == now + hour_ms + 1
    # 0 turns the check off.
    off = EventDecoder(FeatureHasher(bits=16), max_future_skew_ms=0)
    assert off.decode(ahead, off.latest_ts_ms(now)).ts_ms == now + hour_ms + 1
    assert "ts_in_future" in REASONS
