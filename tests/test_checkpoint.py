"""CheckpointStore: exact round trips, fallback past damaged generations, retention, no pickle."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_fm.checkpoint import MAGIC, CheckpointStore
from stream_fm.errors import CheckpointCorrupt, CheckpointError


def sample_state() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {
        "model": {
            "w": rng.standard_normal((5, 3)),
            "v32": rng.standard_normal((4, 2)).astype(np.float32),
            "half": np.array([1.5, -0.0, np.inf, np.nan], dtype=np.float16),
            "bias": np.array(0.25),  # 0-d
            "flags": np.array([True, False, True]),
            "ints": np.arange(-3, 3, dtype=np.int8),
            "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
            "empty": np.zeros((0, 4), dtype=np.int32),
            "complex": np.array([1 + 2j, np.nan - 1j], dtype=np.complex128),
            "big_endian": np.arange(4, dtype=">i4"),
            "strided": np.arange(20, dtype=np.int64)[::3],
            "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        },
        "offsets": {"events-0": 12, "events-1": 2**70},
        "floats": [math.nan, math.inf, -math.inf, -0.0, 1e-310, 0.1],
        "text": "ünïcødé ✓",
        "flags": [True, False, None],
        "nested": {"$weird": {"$a": 5}, "list": [{"$f": "nan"}, []], "empty": {}},
        "numpy_scalars": [np.float64(0.5), np.int64(-3), np.bool_(True)],
    }


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype.newbyteorder("=") == b.dtype
            and a.shape == b.shape
            and np.ascontiguousarray(a).astype(b.dtype).tobytes() == b.tobytes()
        )
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, float):
        return type(b) is float and a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, dict):
        return (
            isinstance(b, dict) and a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return isinstance(b, list) and len(a) == len(b) and all(map(same_value, a, b))
    return type(a) is type(b) and a == b


def test_round_trip_is_exact(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    state = sample_state()
    path = store.save(state)
    assert path == tmp_path / "ckpt-000000000001.sfm"
    loaded = store.load(path)
    expected = {
        **state,
        "numpy_scalars": [0.5, -3, True],  # numpy scalars are stored as Python values
    }
    assert same_value(expected, loaded)
    assert loaded["model"]["bias"].shape == ()
    assert loaded["model"]["w"].flags.writeable
    assert all(a.flags.aligned for a in loaded["model"].values())
    assert store.load_latest() is not None


def test_arrays_survive_a_reload_bit_for_bit(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=4096, dtype=np.uint8)
    nan_payloads = raw.view(np.float64)  # arbitrary bit patterns, NaN payloads included
    store.save({"x": nan_payloads})
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded[0]["x"].tobytes() == nan_payloads.tobytes()


def test_directory_is_created(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "a" / "b")
    assert store.load_latest() is None
    assert store.latest_generation is None
    store.save({"x": 1})
    assert store.latest_generation == 1


def test_generations_increase_and_only_keep_remain(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    for step in range(6):
        store.save({"step": step})
    assert store.generations() == [4, 5, 6]
    state, path = store.load_latest() or ({}, None)
    assert state == {"step": 5}
    assert path == store.path_for(6)


def damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damage_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0:8] = b"NOTACKPT"
    path.write_bytes(bytes(data))


def damage_empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_byte, damage_magic, damage_empty])
def test_damaged_newest_falls_back_to_previous(
    tmp_path: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = CheckpointStore(tmp_path)
    store.save({"step": 1, "w": np.arange(1000.0)})
    newest = store.save({"step": 2, "w": np.arange(1000.0) * 2})
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="stream_fm.checkpoint"):
        loaded = store.load_latest()
    assert loaded is not None
    assert loaded[0]["step"] == 1
    assert loaded[1] == store.path_for(1)
    assert any("ckpt-000000000002.sfm" in r.getMessage() for r in caplog.records)
    with pytest.raises(CheckpointCorrupt):
        store.load(newest)
    # The next save never reuses the damaged generation's number.
    assert store.save({"step": 3}) == store.path_for(3)


def test_all_generations_damaged_raises(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    for step in range(2):
        damage_flip_byte(store.save({"step": step, "w": np.ones(64)}))
    with pytest.raises(CheckpointCorrupt):
        store.load_latest()


def test_header_that_hashes_correctly_but_lies_is_rejected(tmp_path: Path) -> None:
    # A structurally bad file with a valid checksum (e.g. written by a buggy build).
    import hashlib
    import struct

    header = b'{"tree":{"x":{"$a":0}},"arrays":[{"dtype":"|O","shape":[1],"offset":0,"nbytes":8}]}'
    body = MAGIC + struct.pack("<IQ", 1, len(header)) + header + b"\x00" * 64
    path = tmp_path / "ckpt-000000000001.sfm"
    path.write_bytes(body + hashlib.sha256(body).digest())
    with pytest.raises(CheckpointCorrupt):
        CheckpointStore(tmp_path).load(path)
    with pytest.raises(CheckpointCorrupt):
        CheckpointStore(tmp_path).load_latest()


def test_leftover_temp_file_is_ignored_and_cleaned_up(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    store.save({"step": 1})
    leftover = tmp_path / ".ckpt-000000000002.abc123.tmp"
    leftover.write_bytes(MAGIC + b"half a checkpoint")
    other_prefix = tmp_path / ".ckpt-p1-000000000001.xyz.tmp"  # another store's: not ours
    other_prefix.write_bytes(b"")
    loaded = store.load_latest()
    assert loaded is not None
    assert loaded[0] == {"step": 1}
    assert store.save({"step": 2}) == store.path_for(2)
    assert not leftover.exists()
    assert other_prefix.exists()


def test_prefixes_share_a_directory(tmp_path: Path) -> None:
    a = CheckpointStore(tmp_path, prefix="ckpt")
    b = CheckpointStore(tmp_path, prefix="ckpt-p1")
    a.save({"who": "a"})
    b.save({"who": "b"})
    b.save({"who": "b2"})
    assert a.generations() == [1]
    assert b.generations() == [1, 2]
    assert (a.load_latest() or ({}, None))[0] == {"who": "a"}


@pytest.mark.parametrize(
    "bad",
    [
        {"x": np.array([object()], dtype=object)},
        {"x": np.array(["text"])},
        {"x": np.array([b"bytes"])},
        {"x": np.zeros(2, dtype=[("a", "<f8")])},
        {"x": np.array(["2020-01-01"], dtype="datetime64[D]")},
        {"x": {1: "int key"}},
        {"x": object()},
        {"x": b"raw bytes"},
    ],
)
def test_unsupported_values_are_refused_and_nothing_is_left(tmp_path: Path, bad: Any) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError):
        store.save(bad)
    assert os.listdir(tmp_path) == []


def test_no_pickle_is_involved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    for name in ("load", "loads", "dump", "dumps", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, refuse)
    store = CheckpointStore(tmp_path)
    store.save(sample_state())
    assert store.load_latest() is not None


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, keep=0)
    with pytest.raises(ValueError):
        CheckpointStore(tmp_path, prefix="../escape")
    with pytest.raises(CheckpointError):
        CheckpointStore(tmp_path).load(tmp_path / "missing.sfm")


def test_unwritable_directory_raises_checkpoint_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError):
        CheckpointStore(blocker / "sub").save({"x": 1})


# --- a directory shared by several workers ---------------------------------------------------


def shared(tmp_path: Path, writer: str, keep: int = 2) -> CheckpointStore:
    return CheckpointStore(tmp_path, keep=keep, writer=writer, progress_key="offsets")


def test_writers_sharing_a_directory_never_overwrite_each_other(tmp_path: Path) -> None:
    a, b = shared(tmp_path, "a"), shared(tmp_path, "b")
    pa = a.save({"offsets": {"t:0": 5}, "who": "a"})
    pb = b.save({"offsets": {"t:1": 7}, "who": "b"})
    assert (pa.name, pb.name) == ("ckpt-000000000001-a.sfm", "ckpt-000000000002-b.sfm")
    assert a.load(pa)["who"] == "a" and b.load(pb)["who"] == "b"
    assert a.load_latest() is not None and a.load_latest()[1] == pb  # type: ignore[index]


def test_candidates_rank_by_progress_then_generation(tmp_path: Path) -> None:
    a, b = shared(tmp_path, "a", keep=5), shared(tmp_path, "b", keep=5)
    p1 = a.save({"offsets": {"t:0": 10, "t:1": 3}})
    p2 = b.save({"offsets": {"t:1": 9}})
    p3 = a.save({"offsets": {"t:0": 12}})
    assert b.candidates("t:0") == [p3, p1]
    assert a.candidates("t:1") == [p2, p1]
    assert a.candidates("t:2") == []
    assert a.progress(p1) == {"t:0": 10, "t:1": 3}


def test_pruning_keeps_every_partitions_most_advanced_files(tmp_path: Path) -> None:
    a, b = shared(tmp_path, "a", keep=1), shared(tmp_path, "b", keep=1)
    moved = a.save({"offsets": {"t:0": 10, "t:1": 4}})  # t:1 then moves to b ...
    for offset in range(11, 15):
        a.save({"offsets": {"t:0": offset}})  # ... and a keeps checkpointing t:0 alone
    kept = a.generation_paths()
    assert moved in kept, "the only state of t:1 must survive pruning"
    assert len(kept) == 2
    b_path = b.save({"offsets": {"t:1": 6}})
    a.save({"offsets": {"t:0": 15}})
    assert moved not in a.generation_paths(), "superseded once b checkpointed t:1"
    assert b_path in a.generation_paths()


def test_load_latest_skips_files_not_accepted(tmp_path: Path) -> None:
    store = shared(tmp_path, "a", keep=3)
    older = store.save({"offsets": {"t:0": 5}})
    store.save({"offsets": {"t:0": 9}})  # say its transaction never committed
    loaded = store.load_latest(accept=lambda path: store.progress(path)["t:0"] <= 5)
    assert loaded is not None and loaded[1] == older
    store.discard(store.generation_paths()[-1])
    assert store.generation_paths() == [older]


def test_a_dead_writers_temporary_file_is_removed_a_live_ones_kept(tmp_path: Path) -> None:
    from stream_fm.checkpoint import host_part

    dead = tmp_path / f".ckpt-000000000004-{host_part()}_999999999_abcdef.x1.tmp"
    alive = tmp_path / f".ckpt-000000000004-{host_part()}_{os.getppid()}_abcdef.x2.tmp"
    elsewhere = tmp_path / ".ckpt-000000000004-otherhost_1_abcdef.x3.tmp"
    for path in (dead, alive, elsewhere):
        path.write_bytes(b"partial")
    shared(tmp_path, f"{host_part()}_{os.getpid()}_000000").save({"offsets": {}})
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists()


def test_fault_hook_sees_each_step_of_a_save(tmp_path: Path) -> None:
    store = shared(tmp_path, "a")
    steps: list[str] = []
    store.fault_hook = steps.append
    store.save({"offsets": {}})
    assert steps == ["temp_written", "renamed"]
