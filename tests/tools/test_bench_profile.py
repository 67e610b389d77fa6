"""The py-spy summary of ``stream-fm bench kafka --py-spy``: the main thread's time by part."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_fm.tools.bench.kafka.profile import (
    OTHER,
    main_thread_shares,
    profile_file,
    profile_summary,
)

ROOT = "thread (7): MainThread;Worker.run (loop.py:1);Worker.step (loop.py:2)"


def test_a_sample_goes_to_the_outermost_part_of_its_stack() -> None:
    stacks = [
        f"{ROOT};KafkaPythonIO.commit (k.py:1);KafkaConsumer.poll (group.py:2) 2",
        f"{ROOT};Worker._process (loop.py:3);Pipeline._run (pipeline.py:4);FastFM._run (f.py:5) 5",
        f"{ROOT};Worker._process (loop.py:3);ConfluentIO.send_keyed (c.py:6) 2",
        f"{ROOT};time.sleep (t.py:1) 1",
        "thread (8): kafka-io-stream-fm;NetworkSelector.run (selector.py:9) 50",
        "not a sample line",
    ]
    shares = dict(main_thread_shares(stacks))
    assert shares == pytest.approx(
        {"client: commit": 0.2, "join, engine, evaluation": 0.5, "client: send": 0.2, OTHER: 0.1}
    )


def test_each_worker_gets_its_own_file_and_a_summary_line(tmp_path: Path) -> None:
    path = profile_file(tmp_path / "prof.txt", "throughput-confluent")
    assert path.name == "prof-throughput-confluent.txt"
    assert "missing" in profile_summary(path)
    path.write_text(f"{ROOT};ConfluentIO.poll (c.py:1) 3\n{ROOT};Pipeline.decode (p.py:2) 1\n")
    line = profile_summary(path)
    assert line.endswith("client: poll 75.0%, decode (scan, features) 25.0%"), line
    assert profile_summary(tmp_path / "flame.svg").startswith("py-spy profile in")
