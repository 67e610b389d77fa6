"""Attribution-window join of clicks to impressions, in event time (pure logic, no I/O).

One ``AttributionJoiner`` per input partition. Its watermark is the largest ``ts`` it has seen.

* A click on a pending impression makes it positive at once (cause ``"click"``). A click whose
  ``ts`` precedes its impression's ``ts`` (clock skew between producers) counts as delay 0.
* When the watermark passes ``ts + window_ms`` (strictly) with no click, the impression is
  negative (cause ``"window_closed"``, ``label_ts_ms`` = the watermark that closed it).
* The buffer holds at most ``max_pending`` impressions; on overflow the oldest (by ``ts``, then
  arrival) is learned as negative (cause ``"evicted"``). ``flush`` ends a replay: everything
  still pending becomes negative (cause ``"flushed"``).
* Late click (impression already learned as negative, including a click past the window),
  orphan click (id never seen, or forgotten), duplicate click (impression already positive),
  duplicate impression (id pending or recently closed): counted in ``counters``, never learned.
  Closed ids are remembered in a bounded FIFO of ``max_closed_ids`` entries to tell these apart
  (about 100 bytes each); a click on an id closed longer ago than that counts as orphan.

With ``hold_positives`` (the ``window`` label policy) a clicked impression is *also* held
until its window closes and then handed out again as a ``"held"`` outcome, in (ts, arrival)
order among the negatives that close with it: every impression is then learned once, when
its window closes. The ``"click"`` outcome still comes at once (progressive validation counts
a label when it becomes final). Held impressions count towards ``max_pending``; one evicted
early comes out as ``"held"`` too.

An impression whose window had already closed when it arrived (its ``ts`` more than
``window_ms`` behind the watermark) is still buffered, and learned as negative by the next call.
So when impressions and clicks come from two topics, feed them in roughly event-time order: a
click read long before its impression is an orphan.

An impression is never returned by the call that adds it, so the caller can score it after
``add_impression`` returns and before any outcome for it exists. Outcomes of one call come in a
fixed order: windows closed by the watermark advance (by ``ts``, then arrival), then evictions,
then the click's positive. Identical input gives identical output, also across
``state``/``from_state``.

>>> import numpy as np
>>> from stream_fm.model.base import SparseExample
>>> x = SparseExample(np.array([3], dtype=np.int32), np.array([1.0]))
>>> joiner = AttributionJoiner(window_ms=1_000, max_pending=10)
>>> joiner.add_impression(PendingImpression("a", 0, x, 0.2, 7))
()
>>> joiner.add_impression(PendingImpression("b", 500, x, 0.1, 7))
()
>>> [(o.impression.id, o.label, o.cause, o.delay_ms) for o in joiner.add_click("a", 900)]
[('a', 1, 'click', 900)]
>>> [(o.impression.id, o.label, o.label_ts_ms) for o in joiner.advance_watermark(1_501)]
[('b', 0, 1501)]
>>> joiner.add_click("b", 1_600), joiner.add_click("zz", 1_600)
((), ())
>>> c = joiner.counters
>>> c.positives, c.negatives_window, c.late_clicks, c.orphan_clicks, joiner.pending_count
(1, 1, 1, 1, 0)
"""

from __future__ import annotations

import gc
import heapq
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from operator import attrgetter
from typing import Final, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from stream_fm.errors import CheckpointCorrupt
from stream_fm.model.base import SparseExample, StateValue

__all__ = [
    "CAUSE_CLICK",
    "CAUSE_EVICTED",
    "CAUSE_FLUSHED",
    "CAUSE_HELD",
    "CAUSE_WINDOW_CLOSED",
    "CLICK_EARLY",
    "FAKE_NEGATIVE",
    "LABEL_POLICIES",
    "NO_WATERMARK",
    "WINDOW",
    "AttributionJoiner",
    "Cause",
    "JoinCounters",
    "JoinerCapture",
    "Outcome",
    "PendingImpression",
]

Cause = Literal["click", "window_closed", "evicted", "flushed", "held"]
CAUSE_CLICK: Final = "click"
CAUSE_HELD: Final = "held"
CAUSE_WINDOW_CLOSED: Final = "window_closed"
CAUSE_EVICTED: Final = "evicted"
CAUSE_FLUSHED: Final = "flushed"

#: When an impression is learned, and how (``label_policy``). Progressive validation is the
#: same for all: each impression counts once, with its final label, on the p served for it.
CLICK_EARLY: Final = "click_early"  # positives when the click comes, negatives at window close
WINDOW: Final = "window"  # everything once, when its window closes: unbiased, a window stale
FAKE_NEGATIVE: Final = "fake_negative"  # at once as a negative, again as a positive on click,
#: with the fake-negative weights that make the learned p unbiased (Ktena et al., RecSys 2019)
LABEL_POLICIES: Final = (FAKE_NEGATIVE, WINDOW, CLICK_EARLY)

#: Watermark before any event was seen; fits int64.
NO_WATERMARK: Final = -(2**63)

_STATE_FORMAT: Final = "stream_fm.join/1"
# Returned when nothing is due, so the hot path allocates nothing; a tuple cannot be mutated.
_NOTHING: Final[tuple[()]] = ()


@dataclass(slots=True)
class PendingImpression:
    """An impression waiting for its click; ``p_served``/``model_version`` are set after scoring."""

    id: str
    ts_ms: int
    example: SparseExample
    p_served: float
    model_version: int


class Outcome(NamedTuple):
    """A labeled example ready to learn: ``label`` 1 positive, 0 negative.

    A NamedTuple rather than a frozen dataclass: equally immutable, and built with
    ``tuple.__new__`` it costs a third as much, once per impression on the hot path.
    """

    impression: PendingImpression
    label: int
    label_ts_ms: int
    cause: Cause

    @property
    def delay_ms(self) -> int:
        """Click delay for positives (never negative); time the window stayed open otherwise."""
        return self.label_ts_ms - self.impression.ts_ms


_new_outcome = tuple.__new__


@dataclass(slots=True)
class JoinCounters:
    """What the joiner did, by reason. A live object: read it, do not write it."""

    positives: int = 0
    negatives_window: int = 0
    evicted: int = 0
    flushed: int = 0
    late_clicks: int = 0
    orphan_clicks: int = 0
    duplicate_impressions: int = 0
    duplicate_clicks: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# Impressions leave the buffer in (ts, arrival) order. Most arrive in ts order and wait in a FIFO
# of bare impressions; the others wait in a heap of (ts, arrival sequence, impression) entries
# (the sequence is unique, so impressions are never compared). The FIFO head goes first when its
# ts equals the heap head's: a heap entry was pushed because its ts was below the FIFO's tail, so
# every FIFO impression with the same ts arrived before it. Compaction and restore merge both
# into the FIFO, which keeps that argument true.
_Entry = tuple[int, int, PendingImpression]
_get_ts = attrgetter("ts_ms")


def _outcome_ts(outcome: Outcome) -> int:
    return outcome.impression.ts_ms


_get_p_served = attrgetter("p_served")
_get_model_version = attrgetter("model_version")


class AttributionJoiner:
    """Joins clicks to impressions of one partition; see the module docstring for semantics."""

    # Stale queue entries tolerated beyond the pending count before the queues are compacted.
    _COMPACTION_SLACK = 1024

    __slots__ = (
        "_closed_order",
        "_cutoff",
        "_held",
        "_hold_positives",
        "_ids",
        "_in_order",
        "_max_closed_ids",
        "_max_pending",
        "_out_of_order",
        "_pending_count",
        "_seq",
        "_stale",
        "_watermark",
        "_window_ms",
        "counters",
        "last_impression_accepted",
    )

    def __init__(
        self,
        window_ms: int,
        max_pending: int,
        max_closed_ids: int = 100_000,
        hold_positives: bool = False,
    ) -> None:
        if window_ms < 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if max_closed_ids < 0:
            raise ValueError(f"max_closed_ids must be >= 0, got {max_closed_ids}")
        self._window_ms = window_ms
        self._max_pending = max_pending
        self._max_closed_ids = max_closed_ids
        self._watermark: int = NO_WATERMARK
        # Impressions with ts below the cutoff are expired; cached so the hot path only compares.
        self._cutoff: int = NO_WATERMARK - window_ms
        # Every known id: pending ones map to their impression, closed ones to True if they were
        # learned positive. One table instead of two halves the (cache-missing) lookups per
        # event. Pending entries keep their arrival order (a closed id's value is overwritten in
        # place; nothing is re-inserted), which ``state`` needs to break ts ties after a restore.
        self._ids: dict[str, PendingImpression | bool] = {}
        self._pending_count = 0
        # Closed ids, oldest first; bounds how many ``_ids`` remembers.
        self._closed_order: deque[str] = deque()
        # Event time mostly increases, so most impressions go to a FIFO (O(1) in and out, no
        # per-impression tuple); the rest go to a heap. See the comment on _Entry.
        self._in_order: deque[PendingImpression] = deque()
        self._out_of_order: list[_Entry] = []
        self._seq = 0
        # Entries of clicked impressions stay in the queues and are skipped when they surface.
        self._stale = 0
        # Clicked impressions held until their window closes: (ts, sequence, impression,
        # click ts), a heap.
        self._hold_positives = hold_positives
        self._held: list[tuple[int, int, PendingImpression, int]] = []
        self.counters = JoinCounters()
        #: Whether the latest ``add_impression`` buffered its impression (False: a duplicate).
        self.last_impression_accepted = False

    @property
    def window_ms(self) -> int:
        return self._window_ms

    @property
    def max_pending(self) -> int:
        return self._max_pending

    @property
    def max_closed_ids(self) -> int:
        return self._max_closed_ids

    @property
    def hold_positives(self) -> bool:
        return self._hold_positives

    @hold_positives.setter
    def hold_positives(self, hold: bool) -> None:
        self._hold_positives = hold

    @property
    def watermark_ms(self) -> int:
        """Largest ``ts`` seen so far (``NO_WATERMARK`` before the first event)."""
        return self._watermark

    @property
    def pending_count(self) -> int:
        return self._pending_count

    def get_pending(self, impression_id: str) -> PendingImpression | None:
        """The pending impression with this id, if any."""
        value = self._ids.get(impression_id)
        return value if isinstance(value, PendingImpression) else None

    def add_impression(self, imp: PendingImpression) -> Sequence[Outcome]:
        """Buffer ``imp``; return the outcomes that became due (never ``imp``'s own).

        A duplicate id (pending or remembered as closed) is counted and ignored;
        ``last_impression_accepted`` tells the caller which case happened.
        """
        ts = imp.ts_ms
        if ts > self._watermark:
            self._watermark = ts
            self._cutoff = cutoff = ts - self._window_ms
        else:
            cutoff = self._cutoff
        in_order = self._in_order
        out_of_order = self._out_of_order
        due: Sequence[Outcome] = _NOTHING
        if (
            (in_order and in_order[0].ts_ms < cutoff)
            or (out_of_order and out_of_order[0][0] < cutoff)
            or (self._held and self._held[0][0] < cutoff)
        ):
            due = self._close_expired()
        impression_id = imp.id
        ids = self._ids
        if impression_id in ids:
            self.counters.duplicate_impressions += 1
            self.last_impression_accepted = False
            return due
        if self._pending_count >= self._max_pending:
            # Evict before inserting, so the new impression is never its own eviction.
            due = self._evict_oldest(due)
        ids[impression_id] = imp
        self._pending_count += 1
        if not in_order or ts >= in_order[-1].ts_ms:
            in_order.append(imp)
        else:
            self._seq += 1
            heapq.heappush(out_of_order, (ts, self._seq, imp))
        self.last_impression_accepted = True
        return due

    def add_click(self, impression_id: str, ts_ms: int) -> Sequence[Outcome]:
        """Attribute a click: windows closed by its ``ts`` first, then its positive if any."""
        if ts_ms > self._watermark:
            self._watermark = ts_ms
            self._cutoff = cutoff = ts_ms - self._window_ms
        else:
            cutoff = self._cutoff
        in_order = self._in_order
        out_of_order = self._out_of_order
        due: Sequence[Outcome] = _NOTHING
        if (
            (in_order and in_order[0].ts_ms < cutoff)
            or (out_of_order and out_of_order[0][0] < cutoff)
            or (self._held and self._held[0][0] < cutoff)
        ):
            due = self._close_expired()
        # Still pending after the advance implies ts_ms <= imp.ts + window: no window check here.
        imp = self._ids.get(impression_id)
        if not isinstance(imp, PendingImpression):
            counters = self.counters
            if imp is None:
                counters.orphan_clicks += 1
            elif imp:
                counters.duplicate_clicks += 1
            else:
                counters.late_clicks += 1
            return due
        self.counters.positives += 1
        label_ts = ts_ms if ts_ms > imp.ts_ms else imp.ts_ms
        if self._hold_positives:
            self._seq += 1
            heapq.heappush(self._held, (imp.ts_ms, self._seq, imp, label_ts))
        else:
            self._pending_count -= 1
        self._remember_closed(impression_id, True)
        self._stale += 1
        if self._stale > self._pending_count + self._COMPACTION_SLACK:
            self._drop_stale_entries()
        positive = _new_outcome(Outcome, (imp, 1, label_ts, CAUSE_CLICK))
        if not due:
            return (positive,)
        outcomes = due if isinstance(due, list) else list(due)
        outcomes.append(positive)
        return outcomes

    def advance_watermark(self, ts_ms: int) -> Sequence[Outcome]:
        """Move event time forward (e.g. for an idle partition); return the windows it closed."""
        if ts_ms > self._watermark:
            self._watermark = ts_ms
            self._cutoff = ts_ms - self._window_ms
        cutoff = self._cutoff
        in_order = self._in_order
        out_of_order = self._out_of_order
        if (
            (in_order and in_order[0].ts_ms < cutoff)
            or (out_of_order and out_of_order[0][0] < cutoff)
            or (self._held and self._held[0][0] < cutoff)
        ):
            return self._close_expired()
        return _NOTHING

    def flush(self) -> list[Outcome]:
        """Learn everything still pending as negative (end of a replay), oldest first; held
        positives come out among them in ts order."""
        out: list[Outcome] = []
        ids = self._ids
        watermark = self._watermark
        while True:
            imp = self._pop_oldest()
            if imp is None:
                break
            if ids.get(imp.id) is not imp:
                continue
            self._remember_closed(imp.id, False)
            out.append(_new_outcome(Outcome, (imp, 0, watermark, CAUSE_FLUSHED)))
        self.counters.flushed += len(out)
        if self._held:
            held = [
                _new_outcome(Outcome, (imp, 1, click_ts, CAUSE_HELD))
                for _, _, imp, click_ts in sorted(self._held)
            ]
            self._held = []
            out = list(heapq.merge(out, held, key=_outcome_ts))
        self._pending_count = 0
        self._stale = 0
        return out

    def _pop_oldest(self) -> PendingImpression | None:
        in_order = self._in_order
        out_of_order = self._out_of_order
        if out_of_order and (not in_order or out_of_order[0][0] < in_order[0].ts_ms):
            return heapq.heappop(out_of_order)[2]
        if in_order:
            return in_order.popleft()
        return None

    def _close_expired(self) -> list[Outcome]:
        out: list[Outcome] = []
        in_order = self._in_order
        out_of_order = self._out_of_order
        held = self._held
        ids = self._ids
        cutoff = self._cutoff
        watermark = self._watermark
        closed_order = self._closed_order
        max_closed = self._max_closed_ids
        released = 0
        while True:
            from_heap = bool(out_of_order) and (
                not in_order or out_of_order[0][0] < in_order[0].ts_ms
            )
            if from_heap:
                oldest_ts = out_of_order[0][0]
            elif in_order:
                oldest_ts = in_order[0].ts_ms
            else:
                oldest_ts = cutoff  # nothing pending: only held ones can be due
            if held and held[0][0] < cutoff and held[0][0] < oldest_ts:
                _, _, imp, click_ts = heapq.heappop(held)
                out.append(_new_outcome(Outcome, (imp, 1, click_ts, CAUSE_HELD)))
                released += 1
                continue
            if oldest_ts >= cutoff:
                break
            imp = heapq.heappop(out_of_order)[2] if from_heap else in_order.popleft()
            impression_id = imp.id
            if ids.get(impression_id) is not imp:
                self._stale -= 1
                continue
            # Inlined _remember_closed: this loop runs once per impression.
            ids[impression_id] = False
            closed_order.append(impression_id)
            if len(closed_order) > max_closed:
                del ids[closed_order.popleft()]
            out.append(_new_outcome(Outcome, (imp, 0, watermark, CAUSE_WINDOW_CLOSED)))
        self._pending_count -= len(out)
        self.counters.negatives_window += len(out) - released
        return out

    def _evict_oldest(self, due: Sequence[Outcome]) -> list[Outcome]:
        # Once the buffer is full this runs for every impression, hence the inlining.
        out = due if isinstance(due, list) else list(due)
        in_order = self._in_order
        out_of_order = self._out_of_order
        held = self._held
        ids = self._ids
        closed_order = self._closed_order
        max_closed = self._max_closed_ids
        watermark = self._watermark
        evicted = released = 0
        while self._pending_count - evicted - released >= self._max_pending:
            from_heap = bool(out_of_order) and (
                not in_order or out_of_order[0][0] < in_order[0].ts_ms
            )
            oldest_ts = out_of_order[0][0] if from_heap else in_order[0].ts_ms if in_order else None
            if held and (oldest_ts is None or held[0][0] < oldest_ts):
                _, _, imp, click_ts = heapq.heappop(held)  # a held positive goes out early
                out.append(_new_outcome(Outcome, (imp, 1, click_ts, CAUSE_HELD)))
                released += 1
                continue
            imp = heapq.heappop(out_of_order)[2] if from_heap else in_order.popleft()
            impression_id = imp.id
            if ids.get(impression_id) is not imp:
                self._stale -= 1
                continue
            ids[impression_id] = False
            closed_order.append(impression_id)
            if len(closed_order) > max_closed:
                del ids[closed_order.popleft()]
            out.append(_new_outcome(Outcome, (imp, 0, watermark, CAUSE_EVICTED)))
            evicted += 1
        self._pending_count -= evicted + released
        self.counters.evicted += evicted
        return out

    def _remember_closed(self, impression_id: str, positive: bool) -> None:
        # Ids are unique in the FIFO: a known id is refused as a duplicate impression.
        self._ids[impression_id] = positive
        order = self._closed_order
        order.append(impression_id)
        if len(order) > self._max_closed_ids:
            del self._ids[order.popleft()]

    def _drop_stale_entries(self) -> None:
        # Bounds memory when most impressions are clicked; O(n), amortised over >= n clicks.
        ids = self._ids
        live_in_order = (imp for imp in self._in_order if ids.get(imp.id) is imp)
        out_of_order = sorted(e for e in self._out_of_order if ids.get(e[2].id) is e[2])
        # A stable merge by ts with the FIFO first is exactly (ts, arrival) order.
        merged = heapq.merge(live_in_order, (e[2] for e in out_of_order), key=_get_ts)
        self._in_order = deque(merged)
        self._out_of_order = []
        self._stale = 0

    def state(self) -> dict[str, StateValue]:
        """Everything needed to resume exactly: arrays and plain values only."""
        return dict(self.capture())

    def capture(self) -> JoinerCapture:
        """The state as it is now, for ``state`` later: shallow copies only (a checkpoint's
        pause), encoded when first read (beside the loop). Impressions never change once
        scored, so copying the containers freezes the state."""
        return JoinerCapture(self)

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> AttributionJoiner:
        """Rebuild a joiner from ``state()``; its future outputs equal an uninterrupted run's.

        Raises ``CheckpointCorrupt`` if ``state`` is malformed.
        """
        # Millions of new objects would trigger full collections again and again; none of
        # them can form a reference cycle, so collecting here finds nothing anyway.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return cls._restore(state)
        finally:
            if was_enabled:
                gc.enable()

    @classmethod
    def _restore(cls, state: Mapping[str, object]) -> AttributionJoiner:
        if state.get("format") != _STATE_FORMAT:
            raise CheckpointCorrupt(f"joiner state: unknown format {state.get('format')!r}")
        try:
            joiner = cls(
                _get_int(state, "window_ms"),
                _get_int(state, "max_pending"),
                _get_int(state, "max_closed_ids"),
            )
        except ValueError as error:
            raise CheckpointCorrupt(f"joiner state: {error}") from error
        watermark = _get_int(state, "watermark_ms")
        joiner._watermark = watermark
        joiner._cutoff = watermark - joiner._window_ms

        pending = _decode_impressions(state, "pending")
        n = len(pending)
        known = joiner._ids
        restored: list[tuple[int, int, PendingImpression]] = []
        for i, imp in enumerate(pending):
            known[imp.id] = imp
            restored.append((imp.ts_ms, i, imp))
        if len(known) != n:
            raise CheckpointCorrupt("joiner state: duplicate pending ids")
        restored.sort()  # (ts, arrival); the index is unique, so impressions are never compared
        joiner._in_order.extend(e[2] for e in restored)
        joiner._pending_count = n
        # Held positives (the window policy); absent from checkpoints written before it.
        joiner._hold_positives = bool(state.get("hold_positives", 0))
        joiner._seq = int(state.get("seq", 0))  # type: ignore[call-overload]
        if "held_id_blob" in state:
            held = _decode_impressions(state, "held")
            seqs = _get_array(state, "held_seq", len(held), "iu").tolist()
            clicks = _get_array(state, "held_click_ts_ms", len(held), "iu").tolist()
            joiner._held = [
                (imp.ts_ms, seq, imp, click)
                for imp, seq, click in zip(held, seqs, clicks, strict=True)
            ]
            heapq.heapify(joiner._held)
            joiner._pending_count += len(held)

        closed_ids = _decode_ids(state, "closed_id_blob", "closed_id_offsets")
        positive = _get_array(state, "closed_positive", len(closed_ids), "b").tolist()
        known.update(zip(closed_ids, positive, strict=True))
        joiner._closed_order = deque(closed_ids)
        if len(known) != n + len(closed_ids):
            raise CheckpointCorrupt("joiner state: an id is closed twice, or pending and closed")

        for f in fields(JoinCounters):
            setattr(joiner.counters, f.name, _get_int(state, f"count_{f.name}"))
        return joiner


class JoinerCapture(Mapping[str, StateValue]):
    """A joiner's state frozen by ``capture``; the arrays are built on first access."""

    __slots__ = ("_counters", "_encoded", "_held", "_ids", "_order", "_scalars")

    def __init__(self, joiner: AttributionJoiner) -> None:
        self._ids = dict(joiner._ids)  # pending ones in arrival order, closed ones too
        self._order = list(joiner._closed_order)
        self._held = list(joiner._held)
        self._counters = joiner.counters.as_dict()
        self._scalars: dict[str, StateValue] = {
            "format": _STATE_FORMAT,
            "window_ms": joiner._window_ms,
            "max_pending": joiner._max_pending,
            "max_closed_ids": joiner._max_closed_ids,
            "hold_positives": int(joiner._hold_positives),
            "seq": joiner._seq,
            "watermark_ms": joiner._watermark,
        }
        self._encoded: dict[str, StateValue] | None = None

    def _state(self) -> dict[str, StateValue]:
        if self._encoded is None:
            self._encoded = self._encode()
        return self._encoded

    def _encode(self) -> dict[str, StateValue]:
        ids = self._ids
        pending = [v for v in ids.values() if isinstance(v, PendingImpression)]  # arrival order
        closed_ids = self._order
        closed_blob, closed_offsets = _encode_ids(closed_ids)
        held = sorted(self._held)
        state: dict[str, StateValue] = {
            **self._scalars,
            **_encode_impressions("pending", pending),
            **_encode_impressions("held", [entry[2] for entry in held]),
            "held_seq": np.array([entry[1] for entry in held], dtype=np.int64),
            "held_click_ts_ms": np.array([entry[3] for entry in held], dtype=np.int64),
            "closed_id_blob": closed_blob,
            "closed_id_offsets": closed_offsets,
            "closed_positive": np.fromiter(
                map(ids.__getitem__, closed_ids), np.bool_, len(closed_ids)
            ),
        }
        for name, value in self._counters.items():
            state[f"count_{name}"] = int(value)
        return state

    def __getitem__(self, key: str) -> StateValue:
        return self._state()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state())

    def __len__(self) -> int:
        return len(self._state())


def _encode_impressions(prefix: str, imps: list[PendingImpression]) -> dict[str, StateValue]:
    """Impressions as arrays: ids, ts, served p, model version, examples (CSR)."""
    n = len(imps)
    blob, offsets = _encode_ids([imp.id for imp in imps])
    examples = [imp.example for imp in imps]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter((len(x.indices) for x in examples), np.int64, n), out=indptr[1:])
    if imps:
        indices = np.concatenate([x.indices for x in examples]).astype(np.int32, copy=False)
        values = np.concatenate([x.values for x in examples]).astype(np.float64, copy=False)
    else:
        indices = np.zeros(0, dtype=np.int32)
        values = np.zeros(0, dtype=np.float64)
    return {
        f"{prefix}_id_blob": blob,
        f"{prefix}_id_offsets": offsets,
        f"{prefix}_ts_ms": np.fromiter(map(_get_ts, imps), np.int64, n),
        f"{prefix}_p_served": np.fromiter(map(_get_p_served, imps), np.float64, n),
        f"{prefix}_model_version": np.fromiter(map(_get_model_version, imps), np.int64, n),
        f"{prefix}_indptr": indptr,
        f"{prefix}_indices": indices,
        f"{prefix}_values": values,
    }


def _decode_impressions(state: Mapping[str, object], prefix: str) -> list[PendingImpression]:
    ids = _decode_ids(state, f"{prefix}_id_blob", f"{prefix}_id_offsets")
    n = len(ids)
    ts = _get_array(state, f"{prefix}_ts_ms", n, "iu").tolist()
    p_served = _get_array(state, f"{prefix}_p_served", n, "f").tolist()
    versions = _get_array(state, f"{prefix}_model_version", n, "iu").tolist()
    indptr_array = _get_array(state, f"{prefix}_indptr", n + 1, "iu")
    if indptr_array[0] != 0 or np.any(np.diff(indptr_array) < 0):
        raise CheckpointCorrupt(f"joiner state: {prefix}_indptr is not monotone from 0")
    nnz = int(indptr_array[-1])
    indptr = indptr_array.tolist()
    # Copies: views would pin the whole checkpoint buffer (model included) in memory for as
    # long as any restored impression waits.
    indices = np.array(_get_array(state, f"{prefix}_indices", nnz, "iu"), dtype=np.int32)
    values = np.array(_get_array(state, f"{prefix}_values", nnz, "f"), dtype=np.float64)
    return [
        PendingImpression(
            ident,
            ts[i],
            SparseExample(indices[indptr[i] : indptr[i + 1]], values[indptr[i] : indptr[i + 1]]),
            p_served[i],
            versions[i],
        )
        for i, ident in enumerate(ids)
    ]


def _encode_ids(ids: list[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    joined = "".join(ids)
    if joined.isascii():  # the common case: one encode, character lengths are byte lengths
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        blob = joined.encode("ascii")
    else:
        encoded = [i.encode("utf-8") for i in ids]
        lengths = np.fromiter(map(len, encoded), np.int64, len(ids))
        blob = b"".join(encoded)
    np.cumsum(lengths, out=offsets[1:])
    return np.frombuffer(blob, dtype=np.uint8).copy(), offsets


def _decode_ids(state: Mapping[str, object], blob_key: str, offsets_key: str) -> list[str]:
    offsets_array = _get_array(state, offsets_key, None, "iu")
    blob = _get_array(state, blob_key, None, "u").astype(np.uint8, copy=False).tobytes()
    offsets = offsets_array.tolist()
    if (
        not offsets
        or offsets[0] != 0
        or offsets[-1] != len(blob)
        or np.any(np.diff(offsets_array) < 0)
    ):
        raise CheckpointCorrupt(f"joiner state: {offsets_key} does not span {blob_key}")
    pairs = pairwise(offsets)
    if blob.isascii():
        text = blob.decode("ascii")
        return [text[a:b] for a, b in pairs]
    try:
        return [blob[a:b].decode("utf-8") for a, b in pairs]
    except UnicodeDecodeError as error:
        raise CheckpointCorrupt(f"joiner state: bad ids in {blob_key}: {error}") from error


def _get_int(state: Mapping[str, object], key: str) -> int:
    value = state.get(key)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointCorrupt(f"joiner state: {key} must be an int, got {value!r}")
    return value


def _get_array(
    state: Mapping[str, object], key: str, length: int | None, kinds: str
) -> npt.NDArray[np.generic]:
    value = state.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in kinds:
        raise CheckpointCorrupt(f"joiner state: {key} must be a 1-d array of kind {kinds!r}")
    if length is not None and len(value) != length:
        raise CheckpointCorrupt(f"joiner state: {key} has {len(value)} entries, expected {length}")
    return value
