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
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from stream_fm.config import Settings
from stream_fm.errors import InvalidEvent
from stream_fm.evaluate import ProgressiveValidation
from stream_fm.events import Click, Event, EventDecoder, Impression, Labeled
from stream_fm.features import FeatureHasher
from stream_fm.join import (
    CAUSE_HELD,
    CLICK_EARLY,
    FAKE_NEGATIVE,
    LABEL_POLICIES,
    WINDOW,
    AttributionJoiner,
    Outcome,
    PendingImpression,
)
from stream_fm.model.base import OP_LEARN, OP_LEARN_FNW, OP_SCORE, Engine, OpBatch, SparseExample
from stream_fm.model.fast import FastFM
from stream_fm.scan import CLICK, FALLBACK, IMPRESSION, INVALID, LABELED, Columns, scan

__all__ = ["FeatureHasher", "Pipeline"]

_EMPTY_INDICES = np.zeros(0, dtype=np.int32)
_EMPTY_VALUES = np.zeros(0, dtype=np.float64)


class Prediction(NamedTuple):
    """One served probability; ``position`` is the record's index in the batch (a NamedTuple:
    one per impression, built at a third of a frozen dataclass's cost)."""

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


class Evaluated(NamedTuple):
    """Final labels of a batch: the p served for each, its label and its impression's ts."""

    p_served: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int8]
    impression_ts_ms: npt.NDArray[np.int64]


class BatchResult:
    """What one batch produced. ``predictions`` and ``learned`` are built on first access:
    the replay never needs the per-example objects, the worker does."""

    __slots__ = (
        "_learned",
        "_learned_items",
        "_learned_p",
        "_predictions",
        "_scored",
        "_scored_positions",
        "click_delays_ms",
        "evaluated",
        "events_by_type",
        "invalid",
        "join_counts",
        "learned_negatives",
        "learned_positives",
        "logloss_sum",
        "nonfinite_outputs",
        "prediction_sum",
        "refused_updates",
    )

    def __init__(self, invalid: list[Rejected] | None = None) -> None:
        self.invalid: list[Rejected] = invalid if invalid is not None else []
        self.events_by_type: dict[str, int] = {}
        self.learned_positives = 0
        self.learned_negatives = 0
        self.logloss_sum = 0.0
        self.prediction_sum = 0.0
        self.click_delays_ms: list[int] = []
        #: The batch's final labels as arrays: (served p, label, impression ts) in the order
        #: they were evaluated (for reports that need every example, e.g. whole-stream AUC).
        self.evaluated: Evaluated | None = None
        #: What the joiners counted during this batch (late, orphan, duplicate, evicted, ...).
        self.join_counts: dict[str, int] = {}
        #: Learn steps the numeric guard refused, and non-finite scores, in this batch.
        self.refused_updates = 0
        self.nonfinite_outputs = 0
        self._scored: list[PendingImpression] = []
        self._scored_positions: list[int] = []
        self._learned_items: list[Outcome | Labeled] = []
        self._learned_p: list[float] = []
        self._predictions: list[Prediction] | None = None
        self._learned: list[Learned] | None = None

    @property
    def served(self) -> list[PendingImpression]:
        """The impressions scored in this batch, in record order (``p_served`` set)."""
        return self._scored

    @property
    def served_positions(self) -> list[int]:
        """Each served impression's record index in the batch."""
        return self._scored_positions

    @property
    def predictions(self) -> list[Prediction]:
        if self._predictions is None:
            self._predictions = [
                Prediction(imp.id, imp.p_served, imp.ts_ms, imp.model_version, position)
                for imp, position in zip(self._scored, self._scored_positions, strict=True)
            ]
        return self._predictions

    @property
    def learned(self) -> list[Learned]:
        if self._learned is None:
            out: list[Learned] = []
            for item, p in zip(self._learned_items, self._learned_p, strict=True):
                if type(item) is Labeled:
                    out.append(Learned(item.id, item.label, p, item.ts_ms, item.ts_ms, "labeled"))
                else:
                    assert isinstance(item, Outcome)
                    imp = item.impression
                    out.append(
                        Learned(imp.id, item.label, p, imp.ts_ms, item.label_ts_ms, item.cause)
                    )
            self._learned = out
        return self._learned


def decoder_for(settings: Settings) -> EventDecoder:
    """The decoder (and its feature hasher) the settings describe."""
    hasher = FeatureHasher(
        settings.hash_bits, settings.hash_seed, settings.numeric_transform, settings.max_features
    )
    return EventDecoder(hasher, settings.max_event_bytes, round(settings.max_future_skew_s * 1000))


class Pipeline:
    """The per-record logic of stream_fm, shared by replay, bench and worker.

    ``process`` takes ``(partition, raw_bytes)`` pairs in record order. Each partition has
    its own joiner (pending impressions and watermark are state of a partition); the model
    and the progressive-validation accumulator are shared. ``label_policy`` is one of
    ``LABEL_POLICIES``.
    """

    def __init__(
        self,
        engine: Engine,
        decoder: EventDecoder,
        window_ms: int,
        max_pending: int,
        auc_window: int = 100_000,
        evaluator: ProgressiveValidation | None = None,
        label_policy: str = FAKE_NEGATIVE,
    ) -> None:
        if label_policy not in LABEL_POLICIES:
            raise ValueError(f"label_policy must be one of {LABEL_POLICIES}, got {label_policy!r}")
        self.engine = engine
        self.decoder = decoder
        self.window_ms = window_ms
        self.max_pending = max_pending
        self.label_policy = label_policy
        self.evaluator = evaluator or ProgressiveValidation(window=auc_window)
        self.joiners: dict[Hashable, AttributionJoiner] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        engine: Engine | None = None,
        evaluator: ProgressiveValidation | None = None,
    ) -> Pipeline:
        """The pipeline the settings describe: their hasher, decoder, window and bounds, and
        the production engine unless another is given."""
        return cls(
            engine if engine is not None else FastFM(settings.model),
            decoder_for(settings),
            settings.attribution_window_ms,
            settings.max_pending_impressions,
            auc_window=settings.auc_window,
            evaluator=evaluator,
            label_policy=settings.label_policy,
        )

    def joiner(self, partition: Hashable) -> AttributionJoiner:
        joiner = self.joiners.get(partition)
        if joiner is None:
            joiner = self.joiners[partition] = AttributionJoiner(
                self.window_ms, self.max_pending, hold_positives=self.label_policy == WINDOW
            )
        return joiner

    @property
    def pending_count(self) -> int:
        return sum(j.pending_count for j in self.joiners.values())

    def flush(self) -> BatchResult:
        """Close every pending window (the end of a finite replay) and learn negatives."""
        closing = [outcome for joiner in self.joiners.values() for outcome in joiner.flush()]
        return self.process_events([], closing=closing)

    def join_counters(self) -> dict[str, int]:
        """Joiner counters summed over partitions (totals since each joiner began)."""
        total: Counter[str] = Counter()
        for joiner in self.joiners.values():
            total.update(asdict(joiner.counters))
        return dict(total)

    # state: what a checkpoint holds of the pipeline, and what it is restored from
    def state(self, into: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The model, the accumulators and every partition's joiner: arrays and plain data.

        The joiners' states are captures, encoded when first read (``JoinerCapture``), so the
        caller's pause is their shallow copies; ``into``: an earlier state whose model arrays
        may be written over (see ``Engine.state``)."""
        return {
            "engine": self.engine.state(into["engine"] if into is not None else None),
            "evaluator": self.evaluator.state(),
            "partitions": {str(p): joiner.capture() for p, joiner in self.joiners.items()},
        }

    def restore(self, state: Mapping[str, Any], partitions: Collection[Hashable] = ()) -> None:
        """Back to ``state``: the model (step sizes may be retuned since), the accumulators,
        and the joiners of ``partitions`` (the others are dropped: another worker may hold
        them by now)."""
        self.engine.load_state(state["engine"], strict=False)
        self.evaluator = ProgressiveValidation.from_state(state["evaluator"])
        self.joiners = {}
        for key, joiner in state["partitions"].items():
            if int(key) in partitions:
                self.restore_partition(int(key), joiner)

    def restore_partition(self, partition: Hashable, joiner_state: Mapping[str, Any]) -> None:
        """A partition taken over with its pending impressions (unless it is already here)."""
        if partition not in self.joiners:
            joiner = AttributionJoiner.from_state(joiner_state)
            # A policy changed across a restart applies from now on: what the joiner holds
            # still comes out (and is learned) when its window closes.
            joiner.hold_positives = self.label_policy == WINDOW
            self.joiners[partition] = joiner

    def drop_partitions(self, keep: Collection[Hashable]) -> None:
        """Forget every partition's joiner but those of ``keep``."""
        for partition in [p for p in self.joiners if p not in keep]:
            del self.joiners[partition]

    def process(
        self, records: Sequence[tuple[Hashable, bytes | InvalidEvent]], now_ms: int | None = None
    ) -> BatchResult:
        """Decode, join, score and learn one batch; return what to publish and observe.

        A record given as an ``InvalidEvent`` was rejected before decoding (the client could
        not read it). ``now_ms`` is the worker's clock, for the decoder's future-timestamp
        bound (a replay passes none: a file has no "now")."""
        values = [raw for _, raw in records]
        return self.process_columns(values, [partition for partition, _ in records], now_ms)

    def process_columns(
        self,
        values: Sequence[bytes | InvalidEvent],
        partitions: Sequence[Hashable],
        now_ms: int | None = None,
    ) -> BatchResult:
        """``process`` with the records' values and partitions as two lists (the worker)."""
        rows, invalid = self.decode(values, now_ms)
        return self._run(rows, partitions, invalid, ())

    def process_values(
        self, values: Sequence[bytes], partition: Hashable = 0, now_ms: int | None = None
    ) -> BatchResult:
        """``process`` for records of one partition (a replayed file)."""
        return self.process_columns(values, [partition] * len(values), now_ms)

    def decode(
        self, values: Sequence[bytes | InvalidEvent], now_ms: int | None = None
    ) -> tuple[Rows, list[Rejected]]:
        """Records -> rows: the compiled scanner (``scan``) reads what it understands, the
        decoder the rest, one by one, so each invalid record gets the decoder's reason."""
        decoder = self.decoder
        latest = decoder.latest_ts_ms(now_ms)
        raw = [v if type(v) is bytes else b"" for v in values]
        columns = scan(raw, decoder.hasher, decoder.max_event_bytes, latest)
        kinds = columns.kind.tolist()
        ts = columns.ts.tolist()
        labels = columns.label.tolist()
        ids = columns.ids()
        invalid: list[Rejected] = []
        decoded: dict[int, Impression | Labeled] = {}
        for position in np.flatnonzero(columns.kind == FALLBACK).tolist():
            value = values[position]
            try:
                if type(value) is InvalidEvent:
                    raise value
                event = decoder.decode(value, latest)  # type: ignore[arg-type]
            except InvalidEvent as error:
                invalid.append(Rejected(position, error.reason, error.detail))
                kinds[position] = INVALID
                continue
            ids[position], ts[position] = event.id, event.ts_ms
            if type(event) is Click:
                kinds[position] = CLICK
                continue
            assert isinstance(event, Impression | Labeled)
            kinds[position] = IMPRESSION if type(event) is Impression else LABELED
            if type(event) is Labeled:
                labels[position] = event.label
            decoded[position] = event
        indptr, indices, values_ = columns.indptr, columns.indices, columns.values
        if decoded:
            indptr, indices, values_ = _splice(columns, decoded, decoder.hasher)
        return Rows(kinds, ts, labels, ids, indptr, indices, values_), invalid

    def process_events(
        self,
        events: Sequence[tuple[Hashable, Event | None]],
        invalid: list[Rejected] | None = None,
        closing: Sequence[Outcome] = (),
    ) -> BatchResult:
        """Join, score and learn decoded events (None marks a rejected record's position).

        ``closing`` outcomes are learned after the events (``flush`` uses it)."""
        return self._run(
            rows_of([event for _, event in events], self.decoder.hasher),
            [partition for partition, _ in events],
            invalid,
            closing,
        )

    def _run(
        self,
        rows: Rows,
        partitions: Sequence[Hashable],
        invalid: list[Rejected] | None,
        closing: Sequence[Outcome],
    ) -> BatchResult:
        """One batch of rows; the result carries what the joiners and the numeric guard
        counted in it."""
        joins_before = self.join_counters()
        refused, nonfinite = self.engine.refused_updates, self.engine.nonfinite_outputs
        result = self._process_rows(rows, partitions, invalid, closing)
        result.join_counts = {
            key: n - joins_before.get(key, 0) for key, n in self.join_counters().items()
        }
        result.refused_updates = self.engine.refused_updates - refused
        result.nonfinite_outputs = self.engine.nonfinite_outputs - nonfinite
        return result

    def _process_rows(
        self,
        batch: Rows,
        partitions: Sequence[Hashable],
        invalid: list[Rejected] | None,
        closing: Sequence[Outcome],
    ) -> BatchResult:
        """The hot path of the product: per record it only joins and appends ops to flat
        lists; the features are already arrays, and the model and the evaluation run once
        per batch."""
        result = BatchResult(invalid)
        kinds: list[int] = []
        rows: list[int] = []
        labels: list[int] = []
        # Examples of impressions scored in earlier batches, appended after this batch's rows.
        old_pieces: list[SparseExample] = []
        scored = result._scored
        scored_positions = result._scored_positions
        score_ops: list[int] = []
        # Final labels for progressive validation, the same whatever the label policy; for a
        # labeled event, the index of its own score op (-1 for joined outcomes).
        evaluated = result._learned_items
        evaluated_ops: list[int] = []
        # This batch's impressions by object identity -> their row, for learns in this batch.
        row_of: dict[int, int] = {}
        last_partition: Hashable = _NO_PARTITION
        joiner: AttributionJoiner | None = None
        policy = self.label_policy
        fake_negatives = policy == FAKE_NEGATIVE
        learn_kind = OP_LEARN_FNW if fake_negatives else OP_LEARN

        def learn(imp: PendingImpression, label: int, kind: int) -> None:
            row = row_of.get(id(imp))
            if row is None:
                old_pieces.append(imp.example)
                row = -len(old_pieces)  # renumbered after this batch's rows in _build
            kinds.append(kind)
            rows.append(row)
            labels.append(label)

        def settle(outcomes: Sequence[Outcome]) -> None:
            """Final labels are evaluated; what the policy learns from them, it learns."""
            for outcome in outcomes:
                cause, label = outcome.cause, outcome.label
                if cause == CAUSE_HELD:  # window: a positive whose window just closed
                    learn(outcome.impression, 1, OP_LEARN)
                    continue
                evaluated.append(outcome)
                evaluated_ops.append(-1)
                if policy == CLICK_EARLY or (label == 0) == (policy == WINDOW):
                    learn(outcome.impression, label, learn_kind)

        ids, ts = batch.ids, batch.ts
        for position, kind in enumerate(batch.kind):
            if kind == IMPRESSION:
                partition = partitions[position]
                if joiner is None or partition != last_partition:
                    joiner, last_partition = self.joiner(partition), partition
                pending = PendingImpression(ids[position], ts[position], _PLACEHOLDER, math.nan, 0)
                due = joiner.add_impression(pending)
                if due:
                    settle(due)
                if not joiner.last_impression_accepted:
                    continue  # a duplicate id: counted by the joiner, not scored again
                row_of[id(pending)] = position
                score_ops.append(len(kinds))
                if fake_negatives:  # learned at once as a negative, right after it is served
                    kinds += _SCORE_THEN_FNW
                    rows += (position, position)
                    labels += _TWO_ZEROS
                else:
                    kinds.append(OP_SCORE)
                    rows.append(position)
                    labels.append(0)
                scored.append(pending)
                scored_positions.append(position)
            elif kind == CLICK:
                partition = partitions[position]
                if joiner is None or partition != last_partition:
                    joiner, last_partition = self.joiner(partition), partition
                due = joiner.add_click(ids[position], ts[position])
                if due:
                    settle(due)
            elif kind == LABELED:
                label = batch.label[position]
                evaluated.append(Labeled(ids[position], ts[position], label, [], []))
                evaluated_ops.append(len(kinds))
                kinds += _SCORE_THEN_LEARN
                rows += (position, position)
                labels += (0, label)
        if closing:
            settle(closing)
        counts = result.events_by_type
        for name, n in zip(
            _KIND_NAMES, np.bincount(batch.kind, minlength=4)[1:4].tolist(), strict=True
        ):
            if n:
                counts[name] = n
        if not kinds:
            # Nothing to run (fake negatives learn nothing when a window closes), yet labels
            # may have become final: they are evaluated all the same.
            if evaluated:
                self._evaluate(result, np.zeros(0), evaluated_ops)
            return result

        op_batch = self._build(batch, kinds, rows, labels, old_pieces)
        version_before = self.engine.n_learned
        probabilities = self.engine.run_batch(op_batch)

        if score_ops:
            # Serve: each score op's p and the model version (examples learned) it saw.
            score_index = np.array(score_ops, dtype=np.int64)
            learned_before = np.cumsum(op_batch.op_kind != OP_SCORE)[score_index]
            served_p = probabilities[score_index].tolist()
            versions = (learned_before + version_before).tolist()
            row_index = np.array(scored_positions, dtype=np.int64)
            starts = op_batch.indptr[row_index].tolist()
            ends = op_batch.indptr[row_index + 1].tolist()
            indices, values = op_batch.indices, op_batch.values
            for pending, p, version, a, b in zip(
                scored, served_p, versions, starts, ends, strict=True
            ):
                pending.p_served = p
                pending.model_version = version
                pending.example = SparseExample(indices[a:b], values[a:b])
        if evaluated:
            self._evaluate(result, probabilities, evaluated_ops)
        return result

    def _build(
        self,
        batch: Rows,
        kinds: list[int],
        rows_list: list[int],
        labels: list[int],
        old_pieces: list[SparseExample],
    ) -> OpBatch:
        indices, values, indptr = batch.indices, batch.values, batch.indptr
        rows = np.array(rows_list, dtype=np.int64)
        if old_pieces:
            n_new = len(indptr) - 1
            lengths = np.fromiter((len(x.indices) for x in old_pieces), np.int64, len(old_pieces))
            indptr = np.concatenate([indptr, indptr[-1] + np.cumsum(lengths)])
            indices = np.concatenate([indices, *(x.indices for x in old_pieces)])
            values = np.concatenate([values, *(x.values for x in old_pieces)])
            old = rows < 0
            rows[old] = n_new - 1 - rows[old]  # -1, -2, ... -> n_new, n_new + 1, ...
        return OpBatch(
            indptr=indptr,
            indices=indices,
            values=values,
            op_kind=np.array(kinds, dtype=np.int8),
            op_row=rows,
            op_label=np.array(labels, dtype=np.int8),
        )

    def _evaluate(
        self,
        result: BatchResult,
        probabilities: npt.NDArray[np.float64],
        evaluated_ops: list[int],
    ) -> None:
        """Progressive validation on the p served before learning, never the p after."""
        served = result._learned_p
        delays = result.click_delays_ms
        label_list: list[int] = []
        ts_list: list[int] = []
        for item, op in zip(result._learned_items, evaluated_ops, strict=True):
            if type(item) is Labeled:
                served.append(float(probabilities[op]))  # its own score op
                label_list.append(item.label)
                ts_list.append(item.ts_ms)
            else:
                assert isinstance(item, Outcome)
                imp = item.impression
                served.append(imp.p_served)
                label_list.append(item.label)
                ts_list.append(imp.ts_ms)
                if item.label == 1:
                    delays.append(item.label_ts_ms - imp.ts_ms)
        served_array = np.array(served, dtype=np.float64)
        label_array = np.array(label_list, dtype=np.int8)
        result.evaluated = Evaluated(served_array, label_array, np.array(ts_list, dtype=np.int64))
        positives = int(label_array.sum())
        result.learned_positives = positives
        result.learned_negatives = len(label_array) - positives
        result.logloss_sum = self.evaluator.update_many(served_array, label_array)
        result.prediction_sum = float(served_array.sum())


_PLACEHOLDER = SparseExample(_EMPTY_INDICES, _EMPTY_VALUES)
_NO_PARTITION = object()
_KIND_NAMES = ("impression", "click", "labeled")
_SCORE_THEN_FNW = (OP_SCORE, OP_LEARN_FNW)
_SCORE_THEN_LEARN = (OP_SCORE, OP_LEARN)
_TWO_ZEROS = (0, 0)


class Rows(NamedTuple):
    """A decoded batch: per record its kind (``scan``'s codes, INVALID for a rejected one),
    ts, label and id, and its hashed features as row ``i`` of a CSR matrix."""

    kind: list[int]
    ts: list[int]
    label: list[int]
    ids: list[str]
    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int32]
    values: npt.NDArray[np.float64]


def rows_of(events: Sequence[Event | None], hasher: FeatureHasher) -> Rows:
    """Decoded events (None: rejected) as rows, every key hashed in one call."""
    kinds: list[int] = []
    ts: list[int] = []
    labels: list[int] = []
    ids: list[str] = []
    keys: list[str] = []
    values: list[float] = []
    indptr = [0]
    for event in events:
        kind = type(event)
        if kind is Impression or kind is Labeled:
            assert isinstance(event, Impression | Labeled)
            keys += event.keys
            values += event.values
        kinds.append(_KIND_CODES.get(kind, INVALID))
        ts.append(event.ts_ms if event is not None else 0)
        labels.append(event.label if type(event) is Labeled else 0)
        ids.append(event.id if event is not None else "")
        indptr.append(len(keys))
    return Rows(
        kinds,
        ts,
        labels,
        ids,
        np.array(indptr, dtype=np.int64),
        hasher.buckets(keys),
        np.array(values, dtype=np.float64),
    )


_KIND_CODES: dict[type, int] = {Impression: IMPRESSION, Click: CLICK, Labeled: LABELED}


def _splice(
    columns: Columns, decoded: Mapping[int, Impression | Labeled], hasher: FeatureHasher
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float64]]:
    """The scanner's CSR with the features of the rows the decoder read put in their place."""
    indptr = columns.indptr
    lengths = np.diff(indptr)
    index_pieces: list[npt.NDArray[np.int32]] = []
    value_pieces: list[npt.NDArray[np.float64]] = []
    done = 0
    for position in sorted(decoded):
        event = decoded[position]
        index_pieces.append(columns.indices[indptr[done] : indptr[position]])
        value_pieces.append(columns.values[indptr[done] : indptr[position]])
        index_pieces.append(hasher.buckets(event.keys))
        value_pieces.append(np.array(event.values, dtype=np.float64))
        lengths[position] = len(event.keys)
        done = position + 1
    index_pieces.append(columns.indices[indptr[done] :])
    value_pieces.append(columns.values[indptr[done] :])
    new_indptr = np.zeros(len(indptr), dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    return new_indptr, np.concatenate(index_pieces), np.concatenate(value_pieces)
