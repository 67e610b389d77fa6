"""AttributionJoiner: semantics case by case, then against a brute-force reference on random
streams (out-of-order ts, duplicates, evictions, a small closed-id memory), then restores."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from stream_fm.checkpoint import CheckpointStore
from stream_fm.errors import CheckpointCorrupt
from stream_fm.join import AttributionJoiner, Outcome, PendingImpression
from stream_fm.model.base import SparseExample

WINDOW = 1_000


def example(seed: int) -> SparseExample:
    n = seed % 5
    return SparseExample(
        np.arange(seed, seed + n, dtype=np.int32), np.linspace(0.5, 1.5, n, dtype=np.float64)
    )


def imp(id_: str, ts: int, seed: int = 1) -> PendingImpression:
    return PendingImpression(id_, ts, example(seed), 0.01 * (seed % 50), seed)


def summary(outcomes: object) -> list[tuple[str, int, int, str]]:
    assert isinstance(outcomes, (list, tuple))
    return [(o.impression.id, o.label, o.label_ts_ms, o.cause) for o in outcomes]


def test_click_inside_window_is_positive_at_once() -> None:
    j = AttributionJoiner(WINDOW, 10)
    assert j.add_impression(imp("a", 100)) == ()
    assert j.last_impression_accepted
    [outcome] = j.add_click("a", 1_100)  # delay == window: still inside
    assert (outcome.label, outcome.cause, outcome.label_ts_ms, outcome.delay_ms) == (
        1,
        "click",
        1_100,
        1_000,
    )
    assert j.pending_count == 0
    assert j.counters.positives == 1


def test_window_closes_only_when_watermark_passes_strictly() -> None:
    j = AttributionJoiner(WINDOW, 10)
    j.add_impression(imp("a", 100))
    assert j.advance_watermark(1_100) == ()
    assert j.pending_count == 1
    assert summary(j.advance_watermark(1_101)) == [("a", 0, 1_101, "window_closed")]
    assert j.counters.negatives_window == 1
    assert j.watermark_ms == 1_101


def test_click_before_its_impression_counts_as_delay_zero() -> None:
    j = AttributionJoiner(WINDOW, 10)
    j.add_impression(imp("a", 5_000))
    [outcome] = j.add_click("a", 4_000)
    assert outcome.label == 1
    assert outcome.label_ts_ms == 5_000
    assert outcome.delay_ms == 0


def test_click_past_the_window_closes_first_then_counts_late() -> None:
    j = AttributionJoiner(WINDOW, 10)
    j.add_impression(imp("a", 0))
    j.add_impression(imp("b", 500))
    # The click's ts closes a's window; the negative comes out of this very call.
    assert summary(j.add_click("a", 1_001)) == [("a", 0, 1_001, "window_closed")]
    assert j.counters.late_clicks == 1
    assert j.counters.positives == 0
    # Closed windows come first, then the positive.
    assert summary(j.add_click("b", 1_500)) == [("b", 1, 1_500, "click")]
    j.add_impression(imp("c", 1_600))
    assert summary(j.add_click("c", 1_700)) == [("c", 1, 1_700, "click")]


def test_late_orphan_and_duplicate_clicks_are_counted_not_learned() -> None:
    j = AttributionJoiner(WINDOW, 10)
    j.add_impression(imp("neg", 0))
    j.add_impression(imp("pos", 0))
    j.add_click("pos", 10)
    assert j.add_click("pos", 20) == ()  # second click on a positive
    assert j.add_click("nobody", 30) == ()
    assert len(j.advance_watermark(5_000)) == 1
    assert j.add_click("neg", 5_000) == ()
    c = j.counters
    assert (c.duplicate_clicks, c.orphan_clicks, c.late_clicks, c.positives) == (1, 1, 1, 1)


def test_duplicate_impressions_pending_or_closed_are_ignored() -> None:
    j = AttributionJoiner(WINDOW, 10)
    first = imp("a", 0)
    j.add_impression(first)
    assert j.add_impression(imp("a", 10)) == ()
    assert not j.last_impression_accepted
    assert j.get_pending("a") is first
    [outcome] = j.add_click("a", 20)
    assert outcome.impression is first
    j.add_impression(imp("a", 30))  # closed as positive: still a duplicate
    assert j.counters.duplicate_impressions == 2
    assert j.pending_count == 0
    j.add_impression(imp("b", 30))
    assert j.last_impression_accepted


def test_forgotten_ids_become_orphans_and_can_be_reused() -> None:
    j = AttributionJoiner(WINDOW, 10, max_closed_ids=2)
    for i, name in enumerate("abc"):
        j.add_impression(imp(name, i))
    assert len(j.advance_watermark(10_000)) == 3
    j.add_click("a", 10_000)  # "a" fell out of the 2-id memory
    j.add_click("c", 10_000)
    assert (j.counters.orphan_clicks, j.counters.late_clicks) == (1, 1)
    j.add_impression(imp("a", 10_001))
    assert j.last_impression_accepted


def test_overflow_evicts_oldest_by_ts_then_arrival_never_the_newcomer() -> None:
    j = AttributionJoiner(WINDOW, 3)
    j.add_impression(imp("t5-first", 5))
    j.add_impression(imp("t9", 9))
    j.add_impression(imp("t5-second", 5))
    # The newcomer has the smallest ts, but it is not the one evicted.
    assert summary(j.add_impression(imp("t1", 1))) == [("t5-first", 0, 9, "evicted")]
    assert summary(j.add_impression(imp("t2", 2))) == [("t1", 0, 9, "evicted")]
    assert summary(j.add_impression(imp("t3", 3))) == [("t2", 0, 9, "evicted")]
    assert summary(j.add_impression(imp("t20", 20))) == [("t3", 0, 20, "evicted")]
    assert j.counters.evicted == 4
    assert j.pending_count == 3
    assert j.add_click("t1", 21) == ()  # already learned as negative
    assert j.counters.late_clicks == 1


def test_flush_learns_everything_pending_oldest_first() -> None:
    j = AttributionJoiner(WINDOW, 10)
    for name, ts in [("b", 20), ("a", 10), ("c", 20), ("d", 15)]:
        j.add_impression(imp(name, ts))
    j.add_click("d", 25)
    assert summary(j.flush()) == [
        ("a", 0, 25, "flushed"),
        ("b", 0, 25, "flushed"),
        ("c", 0, 25, "flushed"),
    ]
    assert j.pending_count == 0
    assert j.counters.flushed == 3
    assert j.flush() == []
    assert j.add_click("a", 30) == ()
    assert j.counters.late_clicks == 1


def test_impression_arriving_after_its_window_closed_goes_out_with_the_next_call() -> None:
    j = AttributionJoiner(WINDOW, 10)
    j.add_impression(imp("fresh", 5_000))
    assert j.add_impression(imp("stale", 100)) == ()  # never returned by its own call
    assert j.last_impression_accepted
    assert summary(j.add_click("stale", 150)) == [("stale", 0, 5_000, "window_closed")]
    assert j.counters.late_clicks == 1


def test_nothing_due_allocates_nothing() -> None:
    j = AttributionJoiner(WINDOW, 10)
    first = j.add_impression(imp("a", 0))
    assert first == ()
    assert j.add_impression(imp("b", 1)) is first  # one shared immutable constant
    assert j.add_click("zz", 2) is first
    assert j.advance_watermark(3) is first


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        AttributionJoiner(-1, 10)
    with pytest.raises(ValueError):
        AttributionJoiner(10, 0)
    with pytest.raises(ValueError):
        AttributionJoiner(10, 10, max_closed_ids=-1)


def test_many_clicks_keep_the_queues_bounded() -> None:
    j = AttributionJoiner(10**9, 10**9)
    for i in range(5_000):
        j.add_impression(imp(f"i{i}", i))
        j.add_click(f"i{i}", i)
    queued = len(j._in_order) + len(j._out_of_order)
    assert queued <= j.pending_count + 1_025
    assert j.counters.positives == 5_000


def test_equal_ts_keep_arrival_order_after_queues_are_compacted() -> None:
    j = AttributionJoiner(WINDOW, 10_000)
    j.add_impression(imp("a", 100))
    j.add_impression(imp("b", 300))
    j.add_impression(imp("c", 200))  # older than the newest: takes the out-of-order path
    j.add_click("b", 300)
    # Clicked impressions leave stale entries behind; the 1026th makes them more than
    # pending + _COMPACTION_SLACK, and the queues are compacted (merged) into [a, c].
    assert AttributionJoiner._COMPACTION_SLACK == 1024
    for i in range(1_026):
        j.add_impression(imp(f"x{i}", 300))
        j.add_click(f"x{i}", 300)
    assert [p.id for p in j._in_order] == ["a", "c"]
    j.add_impression(imp("d", 200))  # same ts as "c", arrived later
    assert [o.impression.id for o in j.advance_watermark(10_000)] == ["a", "c", "d"]


# --- Differential test against a brute-force reference --------------------------------------


@dataclass
class ReferenceJoiner:
    """The contract written as plainly as possible: O(n) scans, no cleverness."""

    window: int
    max_pending: int
    max_closed: int
    watermark: int = -(2**63)
    pending: list[tuple[int, int, PendingImpression]] = field(default_factory=list)
    closed: dict[str, bool] = field(default_factory=dict)
    closed_order: list[str] = field(default_factory=list)
    arrivals: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def count(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def remember(self, id_: str, positive: bool) -> None:
        self.closed[id_] = positive
        self.closed_order.append(id_)
        if len(self.closed_order) > self.max_closed:
            del self.closed[self.closed_order.pop(0)]

    def advance(self, ts: int) -> list[Outcome]:
        self.watermark = max(self.watermark, ts)
        expired = sorted(e for e in self.pending if self.watermark > e[0] + self.window)
        out = []
        for entry in expired:
            self.pending.remove(entry)
            self.remember(entry[2].id, False)
            self.count("negatives_window")
            out.append(Outcome(entry[2], 0, self.watermark, "window_closed"))
        return out

    def add_impression(self, p: PendingImpression) -> list[Outcome]:
        out = self.advance(p.ts_ms)
        if p.id in self.closed or any(e[2].id == p.id for e in self.pending):
            self.count("duplicate_impressions")
            return out
        while len(self.pending) >= self.max_pending:
            oldest = min(self.pending)
            self.pending.remove(oldest)
            self.remember(oldest[2].id, False)
            self.count("evicted")
            out.append(Outcome(oldest[2], 0, self.watermark, "evicted"))
        self.arrivals += 1
        self.pending.append((p.ts_ms, self.arrivals, p))
        return out

    def add_click(self, id_: str, ts: int) -> list[Outcome]:
        out = self.advance(ts)
        match = [e for e in self.pending if e[2].id == id_]
        if match:
            entry = match[0]
            assert ts - entry[0] <= self.window
            self.pending.remove(entry)
            self.remember(id_, True)
            self.count("positives")
            out.append(Outcome(entry[2], 1, max(ts, entry[0]), "click"))
        elif id_ not in self.closed:
            self.count("orphan_clicks")
        elif self.closed[id_]:
            self.count("duplicate_clicks")
        else:
            self.count("late_clicks")
        return out


Event = tuple[str, str, int]  # (kind, id, ts)


def random_stream(
    rng: random.Random, n: int, n_ids: int, jitter: int, granularity: int = 1
) -> list[Event]:
    """Impressions, clicks (mostly on recent impressions) and watermark ticks, ts jittered;
    a coarse ``granularity`` makes equal ts common, so arrival order has to break ties."""
    events: list[Event] = []
    recent: list[str] = []
    clock = 0
    for _ in range(n):
        clock += rng.randint(0, 40)
        ts = (clock + rng.randint(-jitter, jitter)) // granularity * granularity
        kind = rng.choices(["imp", "click", "tick"], weights=[6, 3, 1])[0]
        if kind == "click" and recent and rng.random() < 0.8:
            id_ = rng.choice(recent[-30:])
        else:
            id_ = f"i{rng.randrange(n_ids)}"
        if kind == "imp":
            recent.append(id_)
        events.append((kind, id_, ts))
    return events


def feed(joiner: AttributionJoiner | ReferenceJoiner, event: Event, seq: int) -> list[object]:
    kind, id_, ts = event
    if kind == "imp":
        outcomes = joiner.add_impression(imp(id_, ts, seed=seq))
    elif kind == "click":
        outcomes = joiner.add_click(id_, ts)
    elif isinstance(joiner, AttributionJoiner):
        outcomes = joiner.advance_watermark(ts)
    else:
        outcomes = joiner.advance(ts)
    return [as_row(o) for o in outcomes]


def as_row(o: Outcome) -> tuple[object, ...]:
    p = o.impression
    return (p.id, p.ts_ms, p.model_version, p.p_served, o.label, o.label_ts_ms, o.cause)


@pytest.mark.parametrize("compaction_slack", [1024, -(10**9)])
@pytest.mark.parametrize("seed", range(24))
def test_matches_brute_force_reference(
    seed: int, compaction_slack: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hugely negative slack compacts the queues after every click: the merge runs constantly.
    monkeypatch.setattr(AttributionJoiner, "_COMPACTION_SLACK", compaction_slack)
    rng = random.Random(seed)
    window = rng.choice([0, 50, 300, 2_000])
    max_pending = rng.choice([1, 3, 20, 10_000])
    max_closed = rng.choice([0, 5, 50, 10_000])
    events = random_stream(
        rng, 1_500, n_ids=rng.choice([30, 300, 5_000]), jitter=rng.choice([0, 5, 400])
    )
    fast = AttributionJoiner(window, max_pending, max_closed)
    slow = ReferenceJoiner(window, max_pending, max_closed)
    for seq, event in enumerate(events):
        assert feed(fast, event, seq) == feed(slow, event, seq), (seq, event)
        assert fast.pending_count == len(slow.pending)
        assert fast.watermark_ms == slow.watermark
    assert [as_row(o) for o in fast.flush()] == [
        as_row(Outcome(e[2], 0, slow.watermark, "flushed")) for e in sorted(slow.pending)
    ]
    counters = fast.counters
    for name, value in slow.counts.items():
        assert getattr(counters, name) == value, name


# --- Restore --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_restore_at_any_point_continues_identically(seed: int) -> None:
    rng = random.Random(100 + seed)
    window, max_pending, max_closed = 300, rng.choice([5, 50, 10_000]), rng.choice([3, 10_000])
    events = random_stream(rng, 1_200, n_ids=400, jitter=150, granularity=rng.choice([1, 100]))
    cut = rng.randrange(len(events))

    straight = AttributionJoiner(window, max_pending, max_closed)
    expected = [feed(straight, e, seq) for seq, e in enumerate(events)]
    expected.append([as_row(o) for o in straight.flush()])

    first = AttributionJoiner(window, max_pending, max_closed)
    got = [feed(first, e, seq) for seq, e in enumerate(events[:cut])]
    restored = AttributionJoiner.from_state(first.state())
    got += [feed(restored, e, seq) for seq, e in enumerate(events[cut:], start=cut)]
    got.append([as_row(o) for o in restored.flush()])

    assert got == expected
    assert restored.counters == straight.counters
    assert restored.watermark_ms == straight.watermark_ms


def test_state_is_arrays_and_plain_values_and_survives_a_checkpoint(tmp_path: Path) -> None:
    j = AttributionJoiner(WINDOW, 100, 50)
    j.add_impression(PendingImpression("ünïcødé-✓", 5, example(3), math.nan, 0))
    j.add_impression(PendingImpression("", 6, example(0), 0.25, 2))  # empty id, empty example
    j.add_impression(imp("plain", 7, seed=4))
    j.add_click("plain", 8)
    j.add_click("ghost", 9)
    state = j.state()
    for key, value in state.items():
        assert isinstance(value, (np.ndarray, int, float, str)), key
        if isinstance(value, np.ndarray):
            assert value.dtype.kind in "biuf", key

    store = CheckpointStore(tmp_path)
    store.save({"joiner": state})
    loaded = store.load_latest()
    assert loaded is not None
    restored = AttributionJoiner.from_state(loaded[0]["joiner"])
    assert restored.counters == j.counters
    assert restored.pending_count == 2
    first = restored.get_pending("ünïcødé-✓")
    assert first is not None
    assert math.isnan(first.p_served)
    np.testing.assert_array_equal(first.example.indices, example(3).indices)
    np.testing.assert_array_equal(first.example.values, example(3).values)
    assert first.example.indices.dtype == np.int32
    assert summary(restored.flush()) == summary(j.flush())
    restored.add_click("plain", 10)
    assert restored.counters.duplicate_clicks == 1


def test_malformed_state_raises_checkpoint_corrupt() -> None:
    j = AttributionJoiner(WINDOW, 10)
    j.add_impression(imp("a", 1))
    good = j.state()
    broken_cases = [
        {**good, "format": "something else"},
        {**good, "pending_ts_ms": np.zeros(5, dtype=np.int64)},
        {**good, "pending_id_offsets": np.array([0, 99], dtype=np.int64)},
        {**good, "window_ms": "1000"},
        {**good, "max_pending": 0},
        {**good, "pending_indptr": np.array([1, 0], dtype=np.int64)},
    ]
    for broken in broken_cases:
        with pytest.raises(CheckpointCorrupt):
            AttributionJoiner.from_state(broken)


def test_counters_as_dict_names_every_reason() -> None:
    j = AttributionJoiner(WINDOW, 10)
    j.add_click("nobody", 1)
    counts = j.counters.as_dict()
    assert counts["orphan_clicks"] == 1
    assert set(counts) == {
        "positives",
        "negatives_window",
        "evicted",
        "flushed",
        "late_clicks",
        "orphan_clicks",
        "duplicate_impressions",
        "duplicate_clicks",
    }


def test_a_capture_keeps_the_state_of_its_moment_while_the_joiner_moves_on() -> None:
    from stream_fm.model.base import SparseExample

    x = SparseExample(np.array([1, 2], dtype=np.int32), np.array([1.0, 1.0]))
    joiner = AttributionJoiner(window_ms=1_000, max_pending=100, max_closed_ids=5)
    for i in range(20):
        joiner.add_impression(PendingImpression(f"i{i}", i * 100, x, 0.1, i))
    joiner.add_click("i15", 1_950)
    expected = joiner.state()
    capture = joiner.capture()
    for i in range(20, 40):
        joiner.add_impression(PendingImpression(f"i{i}", i * 100, x, 0.2, i))
        joiner.add_click(f"i{i - 1}", i * 100 + 5)
    state = dict(capture)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(state[key], value), key
        else:
            assert state[key] == value, key
    restored = AttributionJoiner.from_state(capture)
    assert restored.pending_count == AttributionJoiner.from_state(expected).pending_count
