"""Children that write their own log, stop in order, and never outlive their parent; tools
that stop on SIGTERM as on Ctrl-C and leave only their logs in /tmp."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_fm.tools.process import (
    Child,
    accepts,
    free_ports,
    port_is_free,
    sigterm_as_interrupt,
    tail_file,
)
from stream_fm.tools.scratch import scratch_dir


def test_free_ports_are_distinct_and_free() -> None:
    ports = free_ports(n=5)
    assert len(set(ports)) == 5 and all(port_is_free("127.0.0.1", p) for p in ports)
    with socket.socket() as held:
        held.bind(("127.0.0.1", ports[0]))
        held.listen()
        assert not port_is_free("127.0.0.1", ports[0]) and accepts("127.0.0.1", ports[0])


def test_a_child_logs_to_its_file_and_stops(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = Child(
        "sleeper",
        [sys.executable, "-c", "print('up', flush=True); import time; time.sleep(60)"],
        log,
    )
    deadline = time.monotonic() + 10
    while "up" not in child.tail() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.tail() == "up" and child.exit_code() is None
    assert child.stop(timeout_s=10) == -signal.SIGTERM


def test_tail_reads_the_last_lines_of_a_long_file(tmp_path: Path) -> None:
    path = tmp_path / "long.log"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail_file(path, 2) == "line 99998\nline 99999"
    assert tail_file(tmp_path / "missing.log", 3) == ""


def test_a_child_dies_with_its_parent_even_by_sigkill(tmp_path: Path) -> None:
    """The parent is a Python process that starts a Child, then is killed -9."""
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from stream_fm.tools.process import Child; "
            f"c = Child('grandchild', [sys.executable, '-c', 'import time; time.sleep(120)'], Path({str(tmp_path / 'g.log')!r})); "
            f"Path({str(pid_file)!r}).write_text(str(c.pid)); time.sleep(120)",
        ]
    )
    deadline = time.monotonic() + 30
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child_pid}/stat").read_text().split()[2]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")


def test_sigterm_as_interrupt_unwinds_like_ctrl_c_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    unwound = []
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        finally:
            unwound.append(True)  # a tool's cleanup runs
    assert unwound == [True]
    assert signal.getsignal(signal.SIGTERM) == before


def test_scratch_dir_keeps_logs_drops_bulk_and_leaves_a_given_dir_whole(tmp_path: Path) -> None:
    with scratch_dir(None, "stream-fm-test-", bulk=("*-checkpoints", "kafka")) as made:
        for name in ("a-checkpoints", "kafka", "logs-kept"):
            (made / name).mkdir()
            (made / name / "f").write_bytes(b"x")
        (made / "worker.log").write_text("kept")
    assert sorted(p.name for p in made.iterdir()) == ["logs-kept", "worker.log"]
    shutil.rmtree(made)
    with scratch_dir(tmp_path, "unused-", bulk=("*",)) as given:
        (given / "a-checkpoints").mkdir()
    assert (tmp_path / "a-checkpoints").is_dir()
