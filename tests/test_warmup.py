"""``warm_up`` compiles every kernel a replay or the worker calls, before either starts."""

from __future__ import annotations

import json
import subprocess
import sys

from stream_fm.config import load_settings
from stream_fm.worker.health import Health
from stream_fm.worker.retry import Retry

# In a fresh interpreter (this session's kernels are compiled already): warm up, then list
# the kernels a real-size replay batch and a worker's produce would still have to compile.
PROBE = r"""
import json, sys, numba
from numba.core.registry import CPUDispatcher
import stream_fm.features, stream_fm.scan, stream_fm.model.kernel, stream_fm.kafka.partitioner
from stream_fm.config import load_settings
from stream_fm.kafka.partitioner import key_partitions
from stream_fm.pipeline import Pipeline
from stream_fm.tools.simulate import SimulationParams, Simulator
from stream_fm.warmup import warm_up

modules = [stream_fm.features, stream_fm.scan, stream_fm.model.kernel, stream_fm.kafka.partitioner]
kernels = {
    f"{m.__name__}.{name}": d for m in modules for name, d in vars(m).items()
    if isinstance(d, CPUDispatcher) and d.targetoptions.get("inline") != "always"
}
settings = load_settings(env={}, overrides=json.loads(sys.argv[1]))
warm_up(settings)
before = {name: len(d.signatures) for name, d in kernels.items()}
pipeline = Pipeline.from_settings(settings)
events = Simulator(SimulationParams(n_impressions=2000, seed=3)).events()
values = [json.dumps(event).encode() for event in events]
pipeline.process_values(values, now_ms=1_900_000_000_000)
pipeline.flush()
key_partitions([b"imp-1", b"imp-2"], 4)
print(json.dumps({
    "kernels": sorted(kernels),
    "never_compiled": sorted(n for n, k in before.items() if k == 0),
    "compiled_later": sorted(n for n, d in kernels.items() if len(d.signatures) > before[n]),
}))
"""


def _probe(**overrides: object) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(overrides)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    result: dict[str, list[str]] = json.loads(out.strip().splitlines()[-1])
    return result


def test_warm_up_compiles_every_kernel_the_stream_calls() -> None:
    result = _probe()
    assert "stream_fm.model.kernel.run_ops" in result["kernels"]
    assert result["compiled_later"] == []  # nothing left for the first real batch


def test_warm_up_follows_the_settings_optimizer() -> None:
    assert _probe(optimizer="ftrl", numeric_transform="log_bucket")["compiled_later"] == []


def test_readiness_waits_for_the_kernels() -> None:
    settings = load_settings(env={})
    health = Health(settings, recovery=None, retry=Retry())  # type: ignore[arg-type]
    assert health.ready() == (False, "compiling the model kernels")
