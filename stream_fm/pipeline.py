"""decode -> join -> score -> learn -> evaluate, one batch of records at a time.

The replay, the bench and the Kafka worker all push records through this one class, so the
numbers operators watch are computed the same way everywhere. Within a batch every operation
runs strictly in record order (the engine's ``run_batch``); Python overhead is paid per batch.

>>> from stream_fm.model import FastFM, FMParams
>>> pipe = Pipeline(FastFM(FMParams(n_buckets=1 << 16)), EventDecoder(FeatureHasher(bits=16)),
...                 window_ms=1000, max_pending=100, auc_window=100)
>>> result = pipe.process([
...     (0, b'{"type":"impression","id":"a","ts":0,"features":{"site":"s1"}}'),
...     (0, b'{"type":"click","id":"a","ts":400}'),
...     (0, b'not json'),
... ])
>>> [p.id for p in result.predictions], result.learned_positives, result.invalid[0].reason
(['a'], 1, 'not_json')
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from stream_fm.errors import InvalidEvent
from stream_fm.evaluate import ProgressiveValidation
from stream_fm.events import Click, Event, EventDecoder, Impression, Labeled
from stream_fm.features import FeatureHasher
from stream_fm.join import AttributionJoiner, Outcome, PendingImpression
from stream_fm.model.base import OP_LEARN, OP_SCORE, Engine, OpBatch, SparseExample

__all__ = ["FeatureHasher", "Pipeline"]

_EMPTY_INDICES = np.zeros(0, dtype=np.int32)
_EMPTY_VALUES = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Prediction:
    """One served probability; ``position`` is the record's index in the batch."""

    id: str
    p_click: float
    ts_ms: int
    model_version: int
    position: int


@dataclass(frozen=True, slots=True)
class Rejected:
    position: int
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class Learned:
    """A labeled example the model learned from, with the p served for it before learning."""

    id: str
    label: int
    p_served: float
    impression_ts_ms: int
    label_ts_ms: int
    cause: str


@dataclass(slots=True)
class BatchResult:
    predictions: list[Prediction] = field(default_factory=list)
    learned: list[Learned] = field(default_factory=list)
    invalid: list[Rejected] = field(default_factory=list)
    events_by_type: Counter[str] = field(default_factory=Counter)
    learned_positives: int = 0
    learned_negatives: int = 0
    logloss_sum: float = 0.0
    prediction_sum: float = 0.0
    click_delays_ms: list[int] = field(default_factory=list)


class _BatchBuilder:
    """Collects rows (CSR) and operations for one ``run_batch`` call."""

    __slots__ = ("flat_keys", "flat_values", "hasher", "indptr", "kind", "label", "old_pieces", "row")

    def __init__(self, hasher: FeatureHasher) -> None:
        self.hasher = hasher
        self.flat_keys: list[str] = []
        self.flat_values: list[float] = []
        self.indptr: list[int] = [0]
        self.kind: list[int] = []
        self.row: list[int] = []
        self.label: list[int] = []
        # Examples of impressions from earlier batches, appended after the new rows.
        self.old_pieces: list[SparseExample] = []

    def new_row(self, keys: list[str], values: list[float]) -> int:
        self.flat_keys += keys
        self.flat_values += values
        self.indptr.append(len(self.flat_keys))
        return len(self.indptr) - 2

    def build(self) -> tuple[OpBatch, int]:
        n_new = len(self.indptr) - 1
        indices = self.hasher.buckets(self.flat_keys)
        values = np.array(self.flat_values, dtype=np.float64)
        indptr = np.array(self.indptr, dtype=np.int64)
        if self.old_pieces:
            lengths = np.fromiter((len(x.indices) for x in self.old_pieces), np.int64, len(self.old_pieces))
            indptr = np.concatenate([indptr, indptr[-1] + np.cumsum(lengths)])
            indices = np.concatenate([indices, *(x.indices for x in self.old_pieces)])
            values = np.concatenate([values, *(x.values for x in self.old_pieces)])
        batch = OpBatch(
            indptr=indptr,
            indices=indices,
            values=values,
            op_kind=np.array(self.kind, dtype=np.int8),
            op_row=np.array(self.row, dtype=np.int64),
            op_label=np.array(self.label, dtype=np.int8),
        )
        return batch, n_new


class Pipeline:
    """The per-record logic of stream_fm, shared by replay, bench and worker.

    ``process`` takes ``(partition, raw_bytes)`` pairs in record order. Each partition has
    its own joiner (pending impressions and watermark are state of a partition); the model
    and the progressive-validation accumulator are shared.
    """

    def __init__(
        self,
        engine: Engine,
        decoder: EventDecoder,
        window_ms: int,
        max_pending: int,
        auc_window: int = 100_000,
        evaluator: ProgressiveValidation | None = None,
    ) -> None:
        self.engine = engine
        self.decoder = decoder
        self.window_ms = window_ms
        self.max_pending = max_pending
        self.evaluator = evaluator or ProgressiveValidation(window=auc_window)
        self.joiners: dict[Hashable, AttributionJoiner] = {}

    def joiner(self, partition: Hashable) -> AttributionJoiner:
        joiner = self.joiners.get(partition)
        if joiner is None:
            joiner = self.joiners[partition] = AttributionJoiner(self.window_ms, self.max_pending)
        return joiner

    @property
    def pending_count(self) -> int:
        return sum(j.pending_count for j in self.joiners.values())

    def flush(self) -> BatchResult:
        """Close every pending window (the end of a finite replay) and learn negatives."""
        closing = [outcome for joiner in self.joiners.values() for outcome in joiner.flush()]
        return self.process_events([], closing=closing)

    def join_counters(self) -> dict[str, int]:
        """Joiner counters summed over partitions."""
        total: Counter[str] = Counter()
        for joiner in self.joiners.values():
            total.update(asdict(joiner.counters))
        return dict(total)

    def process(self, records: Sequence[tuple[Hashable, bytes]]) -> BatchResult:
        """Decode, join, score and learn one batch; return what to publish and observe."""
        decode = self.decoder.decode
        events: list[tuple[Hashable, Event | None]] = []
        invalid: list[Rejected] = []
        for position, (partition, raw) in enumerate(records):
            try:
                events.append((partition, decode(raw)))
            except InvalidEvent as error:
                invalid.append(Rejected(position, error.reason, error.detail))
                events.append((partition, None))
        return self.process_events(events, invalid)

    def process_events(
        self,
        events: Sequence[tuple[Hashable, Event | None]],
        invalid: list[Rejected] | None = None,
        closing: Sequence[Outcome] = (),
    ) -> BatchResult:
        """Join, score and learn decoded events (None marks a rejected record's position).

        ``closing`` outcomes are learned after the events (``flush`` uses it).
        """
        result = BatchResult(invalid=invalid or [])
        builder = _BatchBuilder(self.decoder.hasher)
        # Per op: the pending impression whose p it serves/learns (None for labeled rows).
        op_pending: list[PendingImpression | None] = []
        op_position: list[int] = []
        new_pending_rows: list[tuple[PendingImpression, int, int]] = []
        learn_outcomes: list[tuple[int, Outcome | Labeled]] = []
        counts = result.events_by_type
        # Rows of this batch's impressions, by object identity, for learn ops within the batch.
        row_of: dict[int, int] = {}

        def add_learns(outcomes: Sequence[Outcome]) -> None:
            for outcome in outcomes:
                imp = outcome.impression
                row = row_of.get(id(imp))
                if row is None:
                    builder.old_pieces.append(imp.example)
                    row = -len(builder.old_pieces)  # fixed up in build order below
                builder.kind.append(OP_LEARN)
                builder.row.append(row)
                builder.label.append(outcome.label)
                op_pending.append(imp)
                op_position.append(-1)
                learn_outcomes.append((len(builder.kind) - 1, outcome))

        for position, (partition, event) in enumerate(events):
            if type(event) is Impression:
                counts["impression"] += 1
                joiner = self.joiner(partition)
                pending = PendingImpression(event.id, event.ts_ms, _PLACEHOLDER, math.nan, 0)
                duplicates_before = joiner.counters.duplicate_impressions
                outcomes = joiner.add_impression(pending)
                add_learns(outcomes)
                if joiner.counters.duplicate_impressions != duplicates_before:
                    continue
                start = len(builder.flat_keys)
                row = builder.new_row(event.keys, event.values)
                row_of[id(pending)] = row
                new_pending_rows.append((pending, start, len(builder.flat_keys)))
                builder.kind.append(OP_SCORE)
                builder.row.append(row)
                builder.label.append(0)
                op_pending.append(pending)
                op_position.append(position)
            elif type(event) is Click:
                counts["click"] += 1
                add_learns(self.joiner(partition).add_click(event.id, event.ts_ms))
            elif type(event) is Labeled:
                counts["labeled"] += 1
                row = builder.new_row(event.keys, event.values)
                builder.kind += (OP_SCORE, OP_LEARN)
                builder.row += (row, row)
                builder.label += (0, event.label)
                op_pending += (None, None)
                op_position += (position, -1)
                learn_outcomes.append((len(builder.kind) - 1, event))

        add_learns(closing)
        if not builder.kind:
            return result
        batch, n_new = builder.build()
        # Old examples were numbered -1, -2, ... in arrival order; they follow the new rows.
        rows = batch.op_row
        old = rows < 0
        rows[old] = n_new - 1 - rows[old]
        version_before = self.engine.n_learned
        probabilities = self.engine.run_batch(batch)
        self._serve(result, batch, probabilities, op_pending, op_position, version_before)
        for pending, start, end in new_pending_rows:
            pending.example = SparseExample(batch.indices[start:end], batch.values[start:end])
        self._learned(result, probabilities, learn_outcomes)
        return result

    def _serve(
        self,
        result: BatchResult,
        batch: OpBatch,
        probabilities: npt.NDArray[np.float64],
        op_pending: list[PendingImpression | None],
        op_position: list[int],
        version: int,
    ) -> None:
        predictions = result.predictions
        for op, kind in enumerate(batch.op_kind.tolist()):
            if kind == OP_LEARN:
                version += 1
                continue
            p = float(probabilities[op])
            pending = op_pending[op]
            if pending is not None:
                pending.p_served = p
                pending.model_version = version
                predictions.append(Prediction(pending.id, p, pending.ts_ms, version, op_position[op]))

    def _learned(
        self,
        result: BatchResult,
        probabilities: npt.NDArray[np.float64],
        learn_outcomes: list[tuple[int, Outcome | Labeled]],
    ) -> None:
        served = np.empty(len(learn_outcomes), dtype=np.float64)
        labels = np.empty(len(learn_outcomes), dtype=np.int8)
        learned = result.learned
        for i, (op, outcome) in enumerate(learn_outcomes):
            if type(outcome) is Labeled:
                # The score op right before this learn op served it.
                p = float(probabilities[op - 1])
                learned.append(Learned(outcome.id, outcome.label, p, outcome.ts_ms, outcome.ts_ms, "labeled"))
                label = outcome.label
            else:
                assert isinstance(outcome, Outcome)
                imp = outcome.impression
                p = imp.p_served
                label = outcome.label
                learned.append(Learned(imp.id, label, p, imp.ts_ms, outcome.label_ts_ms, outcome.cause))
                if label == 1:
                    result.click_delays_ms.append(outcome.label_ts_ms - imp.ts_ms)
            served[i] = p
            labels[i] = label
        positives = int(labels.sum())
        result.learned_positives = positives
        result.learned_negatives = len(labels) - positives
        before = self.evaluator.logloss_sum
        self.evaluator.update_many(served, labels)
        result.logloss_sum = self.evaluator.logloss_sum - before
        result.prediction_sum = float(served.sum())


_PLACEHOLDER = SparseExample(_EMPTY_INDICES, _EMPTY_VALUES)
