"""Options and fixtures for the whole suite: repeated runs (the flake budget) and the real logs.

``--repeat N`` runs every integration and fault test N times in one session (``make
test-repeat N=5``); each round of a randomised scenario gets its own seed (``round_seed``).

The real public logs are not part of a plain clone: tests that need them take the
``real_data`` fixture, which finds them in ``STREAM_FM_DATA_DIR`` or ``../shared/data`` and
skips with the reason otherwise (``-ra`` prints it in the summary). ``STREAM_FM_DATA_DIR`` set
to a folder that does not exist is an error: whoever set it (CI) expects the logs to be read.

The disk: a run needs ``MIN_FREE_GIB`` free in the temp dir or it stops at once, naming it
(not with ENOSPC fifty minutes in); the header and the summary print free space at the start,
the lowest seen between tests and at the end, so the run's peak use is in every CI log.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
_INTEGRATION = _TESTS / "integration"
SHARED_DATA = _TESTS.parents[1] / "shared" / "data"
# A full run's peak use of the temp dir, measured (docs/reliability.md), with room to spare.
MIN_FREE_GIB = 6.0
_GIB = 1024**3


class _DiskWatch:
    """Free space in the temp dir at the start, the lowest between tests, and at the end."""

    def __init__(self) -> None:
        self.where = tempfile.gettempdir()
        self.start = self.lowest = self.free()

    def free(self) -> float:
        return shutil.disk_usage(self.where).free / _GIB

    def sample(self) -> None:
        self.lowest = min(self.lowest, self.free())


_DISK = _DiskWatch()


def pytest_sessionstart(session: pytest.Session) -> None:
    if _DISK.start < MIN_FREE_GIB:
        pytest.exit(
            f"only {_DISK.start:.1f} GiB free in {_DISK.where}; a full run needs "
            f"{MIN_FREE_GIB:.0f} GiB (broker logs, checkpoints): free some space first",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"disk: {_DISK.start:.1f} GiB free in {_DISK.where} (a full run needs {MIN_FREE_GIB:.0f})"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _DISK.sample()  # before the fixtures go: a passing test's tmp_path is still there


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _DISK.sample()
    terminalreporter.write_line(
        f"disk: {_DISK.free():.1f} GiB free in {_DISK.where} at the end; {_DISK.start:.1f} at "
        f"the start, lowest {_DISK.lowest:.1f} (peak use {_DISK.start - _DISK.lowest:.1f} GiB)"
    )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run every test under tests/integration N times (flake budget)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    rounds = int(metafunc.config.getoption("repeat"))
    if rounds < 1:
        raise pytest.UsageError(f"--repeat must be >= 1, got {rounds}")
    if rounds == 1 or _INTEGRATION not in Path(str(metafunc.definition.path)).parents:
        return
    metafunc.fixturenames.append("repeat_round")
    metafunc.parametrize(
        "repeat_round", range(rounds), ids=[f"round{i + 1}" for i in range(rounds)]
    )


@pytest.fixture
def round_seed(request: pytest.FixtureRequest) -> int:
    """A scenario's random seed: ``FAULT_SEED`` (default 61), plus the round under --repeat."""
    base = int(os.environ.get("FAULT_SEED", "61"))
    callspec = getattr(request.node, "callspec", None)
    return base + int(callspec.params.get("repeat_round", 0) if callspec else 0)


def data_dir() -> Path | None:
    """Where the real logs are, or None when this checkout has none beside it."""
    configured = os.environ.get("STREAM_FM_DATA_DIR")
    if configured:
        return Path(configured)
    return SHARED_DATA if SHARED_DATA.is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of real public ad logs; skips when a plain clone has none."""
    found = data_dir()
    if found is None:
        pytest.skip(
            "real ad logs not found: set STREAM_FM_DATA_DIR or put shared/data beside the "
            "checkout (CI does); the format tests use tests/data instead"
        )
    if not found.is_dir():
        pytest.fail(f"STREAM_FM_DATA_DIR={found} is not a directory", pytrace=False)
    return found
