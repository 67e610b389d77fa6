"""The checkpoint layout: one object, read back as written, refusing what it does not know."""

from __future__ import annotations

import pytest

from stream_fm.errors import CheckpointCorrupt
from stream_fm.worker.snapshot import FORMAT, Snapshot, parse_key, partition_key

PIPELINE = {"engine": {"w": 1}, "evaluator": {"n": 2}, "partitions": {"0": {"j": 0}}}


def test_round_trip_and_keys() -> None:
    snapshot = Snapshot("g", 12.5, PIPELINE, {"t:0": 7}, {"t:0": 7, "t:1": 3})
    tree = snapshot.tree()
    assert tree["format"] == FORMAT and tree["engine"] == {"w": 1}
    assert Snapshot.from_tree(tree, "x") == snapshot
    assert parse_key(partition_key(("a:b", 3))) == ("a:b", 3)


def test_an_older_file_without_applied_takes_its_offsets() -> None:
    tree = Snapshot("g", 1.0, PIPELINE, {"t:0": 7}, {}).tree()
    del tree["applied"]
    assert Snapshot.from_tree(tree, "x").applied == {"t:0": 7}


@pytest.mark.parametrize("broken", [{"format": 99}, {"offsets": None}, {"engine": None}])
def test_unknown_or_malformed_layouts_are_refused(broken: dict[str, object]) -> None:
    tree = Snapshot("g", 1.0, PIPELINE, {"t:0": 7}, {}).tree() | broken
    if broken.get("engine", 0) is None:
        del tree["engine"]
    with pytest.raises(CheckpointCorrupt):
        Snapshot.from_tree(tree, "x")


def test_a_restart_target_keeps_the_model_and_takes_partitions_as_assigned() -> None:
    start = Snapshot("g", 1.0, PIPELINE, {"t:0": 7}, {"t:0": 7}).as_start()
    assert start.offsets == {} and start.pipeline["partitions"] == {}
    assert start.pipeline["engine"] == {"w": 1} and start.applied == {"t:0": 7}
    start.take_over(("t", 1), 40, {"j": 1})
    start.anchor(("t", 1), 99)  # already placed: an anchor does not move it
    start.anchor(("t", 2), 5)
    assert start.offsets == {"t:1": 40, "t:2": 5}
    assert start.joiner(("t", 1)) == {"j": 1} and start.joiner(("t", 2)) is None
    assert PIPELINE["partitions"] == {"0": {"j": 0}}, "the loaded tree is never changed"
