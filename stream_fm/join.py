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
  Closed ids are remembered in a bounded FIFO of ``max_closed_ids`` entries to tell these apart.

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

import heapq
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from stream_fm.errors import CheckpointCorrupt
from stream_fm.model.base import SparseExample, StateValue

__all__ = [
    "CAUSE_CLICK",
    "CAUSE_EVICTED",
    "CAUSE_FLUSHED",
    "CAUSE_WINDOW_CLOSED",
    "NO_WATERMARK",
    "AttributionJoiner",
    "Cause",
    "JoinCounters",
    "Outcome",
    "PendingImpression",
]

Cause = Literal["click", "window_closed", "evicted", "flushed"]
CAUSE_CLICK: Final = "click"
CAUSE_WINDOW_CLOSED: Final = "window_closed"
CAUSE_EVICTED: Final = "evicted"
CAUSE_FLUSHED: Final = "flushed"

#: Watermark before any event was seen (fits int64, so it survives a checkpoint as an array too).
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


@dataclass(frozen=True, slots=True)
class Outcome:
    """A labeled example ready to learn: 1 positive, 0 negative."""

    impression: PendingImpression
    label: int
    label_ts_ms: int
    cause: Cause

    @property
    def delay_ms(self) -> int:
        """Click delay for positives (never negative); time the window stayed open otherwise."""
        return self.label_ts_ms - self.impression.ts_ms


@dataclass(slots=True)
class JoinCounters:
    """What the joiner has seen, by reason. Live object: read it, do not write it."""

    impressions: int = 0
    clicks: int = 0
    positives: int = 0
    negatives_window: int = 0
    evicted: int = 0
    flushed: int = 0
    late_clicks: int = 0
    orphan_clicks: int = 0
    duplicate_impressions: int = 0
    duplicate_clicks: int = 0


# Heap entries: (ts_ms, arrival sequence, impression). The sequence is unique, so tuples never
# compare impressions, and (ts, seq) is a total order: pop order does not depend on heap layout.
_HeapEntry = tuple[int, int, PendingImpression]


class AttributionJoiner:
    """Joins clicks to impressions of one partition; see the module docstring for semantics."""

    __slots__ = (
        "_closed",
        "_closed_order",
        "_cutoff",
        "_heap",
        "_max_closed_ids",
        "_max_pending",
        "_pending",
        "_seq",
        "_stale",
        "_watermark",
        "_window_ms",
        "counters",
        "last_impression_accepted",
    )

    def __init__(self, window_ms: int, max_pending: int, max_closed_ids: int = 1_000_000) -> None:
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
        # Insertion order of this dict is arrival order; nothing is ever re-inserted, so
        # ``state`` can rebuild the (ts, arrival) order from it.
        self._pending: dict[str, PendingImpression] = {}
        self._heap: list[_HeapEntry] = []
        self._seq = 0
        # Heap entries of impressions that were clicked; skipped when popped, compacted if many.
        self._stale = 0
        # id -> True if it was learned positive; _closed_order is the FIFO that bounds it.
        self._closed: dict[str, bool] = {}
        self._closed_order: deque[str] = deque()
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
    def watermark_ms(self) -> int:
        """Largest ``ts`` seen so far (``NO_WATERMARK`` before the first event)."""
        return self._watermark

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    def get_pending(self, impression_id: str) -> PendingImpression | None:
        """The pending impression with this id, if any."""
        return self._pending.get(impression_id)

    def add_impression(self, imp: PendingImpression) -> Sequence[Outcome]:
        """Buffer ``imp``; return outcomes that became due (never ``imp``'s own)."""
        ts = imp.ts_ms
        if ts > self._watermark:
            self._watermark = ts
            self._cutoff = ts - self._window_ms
        heap = self._heap
        due: Sequence[Outcome] = (
            self._close_expired() if heap and heap[0][0] < self._cutoff else _NOTHING
        )
        counters = self.counters
        counters.impressions += 1
        impression_id = imp.id
        pending = self._pending
        if impression_id in pending or impression_id in self._closed:
            counters.duplicate_impressions += 1
            self.last_impression_accepted = False
            return due
        if len(pending) >= self._max_pending:
            # Evict before inserting, so the new impression is never its own eviction.
            due = self._evict_oldest(due)
        pending[impression_id] = imp
        self._seq += 1
        heapq.heappush(heap, (ts, self._seq, imp))
        self.last_impression_accepted = True
        return due

    def add_click(self, impression_id: str, ts_ms: int) -> Sequence[Outcome]:
        """Attribute a click: windows closed by its ``ts`` first, then the positive if any."""
        if ts_ms > self._watermark:
            self._watermark = ts_ms
            self._cutoff = ts_ms - self._window_ms
        heap = self._heap
        due: Sequence[Outcome] = (
            self._close_expired() if heap and heap[0][0] < self._cutoff else _NOTHING
        )
        counters = self.counters
        counters.clicks += 1
        # Still pending after the advance implies ts_ms <= imp.ts + window: no window check here.
        imp = self._pending.pop(impression_id, None)
        if imp is None:
            closed_positive = self._closed.get(impression_id)
            if closed_positive is None:
                counters.orphan_clicks += 1
            elif closed_positive:
                counters.duplicate_clicks += 1
            else:
                counters.late_clicks += 1
            return due
        self._stale += 1
        counters.positives += 1
        self._remember_closed(impression_id, True)
        label_ts = ts_ms if ts_ms > imp.ts_ms else imp.ts_ms
        positive = Outcome(imp, 1, label_ts, CAUSE_CLICK)
        if self._stale > len(self._pending) + 1024:
            self._compact_heap()
        if due:
            assert isinstance(due, list)
            due.append(positive)
            return due
        return [positive]

    def advance_watermark(self, ts_ms: int) -> Sequence[Outcome]:
        """Move event time forward (e.g. on idle partitions); return windows it closed."""
        if ts_ms > self._watermark:
            self._watermark = ts_ms
            self._cutoff = ts_ms - self._window_ms
        heap = self._heap
        if heap and heap[0][0] < self._cutoff:
            return self._close_expired()
        return _NOTHING

    def flush(self) -> list[Outcome]:
        """Learn everything still pending as negative (end of a replay), oldest first."""
        out: list[Outcome] = []
        heap = self._heap
        pending = self._pending
        watermark = self._watermark
        while heap:
            imp = heapq.heappop(heap)[2]
            if pending.get(imp.id) is not imp:
                continue
            del pending[imp.id]
            self._remember_closed(imp.id, False)
            out.append(Outcome(imp, 0, watermark, CAUSE_FLUSHED))
        self._stale = 0
        self.counters.flushed += len(out)
        return out

    def _close_expired(self) -> list[Outcome]:
        out: list[Outcome] = []
        heap = self._heap
        pending = self._pending
        cutoff = self._cutoff
        watermark = self._watermark
        while heap and heap[0][0] < cutoff:
            imp = heapq.heappop(heap)[2]
            if pending.get(imp.id) is not imp:
                self._stale -= 1
                continue
            del pending[imp.id]
            self._remember_closed(imp.id, False)
            out.append(Outcome(imp, 0, watermark, CAUSE_WINDOW_CLOSED))
        self.counters.negatives_window += len(out)
        return out

    def _evict_oldest(self, due: Sequence[Outcome]) -> list[Outcome]:
        out = due if isinstance(due, list) else list(due)
        heap = self._heap
        pending = self._pending
        while len(pending) >= self._max_pending:
            imp = heapq.heappop(heap)[2]
            if pending.get(imp.id) is not imp:
                self._stale -= 1
                continue
            del pending[imp.id]
            self._remember_closed(imp.id, False)
            out.append(Outcome(imp, 0, self._watermark, CAUSE_EVICTED))
            self.counters.evicted += 1
        return out

    def _remember_closed(self, impression_id: str, positive: bool) -> None:
        # Ids are unique in the FIFO: an id in _closed is refused as a duplicate impression.
        self._closed[impression_id] = positive
        order = self._closed_order
        order.append(impression_id)
        if len(order) > self._max_closed_ids:
            del self._closed[order.popleft()]

    def _compact_heap(self) -> None:
        # Bounds memory when clicks are frequent; O(n) but amortised over >= n clicks.
        pending = self._pending
        self._heap = [e for e in self._heap if pending.get(e[2].id) is e[2]]
        heapq.heapify(self._heap)
        self._stale = 0

    def state(self) -> dict[str, StateValue]:
        """Everything needed to resume exactly: arrays and plain values only."""
        pending = list(self._pending.values())  # arrival order
        pending_blob, pending_offsets = _encode_ids([imp.id for imp in pending])
        closed_ids = list(self._closed_order)
        closed_blob, closed_offsets = _encode_ids(closed_ids)
        lengths = np.fromiter((len(imp.example.indices) for imp in pending), np.int64, len(pending))
        indptr = np.zeros(len(pending) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        if pending:
            indices = np.concatenate([imp.example.indices for imp in pending]).astype(np.int32)
            values = np.concatenate([imp.example.values for imp in pending]).astype(np.float64)
        else:
            indices = np.zeros(0, dtype=np.int32)
            values = np.zeros(0, dtype=np.float64)
        state: dict[str, StateValue] = {
            "format": _STATE_FORMAT,
            "window_ms": self._window_ms,
            "max_pending": self._max_pending,
            "max_closed_ids": self._max_closed_ids,
            "watermark_ms": self._watermark,
            "pending_id_blob": pending_blob,
            "pending_id_offsets": pending_offsets,
            "pending_ts_ms": np.array([imp.ts_ms for imp in pending], dtype=np.int64),
            "pending_p_served": np.array([imp.p_served for imp in pending], dtype=np.float64),
            "pending_model_version": np.array(
                [imp.model_version for imp in pending], dtype=np.int64
            ),
            "pending_indptr": indptr,
            "pending_indices": indices,
            "pending_values": values,
            "closed_id_blob": closed_blob,
            "closed_id_offsets": closed_offsets,
            "closed_positive": np.array([self._closed[i] for i in closed_ids], dtype=np.bool_),
        }
        for name, value in asdict(self.counters).items():
            state[f"count_{name}"] = int(value)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> AttributionJoiner:
        """Rebuild a joiner from ``state()``; future outputs equal an uninterrupted run's."""
        if state.get("format") != _STATE_FORMAT:
            raise CheckpointCorrupt(f"joiner state: unknown format {state.get('format')!r}")
        joiner = cls(
            _get_int(state, "window_ms"),
            _get_int(state, "max_pending"),
            _get_int(state, "max_closed_ids"),
        )
        watermark = _get_int(state, "watermark_ms")
        joiner._watermark = watermark
        joiner._cutoff = watermark - joiner._window_ms

        ids = _decode_ids(state, "pending_id_blob", "pending_id_offsets")
        n = len(ids)
        ts = _get_array(state, "pending_ts_ms", n).tolist()
        p_served = _get_array(state, "pending_p_served", n).tolist()
        versions = _get_array(state, "pending_model_version", n).tolist()
        indptr_array = _get_array(state, "pending_indptr", n + 1)
        nnz = int(indptr_array[-1])
        indptr = indptr_array.tolist()
        if indptr[0] != 0 or any(a > b for a, b in zip(indptr, indptr[1:])):
            raise CheckpointCorrupt("joiner state: pending_indptr is not monotone from 0")
        indices = _get_array(state, "pending_indices", nnz).astype(np.int32, copy=False)
        values = _get_array(state, "pending_values", nnz).astype(np.float64, copy=False)
        heap = joiner._heap
        pending = joiner._pending
        for i, impression_id in enumerate(ids):
            example = SparseExample(
                indices[indptr[i] : indptr[i + 1]], values[indptr[i] : indptr[i + 1]]
            )
            imp = PendingImpression(impression_id, ts[i], example, p_served[i], versions[i])
            pending[impression_id] = imp
            # Renumbered arrivals keep their relative order, which is all the heap compares.
            heap.append((imp.ts_ms, i + 1, imp))
        if len(pending) != n:
            raise CheckpointCorrupt("joiner state: duplicate pending ids")
        heapq.heapify(heap)
        joiner._seq = n

        closed_ids = _decode_ids(state, "closed_id_blob", "closed_id_offsets")
        positive = _get_array(state, "closed_positive", len(closed_ids)).tolist()
        joiner._closed = {i: bool(p) for i, p in zip(closed_ids, positive)}
        joiner._closed_order = deque(closed_ids)
        if len(joiner._closed) != len(closed_ids):
            raise CheckpointCorrupt("joiner state: duplicate closed ids")

        for f in fields(JoinCounters):
            setattr(joiner.counters, f.name, _get_int(state, f"count_{f.name}"))
        return joiner


def _encode_ids(ids: list[str]) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    encoded = [i.encode("utf-8") for i in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)), out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


def _decode_ids(state: Mapping[str, object], blob_key: str, offsets_key: str) -> list[str]:
    offsets_array = _get_array(state, offsets_key)
    blob = _get_array(state, blob_key).astype(np.uint8, copy=False).tobytes()
    offsets = offsets_array.tolist()
    if not offsets or offsets[0] != 0 or offsets[-1] != len(blob):
        raise CheckpointCorrupt(f"joiner state: {offsets_key} does not span {blob_key}")
    try:
        return [blob[a:b].decode("utf-8") for a, b in zip(offsets, offsets[1:])]
    except (UnicodeDecodeError, TypeError) as error:
        raise CheckpointCorrupt(f"joiner state: bad ids in {blob_key}: {error}") from error


def _get_int(state: Mapping[str, object], key: str) -> int:
    value = state.get(key)
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointCorrupt(f"joiner state: {key} must be an int, got {value!r}")
    return value


def _get_array(
    state: Mapping[str, object], key: str, length: int | None = None
) -> npt.NDArray[np.generic]:
    value = state.get(key)
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise CheckpointCorrupt(f"joiner state: {key} must be a 1-d array")
    if length is not None and len(value) != length:
        raise CheckpointCorrupt(f"joiner state: {key} has {len(value)} entries, expected {length}")
    return value
