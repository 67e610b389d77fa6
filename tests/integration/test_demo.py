"""README's first command: the demo brings up Kafka, the simulator and the worker, shows
traffic, and stops every child it started, on Ctrl-C and even when it is killed outright."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

TRAFFIC_TIMEOUT_S = 240.0  # a first run compiles the numba kernels


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Demo:
    """``stream-fm demo`` exactly as README runs it (no flags), its output read as it comes."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stream_fm", "demo", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # Ctrl-C as a terminal delivers it: a run started in the background (nohup, `&`)
            # ignores SIGINT, and Python keeps an ignored SIGINT ignored in the demo.
            preexec_fn=_sigint_as_in_a_terminal,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_traffic(self) -> str:
        """The first progress line showing events, predictions, learning and an NE: the
        first window (10 s of event time) has closed, so negatives are final too."""
        deadline = time.monotonic() + TRAFFIC_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(r"events=([\d,]+).*predictions=([\d,]+) learned=([\d,]+)", line)
                if (
                    m
                    and all(int(g.replace(",", "")) > 0 for g in m.groups())
                    and re.search(r"NE=\d", line)
                ):
                    return line
            assert self.process.poll() is None, f"the demo exited:\n{self.output[-4000:]}"
            time.sleep(0.5)
        raise AssertionError(f"no traffic within {TRAFFIC_TIMEOUT_S:.0f}s:\n{self.output[-4000:]}")

    def child_pids(self) -> dict[str, int]:
        pids = {
            name: int(pid)
            for name, pid in re.findall(
                r"(Kafka|worker|simulator)\b[^\n]*?\(pid (\d+)\)", self.output
            )
        }
        assert set(pids) == {"Kafka", "worker", "simulator"}, self.output[:3000]
        return pids

    def finish(self, timeout_s: float = 90.0) -> int:
        code = self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return code


def _alive(pid: int) -> bool:
    """Running or sleeping; a zombie waiting for its reaper counts as gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = re.search(r"^State:\s+(\w)", status, re.M)
    return state is not None and state.group(1) not in ("Z", "X")


def _wait_gone(pids: dict[str, int], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [name for name, pid in pids.items() if _alive(pid)]
        if not left:
            return []
        time.sleep(0.25)
    return [name for name, pid in pids.items() if _alive(pid)]


def test_demo_as_readme_runs_it_shows_traffic_and_stops_on_ctrl_c() -> None:
    demo = Demo()
    try:
        first = demo.wait_for_traffic()
        pids = demo.child_pids()
        # Let it run a little: the window metrics and more progress lines appear.
        time.sleep(6)
        demo.process.send_signal(signal.SIGINT)
        code = demo.finish()
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
    output = demo.output
    assert code == 0, output[-4000:]
    assert re.search(r"logloss=\d+\.\d+ \(window \d+\.\d+\) NE=\d+\.\d+ \(window", first), first
    assert re.search(r"demo: logs in \S+: kafka\.log, worker\.log, simulator\.log", output)
    assert "worker stopped after" in output, "the worker drained and printed its summary"
    assert re.search(r"checkpoints=[1-9]", output), "the worker checkpointed on the way out"
    assert demo.lines[-1].startswith("demo: stopped every child it started"), output[-2000:]
    assert _wait_gone(pids, 10) == [], "a child outlived the demo"
    # Its temp dir keeps the logs and loses the bulk: hundreds of MB per run filled a disk.
    work = Path(re.findall(r"logs are in (\S+) \(its checkpoints removed\)", output)[-1])
    assert sorted(p.name for p in work.iterdir()) == ["kafka.log", "simulator.log", "worker.log"]


def test_children_die_with_the_demo_even_when_it_is_killed(tmp_path: Path) -> None:
    # Killed outright, the demo cannot clean up: its work goes where pytest removes it.
    demo = Demo("--metrics-port", "0", "--work-dir", str(tmp_path))
    try:
        demo.wait_for_traffic()
        pids = demo.child_pids()
        os.kill(demo.process.pid, signal.SIGKILL)
        demo.finish(timeout_s=10)
        left = _wait_gone(pids, 60)
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
        for pid in pids.values() if "pids" in locals() else ():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert left == [], f"still running after the demo was killed: {left}"


def test_a_taken_metrics_port_moves_the_demo_to_a_free_one(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        demo = Demo("--metrics-port", str(taken), "--duration-s", "15", "--work-dir", str(tmp_path))
        code = demo.finish(timeout_s=300)
    assert code == 0, demo.output[-4000:]
    moved = re.search(rf"port {taken} is taken; the worker's metrics go to port (\d+)", demo.output)
    assert moved, demo.output[:3000]
    assert f"metrics on http://127.0.0.1:{moved.group(1)}/metrics" in demo.output


def test_the_secure_demo_logs_in_over_sasl_ssl_with_only_its_acls_and_learns(
    tmp_path: Path,
) -> None:
    demo = Demo(
        "--secure", "--metrics-port", "0", "--duration-s", "20", "--work-dir", str(tmp_path)
    )
    line = demo.wait_for_traffic()
    code = demo.finish(timeout_s=300)
    assert code == 0, demo.output[-4000:]
    assert "over SASL_SSL (SCRAM-SHA-512) as 'worker', with only the ACLs it needs" in demo.output
    assert "refused by the cluster" not in demo.output, line


@pytest.mark.parametrize("child", ["simulator"])
def test_a_child_that_dies_is_reported_with_its_log_and_fails_the_demo(
    child: str, tmp_path: Path
) -> None:
    demo = Demo("--metrics-port", "0", "--work-dir", str(tmp_path))
    try:
        demo.wait_for_traffic()
        os.kill(demo.child_pids()[child], signal.SIGKILL)
        code = demo.finish()
    finally:
        if demo.process.poll() is None:
            demo.process.kill()
    assert code == 1, demo.output[-4000:]
    assert re.search(
        rf"demo: the {child} exited with code -9; its log \S+{child}\.log", demo.output
    )
    assert demo.lines[-1].startswith("demo: stopped every child it started"), demo.output[-2000:]
