"""The checkpoint's layout, written and read here only: one typed object instead of string keys.

A snapshot holds the pipeline's state (model, accumulators, each owned partition's joiner),
the owned partitions' next offsets (what the checkpoint covers: the store indexes files by
them), the model's applied frontier over every partition it ever learned from, and (model
sync on) where the model stands in the model-updates topic.

>>> s = Snapshot("g", 1.0, {"engine": {}, "evaluator": {}, "partitions": {}}, {"t:0": 5}, {"t:1": 9})
>>> back = Snapshot.from_tree(s.tree(), "in memory")
>>> back.offsets, back.applied
({'t:0': 5}, {'t:1': 9})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from stream_fm.errors import CheckpointCorrupt
from stream_fm.kafka import Partition

FORMAT: Final = 1
OFFSETS_KEY: Final = "offsets"  # the store's progress index reads this mapping from headers


def partition_key(partition: Partition) -> str:
    return f"{partition[0]}:{partition[1]}"


def parse_key(key: str) -> Partition:
    topic, _, partition = key.rpartition(":")
    return topic, int(partition)


@dataclass
class Snapshot:
    group_id: str
    saved_at_s: float
    pipeline: dict[str, Any]  # Pipeline.state(): engine, evaluator, partitions
    offsets: dict[str, int]  # "topic:partition" -> next offset, for the owned partitions
    applied: dict[str, int]  # the model's frontier, partitions that moved away included
    # Model sync: the next update of each model-updates partition the model has not applied.
    updates: dict[str, int] = field(default_factory=dict)

    def tree(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "group_id": self.group_id,
            "saved_at_s": self.saved_at_s,
            **self.pipeline,
            OFFSETS_KEY: dict(self.offsets),
            "applied": dict(self.applied),
            "updates": dict(self.updates),
        }

    @classmethod
    def from_tree(cls, tree: Mapping[str, Any], source: str) -> Snapshot:
        if tree.get("format") != FORMAT:
            raise CheckpointCorrupt(f"{source} has format {tree.get('format')}, expected {FORMAT}")
        try:
            offsets = {str(k): int(v) for k, v in tree[OFFSETS_KEY].items()}
            return cls(
                group_id=str(tree["group_id"]),
                saved_at_s=float(tree["saved_at_s"]),
                pipeline={k: tree[k] for k in ("engine", "evaluator", "partitions")},
                offsets=offsets,
                applied={str(k): int(v) for k, v in tree.get("applied", offsets).items()},
                updates={str(k): int(v) for k, v in tree.get("updates", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise CheckpointCorrupt(f"{source}: malformed checkpoint: {error!r}") from error

    def joiner(self, partition: Partition) -> dict[str, Any] | None:
        """The saved joiner of one partition, if this snapshot holds it."""
        found: dict[str, Any] | None = self.pipeline["partitions"].get(str(partition[1]))
        return found

    def as_start(self) -> Snapshot:
        """This snapshot as a restart's rollback target: the model only; partitions come from
        the store as they are assigned."""
        pipeline = {**self.pipeline, "partitions": {}}
        return Snapshot(
            self.group_id, self.saved_at_s, pipeline, {}, dict(self.applied), dict(self.updates)
        )

    def take_over(
        self, partition: Partition, offset: int, joiner: Mapping[str, Any] | None
    ) -> None:
        """A partition was taken over at ``offset``: a rollback must return it there."""
        self.offsets[partition_key(partition)] = offset
        if joiner is not None:
            self.pipeline["partitions"] = {**self.pipeline["partitions"], str(partition[1]): joiner}

    def anchor(self, partition: Partition, offset: int) -> None:
        """A partition with no durable state yet: its first processed offset is its start."""
        self.offsets.setdefault(partition_key(partition), offset)
