"""``stream-fm bench hashsize``: log loss, memory and checkpoint size against the hash size.

Each (stream, ``hash_bits``) pair runs in a child process of its own (``python -m
stream_fm.tools.bench.hashsize <job>``): it replays the stream with the default settings at
that hash size, saves the model as the worker does (a ``CheckpointStore`` generation) and
prints its figures with its own peak resident memory (``ru_maxrss``), so each row's memory is
that configuration's alone. Streams: the simulated 2M stream of ``stream-fm
bench`` (``simulated-long``, written to a file first) and the real logs of ``../shared/data``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

from stream_fm.errors import StreamFMError

#: The hash sizes of issue 23's table.
DEFAULT_BITS: tuple[int, ...] = (18, 20, 22, 24)


@dataclass(frozen=True, slots=True)
class HashRow:
    stream: str
    hash_bits: int
    examples: int
    logloss: float
    logloss_last_10pct: float
    peak_rss_mib: float  # the child's VmHWM: replay, model and checkpoint write
    checkpoint_mib: float  # the saved generation's file


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    """Replay ``job["files"]`` at ``job["hash_bits"]``, save a checkpoint, return the figures."""
    from stream_fm.checkpoint import CheckpointStore
    from stream_fm.config import build_settings
    from stream_fm.pipeline import Pipeline
    from stream_fm.replay import read_batches, replay

    settings = build_settings({"hash_bits": job["hash_bits"]})
    pipeline = Pipeline.from_settings(settings)
    batches: Iterator[Any] = chain.from_iterable(
        read_batches(Path(path), fmt, pipeline.decoder) for path, fmt in job["files"]
    )
    report = replay(pipeline, batches)
    saved = CheckpointStore(job["checkpoint_dir"], keep=1).save(pipeline.state())
    return {
        "examples": report.examples,
        "logloss": report.logloss,
        "logloss_last_10pct": report.logloss_last_10pct,
        "checkpoint_mib": saved.stat().st_size / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure(stream: str, files: Sequence[tuple[Path, str]], bits: int, work: Path) -> HashRow:
    """One child process: ``stream`` at ``2**bits`` buckets."""
    job = {
        "files": [(str(p), f) for p, f in files],
        "hash_bits": bits,
        "checkpoint_dir": str(work / f"ckpt-{stream}-{bits}"),
    }
    command = [sys.executable, "-m", "stream_fm.tools.bench.hashsize", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StreamFMError(
            f"bench hashsize: {stream} at {bits} bits failed: {done.stderr[-2000:]}"
        )
    return HashRow(stream, bits, **json.loads(done.stdout.strip().splitlines()[-1]))


def stream_files(
    names: Sequence[str], data_dir: Path, work: Path, long_events: int
) -> dict[str, list[tuple[Path, str]]]:
    """Each named stream's files: ``simulated-long`` written into ``work``, real logs as found."""
    from stream_fm.tools.bench.model import STREAM_FILES

    found: dict[str, list[tuple[Path, str]]] = {}
    for name in names:
        if name == "simulated-long":
            found[name] = [(write_simulated(work / "simulated-long.jsonl", long_events), "jsonl")]
        elif name in STREAM_FILES:
            files = [(data_dir / path, fmt) for path, fmt in STREAM_FILES[name][1]]
            missing = [str(p) for p, _ in files if not p.is_file()]
            if missing:
                raise StreamFMError(f"bench hashsize: {', '.join(missing)} not found (--data-dir)")
            found[name] = files
        else:
            known = ", ".join(["simulated-long", *STREAM_FILES])
            raise StreamFMError(f"bench hashsize: unknown stream {name!r} (known: {known})")
    return found


def write_simulated(path: Path, events: int) -> Path:
    """The stream ``stream-fm bench`` calls ``simulated-long`` (same seed and rate), as JSONL."""
    from stream_fm.tools.simulate import SimulationParams, write_jsonl

    write_jsonl(SimulationParams(n_fields=20, n_impressions=round(events / 1.03), seed=7), path)
    return path


def format_rows(rows: Sequence[HashRow]) -> str:
    lines = [
        "hash size: default settings at each hash_bits, each run its own process",
        f"  {'stream':<16} {'bits':>4} {'examples':>10} {'logloss':>8} {'last10%':>8} "
        f"{'vs 2^20':>8} {'peak RSS MiB':>12} {'checkpoint MiB':>14}",
    ]
    base = {r.stream: r.logloss for r in rows if r.hash_bits == 20}
    for r in rows:
        ratio = r.logloss / base[r.stream] if r.stream in base else float("nan")
        lines.append(
            f"  {r.stream:<16} {r.hash_bits:>4} {r.examples:>10,} {r.logloss:>8.5f} "
            f"{r.logloss_last_10pct:>8.5f} {ratio:>8.4f} {r.peak_rss_mib:>12,.0f} "
            f"{r.checkpoint_mib:>14,.1f}"
        )
    return "\n".join(lines)


def main_hashsize(
    streams: Sequence[str],
    bits: Sequence[int],
    data_dir: Path,
    long_events: int,
    json_path: Path | None,
) -> int:
    rows: list[HashRow] = []
    with tempfile.TemporaryDirectory(prefix="stream-fm-hashsize-") as tmp:
        work = Path(tmp)
        for name, files in stream_files(streams, data_dir, work, long_events).items():
            for b in bits:
                rows.append(measure(name, files, b, work))
                print(
                    "bench hashsize:" + format_rows(rows[-1:]).splitlines()[-1],
                    file=sys.stderr,
                    flush=True,
                )
    print(format_rows(rows), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    print(json.dumps(run_child(json.loads(sys.argv[1]))), flush=True)
