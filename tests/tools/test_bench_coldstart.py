"""``stream-fm bench coldstart`` runs each step as a process on its own numba cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_fm.cli import main


def test_coldstart_separates_compilation_from_the_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cold.json"
    assert main(["bench", "coldstart", "--impressions", "3000", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["events"] > 3000  # impressions and their clicks
    # An empty cache compiles; after `stream-fm compile` the replay only loads the cache.
    assert result["uncompiled_first"]["compile_s"] > 5 * result["first"]["compile_s"]
    assert result["install"]["wall_s"] > result["first"]["compile_s"]
    for run in ("uncompiled_first", "first", "steady"):
        assert result[run]["examples_per_s"] > 0
        assert result[run]["wall_s"] > result[run]["stream_s"] + result[run]["compile_s"]
    printed = capsys.readouterr().out
    assert "first run after install / steady" in printed
