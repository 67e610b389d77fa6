"""Fault suite, the broker (issue 6 scenario 4): killed and restarted, frozen and resumed.

A broker of its own: the session broker is shared by the other tests.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from stream_fm.errors import BrokerStartError
from stream_fm.tools.broker import KafkaBroker
from tests.integration.oracle import (
    FaultRig,
    check_invariant,
    end_offsets,
    last_checkpoint_offsets,
    simulated,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("kafka_client")

KILLED_S = 30.0
FROZEN_S = 40.0


@pytest.mark.slow
def test_4_broker_kill9_and_sigstop_lose_nothing_and_readiness_follows(tmp_path: Path) -> None:
    broker = KafkaBroker(log_path=tmp_path / "kafka.log")
    try:
        broker.start()
    except BrokerStartError as error:
        broker.close()
        pytest.fail(f"cannot start a private Apache Kafka broker: {error}", pytrace=False)
    rig = FaultRig(broker, tmp_path)
    figures: dict[str, object] = {}
    try:
        events = simulated(9_000, seed=4)
        log = rig.apply_log()

        def drained() -> None:
            ends = end_offsets(broker, rig.topics["input"])
            wait_until(lambda: last_checkpoint_offsets(log) == ends, 120, "drained", proc)

        rig.produce(events[:3_000])
        proc = rig.start()
        drained()
        wait_until(proc.readyz, 30, "ready", proc)

        for fault, part in (("kill9", 1), ("sigstop", 2)):
            assert broker.pid is not None
            started = time.monotonic()
            if fault == "kill9":
                os.killpg(broker.pid, signal.SIGKILL)
            else:
                os.killpg(broker.pid, signal.SIGSTOP)
            wait_until(lambda: not proc.readyz(), 30, f"not ready after broker {fault}", proc)
            not_ready_s = time.monotonic() - started
            outage_s = KILLED_S if fault == "kill9" else FROZEN_S
            while time.monotonic() - started < outage_s:
                assert proc.alive(), f"the worker exited during the outage:\n{proc.tail()}"
                assert not proc.readyz(), "ready while the broker is down"
                time.sleep(1.0)
            if fault == "kill9":
                broker.stop()  # reap the killed JVM
                broker.start()
            else:
                os.killpg(broker.pid, signal.SIGCONT)
            back = time.monotonic()
            wait_until(proc.readyz, 120, f"ready after broker {fault}", proc)
            ready_s = time.monotonic() - back
            rig.produce(events[3_000 * part : 3_000 * (part + 1)])
            drained()
            figures[fault] = {
                "outage_s": outage_s,
                "not_ready_after_s": round(not_ready_s, 1),
                "ready_again_after_s": round(ready_s, 1),
                "drained_after_s": round(time.monotonic() - back, 1),
            }

        lags = {}
        wait_until(
            lambda: (
                lags.update(
                    {
                        k: v
                        for k, v in proc.metrics().items()
                        if k.startswith("stream_fm_consumer_lag")
                    }
                )
                or (lags and all(v == 0 for v in lags.values()))
            ),
            30,
            "lag back to zero",
            proc,
        )
        code, _ = proc.sigterm()
        assert code == 0, proc.tail()
        verdict = check_invariant(rig)
    finally:
        rig.close()
        broker.close()
    print(
        f"\n[faults] 4 broker: {figures}, records={verdict.records}, "
        f"duplicates={verdict.duplicate_predictions}, lag={lags}"
    )
