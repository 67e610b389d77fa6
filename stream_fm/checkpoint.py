"""Atomic, checksummed checkpoint generations of arrays and plain data; no pickle anywhere.

A state is a nested mapping (string keys) whose leaves are numpy arrays of a bool or numeric
dtype (any shape, 0-d and empty included) or JSON-able plain values: ``int``, ``float``
(NaN and infinities included), ``str``, ``bool``, ``None``, ``list``, ``dict``. Numpy scalars are
stored as the equivalent Python value. Loading gives back the same tree with bitwise-identical
arrays (dtype, shape, bytes); tuples come back as lists.

File ``<prefix>-<generation:012d>.sfm``::

    magic b"SFMCKPT\\0" | uint32 format version | uint64 header length | header (UTF-8 JSON)
    | array bytes, each little-endian, C order, at a 64-byte aligned offset | SHA-256 of all
    the preceding bytes

The header holds the tree with arrays replaced by ``{"$a": i}`` references to descriptors
``{"dtype", "shape", "offset", "nbytes"}`` (offsets count from the first aligned byte after
the header). A save writes a temporary file in the same
directory, fsyncs it, renames it into place and fsyncs the directory, so a crash leaves either
the previous generations or the new one, never half a file under a checkpoint name.

>>> import tempfile
>>> import numpy as np
>>> store = CheckpointStore(Path(tempfile.mkdtemp()) / "ckpt", keep=2)
>>> for step in range(3):
...     path = store.save({"w": np.full(3, step, dtype=np.float32), "meta": {"step": step}})
>>> state, path = store.load_latest()
>>> path.name, state["meta"], state["w"].tolist(), state["w"].dtype.name
('ckpt-000000000003.sfm', {'step': 2}, [2.0, 2.0, 2.0], 'float32')
>>> [p.name for p in store.generation_paths()]
['ckpt-000000000002.sfm', 'ckpt-000000000003.sfm']
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np
import numpy.typing as npt

from stream_fm.errors import CheckpointCorrupt, CheckpointError

__all__ = ["FORMAT_VERSION", "MAGIC", "CheckpointStore", "read_checkpoint", "write_checkpoint"]

log = logging.getLogger("stream_fm.checkpoint")

MAGIC: Final = b"SFMCKPT\x00"
FORMAT_VERSION: Final = 1
_PREAMBLE = struct.Struct("<8sIQ")  # magic, version, header length
_DIGEST_SIZE: Final = hashlib.sha256().digest_size
# Aligned offsets let arrays be used in place (numba and SIMD loops dislike unaligned data).
_ALIGN: Final = 64
_ARRAY_KINDS: Final = "biufc"
_TEMP_SUFFIX: Final = ".tmp"
_MAX_GENERATION: Final = 10**12 - 1
# Writer ids of stores in this process: alive even though they share our pid.
_WRITERS_HERE: set[str] = set()


def _encode(value: object, arrays: list[npt.NDArray[Any]], where: str) -> object:
    """Turn a state tree into JSON-able data, collecting arrays (in order) into ``arrays``."""
    # bool before int, and numpy scalars before float: np.float64 is a float subclass.
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.generic):
        if value.dtype.kind not in "biuf":
            raise CheckpointError(f"{where}: unsupported numpy scalar {value.dtype}")
        return _encode(value.item(), arrays, where)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$f": repr(value)}  # 'nan', 'inf', '-inf': strict JSON has no literals for them
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_KINDS or value.dtype.fields is not None:
            raise CheckpointError(f"{where}: arrays of dtype {value.dtype} cannot be stored")
        arrays.append(value)
        return {"$a": len(arrays) - 1}
    if isinstance(value, Mapping):
        encoded = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where}: keys must be str, got {key!r}")
            encoded[key] = _encode(item, arrays, f"{where}.{key}")
        # A user dict with a "$" key could be mistaken for a tag, so it gets wrapped.
        if any(key.startswith("$") for key in encoded):
            return {"$d": encoded}
        return encoded
    if isinstance(value, (list, tuple)):
        return [_encode(item, arrays, f"{where}[{i}]") for i, item in enumerate(value)]
    raise CheckpointError(f"{where}: cannot store a {type(value).__name__}")


def _decode(value: object, arrays: list[npt.NDArray[Any]]) -> object:
    if isinstance(value, list):
        return [_decode(item, arrays) for item in value]
    if not isinstance(value, dict):
        return value
    tags = [key for key in value if key.startswith("$")]
    if not tags:
        return {key: _decode(item, arrays) for key, item in value.items()}
    if len(value) != 1:
        raise CheckpointCorrupt(f"malformed tag object with keys {sorted(value)}")
    tag, payload = next(iter(value.items()))
    if tag == "$a" and type(payload) is int and 0 <= payload < len(arrays):
        return arrays[payload]
    if tag == "$f" and payload in ("nan", "inf", "-inf"):
        return float(payload)
    if tag == "$d" and isinstance(payload, dict):
        return {key: _decode(item, arrays) for key, item in payload.items()}
    raise CheckpointCorrupt(f"malformed tag {tag!r}: {payload!r}")


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


class _HashingWriter:
    """Writes to a file while hashing everything written, so the file is read only once."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.sha = hashlib.sha256()
        self.position = 0

    def write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.position += memoryview(data).nbytes

    def pad_to(self, offset: int) -> None:
        self.write(b"\x00" * (offset - self.position))


def write_checkpoint(file: BinaryIO, state: Mapping[str, Any]) -> None:
    """Serialize ``state`` to an open binary file (no fsync; see ``CheckpointStore.save``)."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"state must be a mapping, got {type(state).__name__}")
    arrays: list[npt.NDArray[Any]] = []
    tree = _encode(state, arrays, "state")
    # Little-endian, C-contiguous copies only where needed; the common case is zero-copy.
    little = [np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)) for a in arrays]
    descriptors: list[dict[str, object]] = []
    offsets: list[int] = []
    offset = 0  # relative to the start of the data section, so the header does not depend on it
    for original, array in zip(arrays, little, strict=True):
        offset = _aligned(offset)
        offsets.append(offset)
        descriptors.append(
            {
                "dtype": array.dtype.str,
                "shape": list(original.shape),
                "offset": offset,
                "nbytes": array.nbytes,
            }
        )
        offset += array.nbytes
    header = json.dumps(
        {"tree": tree, "arrays": descriptors}, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")
    data_start = _aligned(_PREAMBLE.size + len(header))

    out = _HashingWriter(file)
    out.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)))
    out.write(header)
    for offset, array in zip(offsets, little, strict=True):
        out.pad_to(data_start + offset)
        if array.nbytes:
            # ascontiguousarray made it contiguous: a flat byte view of it is free.
            out.write(array.reshape(-1).view(np.uint8).data)
    file.write(out.sha.digest())


def read_checkpoint(data: bytearray, source: str = "checkpoint") -> dict[str, Any]:
    """Verify and decode a whole checkpoint file's bytes; arrays are views into ``data``.

    Raises ``CheckpointCorrupt`` on any truncation, checksum mismatch or malformed content.
    """
    view = memoryview(data)
    if len(data) < _PREAMBLE.size + _DIGEST_SIZE:
        raise CheckpointCorrupt(f"{source}: truncated ({len(data)} bytes)")
    magic, version, header_len = _PREAMBLE.unpack_from(data, 0)
    if magic != MAGIC:
        raise CheckpointCorrupt(f"{source}: not a stream_fm checkpoint (bad magic)")
    if version != FORMAT_VERSION:
        raise CheckpointCorrupt(f"{source}: unsupported format version {version}")
    body_end = len(data) - _DIGEST_SIZE
    if hashlib.sha256(view[:body_end]).digest() != bytes(view[body_end:]):
        raise CheckpointCorrupt(f"{source}: checksum mismatch (truncated or corrupted)")
    header_end = _PREAMBLE.size + header_len
    if header_end > body_end:
        raise CheckpointCorrupt(f"{source}: header runs past the end of the file")
    try:
        header = json.loads(bytes(view[_PREAMBLE.size : header_end]).decode("utf-8"))
        descriptors = header["arrays"]
        tree = header["tree"]
        data_start = _aligned(header_end)
        arrays = [_read_array(data, d, data_start, body_end) for d in descriptors]
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointCorrupt(f"{source}: malformed header: {error}") from error
    try:
        state = _decode(tree, arrays)
    except CheckpointCorrupt as error:
        raise CheckpointCorrupt(f"{source}: {error}") from error
    if not isinstance(state, dict):
        raise CheckpointCorrupt(f"{source}: top level is not a mapping")
    return state


def _read_array(data: bytearray, d: dict[str, Any], start: int, end: int) -> npt.NDArray[Any]:
    dtype = np.dtype(d["dtype"])
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None or dtype.byteorder == ">":
        raise ValueError(f"refusing dtype {d['dtype']!r}")
    shape = tuple(d["shape"])
    offset, nbytes = d["offset"], d["nbytes"]
    if not all(type(n) is int and n >= 0 for n in (*shape, offset, nbytes)):
        raise ValueError(f"bad array descriptor {d!r}")
    count = math.prod(shape)
    if count * dtype.itemsize != nbytes or start + offset + nbytes > end:
        raise ValueError(f"array descriptor out of bounds {d!r}")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=start + offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)  # no-op on little-endian hosts


class CheckpointStore:
    """Generations ``<prefix>-<n:012d>[-<writer>].sfm`` in one directory; the newest valid wins.

    Several workers may share the directory (a shared volume): each names itself ``writer``,
    so two saves of the same generation number never collide. With ``progress_key``, the
    state's mapping at that key (name -> a count that only grows, such as input offsets) is
    indexed from the file headers: ``candidates(name)`` gives the files holding ``name``, most
    progress first, and pruning keeps, besides the ``keep`` newest files, the ``keep`` most
    advanced files for every name, so state that moved between workers is never pruned away.
    """

    def __init__(
        self,
        directory: Path | str,
        keep: int = 3,
        prefix: str = "ckpt",
        writer: str | None = None,
        progress_key: str | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix) or prefix.startswith("."):
            raise ValueError(f"prefix must be a plain file-name part, got {prefix!r}")
        if writer is not None and not re.fullmatch(r"[A-Za-z0-9_]+", writer):
            raise ValueError(f"writer must be letters, digits and _, got {writer!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.prefix = prefix
        self.writer = writer
        if writer is not None:
            _WRITERS_HERE.add(writer)
        self.progress_key = progress_key
        self._pattern = re.compile(re.escape(prefix) + r"-(\d{12})(?:-([A-Za-z0-9_]+))?\.sfm")
        self._temp_pattern = re.compile(
            r"\." + re.escape(prefix) + r"-\d{12}(?:-([A-Za-z0-9_]+))?\..*" + _TEMP_SUFFIX
        )
        self._progress_cache: dict[str, tuple[tuple[int, int], dict[str, int]]] = {}
        # Test-only fault injection, called at each step of a checkpoint ("temp_written",
        # "renamed"; the worker adds "restoring", "committing" and "committed").
        self.fault_hook: Callable[[str], None] | None = None

    def path_for(self, generation: int, writer: str | None = None) -> Path:
        suffix = f"-{writer}" if writer else ""
        return self.directory / f"{self.prefix}-{generation:012d}{suffix}.sfm"

    def _entries(self) -> list[tuple[int, str, Path]]:
        """(generation, writer, path) of every checkpoint file, oldest first."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            m = self._pattern.fullmatch(name)
            if m:
                entries.append((int(m.group(1)), m.group(2) or "", self.directory / name))
        entries.sort()
        return entries

    def generations(self) -> list[int]:
        """Generation numbers present on disk (valid or not), oldest first."""
        return [generation for generation, _, _ in self._entries()]

    def generation_paths(self) -> list[Path]:
        return [path for _, _, path in self._entries()]

    @property
    def latest_generation(self) -> int | None:
        """Newest generation number on disk, without checking that it is valid."""
        generations = self.generations()
        return generations[-1] if generations else None

    def progress(self, path: Path) -> dict[str, int]:
        """The ``progress_key`` mapping of one file, read from its header only (cached).

        Unreadable or malformed headers give ``{}``; full verification happens at load.
        """
        if self.progress_key is None:
            return {}
        try:
            stat = path.stat()
        except OSError:
            return {}
        stamp = (stat.st_size, stat.st_mtime_ns)
        cached = self._progress_cache.get(path.name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        progress: dict[str, int] = {}
        try:
            with open(path, "rb") as file:
                preamble = file.read(_PREAMBLE.size)
                magic, _, header_len = _PREAMBLE.unpack(preamble)
                if magic == MAGIC and header_len <= stat.st_size:
                    tree = json.loads(file.read(header_len))["tree"]
                    found = tree.get(self.progress_key, {}) if isinstance(tree, dict) else {}
                    if isinstance(found, dict):
                        progress = {k: v for k, v in found.items() if type(v) is int}
        except (OSError, ValueError, KeyError, TypeError, struct.error) as error:
            log.debug("cannot index %s: %s", path, error)
        self._progress_cache[path.name] = (stamp, progress)
        return progress

    def candidates(self, name: str) -> list[Path]:
        """Files whose progress mapping holds ``name``: most progress first, then newest."""
        ranked = []
        for generation, writer, path in self._entries():
            value = self.progress(path).get(name)
            if value is not None:
                ranked.append((value, generation, writer, path))
        ranked.sort(reverse=True)
        return [path for *_, path in ranked]

    def save(self, state: Mapping[str, Any]) -> Path:
        """Write ``state`` as the next generation, durably; then drop generations past ``keep``."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_temp_files()
            generation = (self.latest_generation or 0) + 1
            if generation > _MAX_GENERATION:
                raise CheckpointError(f"{self.directory}: generation counter exhausted")
            final = self.path_for(generation, self.writer)
            name = final.name.removesuffix(".sfm")
            fd, temp_name = tempfile.mkstemp(
                prefix=f".{name}.", suffix=_TEMP_SUFFIX, dir=self.directory
            )
            try:
                with os.fdopen(fd, "wb") as file:
                    write_checkpoint(file, state)
                    file.flush()
                    os.fsync(file.fileno())
                self.fault("temp_written")
                os.replace(temp_name, final)
            except BaseException:
                Path(temp_name).unlink(missing_ok=True)
                raise
            _fsync_directory(self.directory)
            self.fault("renamed")
        except OSError as error:
            raise CheckpointError(
                f"cannot write checkpoint in {self.directory}: {error}"
            ) from error
        self._prune()
        return final

    def discard(self, path: Path) -> None:
        """Remove a checkpoint that must never be restored (its commit failed)."""
        try:
            path.unlink()
            _fsync_directory(self.directory)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning("cannot remove %s: %s", path.name, error)
        self._progress_cache.pop(path.name, None)

    def fault(self, step: str) -> None:
        """Test-only: a fault-injection point (see ``fault_hook``)."""
        if self.fault_hook is not None:
            self.fault_hook(step)

    def load(self, path: Path | str) -> dict[str, Any]:
        """Read and verify one checkpoint file.

        Arrays are writable, aligned views into one buffer holding the file: no second copy of
        a large model, but keeping any one array keeps the whole buffer alive, so copy small
        arrays that outlive the rest.

        Raises ``CheckpointCorrupt`` if its content is not valid, ``CheckpointError`` if it
        cannot be read.
        """
        try:
            return self._read(Path(path))
        except FileNotFoundError as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                data = bytearray(size)
                read = file.readinto(data)
        except FileNotFoundError:
            raise
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error}") from error
        if read != size:
            raise CheckpointCorrupt(f"{path}: short read ({read} of {size} bytes)")
        return read_checkpoint(data, str(path))

    def load_latest(
        self, accept: Callable[[Path], bool] | None = None
    ) -> tuple[dict[str, Any], Path] | None:
        """The newest valid generation and its path; ``None`` if there is no checkpoint file.

        Invalid newer files are skipped with a warning, and so are files ``accept`` refuses.
        Raises ``CheckpointCorrupt`` when checkpoint files exist but none of them is valid.
        """
        paths = self.generation_paths()
        problems: list[str] = []
        for path in reversed(paths):
            if accept is not None and not accept(path):
                log.info("skipping checkpoint %s: not accepted", path.name)
                continue
            try:
                return self._read(path), path
            except FileNotFoundError:
                continue  # pruned by a concurrent save between listing and opening
            except CheckpointCorrupt as error:
                log.warning("skipping invalid checkpoint %s: %s", path, error)
                problems.append(str(error))
        if problems:
            raise CheckpointCorrupt(
                f"{self.directory}: no valid checkpoint among {len(problems)} file(s); "
                f"newest problem: {problems[0]}"
            )
        return None

    def _prune(self) -> None:
        entries = self._entries()
        keep = {path for _, _, path in entries[-self.keep :]}
        if self.progress_key is not None:
            names = {name for _, _, path in entries for name in self.progress(path)}
            for name in names:
                keep.update(self.candidates(name)[: self.keep])
        for _, _, path in entries:
            if path in keep:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as error:  # keeping one file too many is not worth failing for
                log.warning("cannot remove old checkpoint %s: %s", path.name, error)
            self._progress_cache.pop(path.name, None)

    def _remove_temp_files(self) -> None:
        """Temporary files left by a crash mid-write: this writer's, a dead writer's on this
        host, and any other an hour old. A live writer's temporary file is a save in progress.
        """
        now = time.time()
        for name in os.listdir(self.directory):
            m = self._temp_pattern.fullmatch(name)
            if not m:
                continue
            path = self.directory / name
            writer = m.group(1) or None
            try:
                if (
                    writer != self.writer
                    and not _writer_gone(writer)
                    and now - path.stat().st_mtime < 3600
                ):
                    continue
                path.unlink()
                log.info("removed leftover temporary checkpoint %s", name)
            except FileNotFoundError:
                pass


def _writer_gone(writer: str | None) -> bool:
    """Whether a writer named ``<host>_<pid>_<suffix>`` (the worker's) ran on this host and its
    process is gone. In a container the new process often has the old one's pid: that pid
    being ours also means the old writer is gone."""
    if writer is None:
        return True
    host, _, rest = writer.rpartition("_")[0].rpartition("_")
    pid_text = rest
    if not pid_text.isdigit() or host != host_part():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return writer not in _WRITERS_HERE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def host_part() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:40] or "host"


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        # Some file systems do not support fsync on directories; anything else is real.
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
