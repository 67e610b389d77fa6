"""The apply log: appended events read back; a torn last line (kill -9 mid-write) is dropped,
damage anywhere else is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_fm.audit import ApplyLog, read_apply_log


def test_events_append_across_processes_and_a_torn_last_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "apply.jsonl"
    first = ApplyLog(path)
    first.write("start", writer="a")
    first.write("apply", records=[["t", 0, 0]])
    first.close()
    second = ApplyLog(path)  # a restarted worker appends to the same file
    second.write("start", writer="b")
    second.close()
    with path.open("ab") as file:
        file.write(b'{"event":"apply","recor')  # killed mid-write
    assert [e["event"] for e in read_apply_log(path)] == ["start", "apply", "start"]


def test_damage_before_the_last_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "apply.jsonl"
    path.write_bytes(b'{"event":"start"}\nnot json\n{"event":"apply","records":[]}\n')
    with pytest.raises(ValueError, match=r"apply\.jsonl:2"):
        read_apply_log(path)


def test_a_line_torn_by_a_kill_is_dropped_when_the_next_process_starts(tmp_path: Path) -> None:
    """A kill during a write longer than a page can stop it at a page boundary: the next
    process starts on a line of its own, and the torn one is left out."""
    path = tmp_path / "apply.jsonl"
    first = ApplyLog(path)
    first.write("start", writer="a")
    first.close()
    with path.open("ab") as file:
        file.write(b'{"event":"apply","records":[["t",0,0],["t",0')  # cut at a page
    second = ApplyLog(path)
    second.write("start", writer="b")
    second.write("apply", records=[["t", 0, 0]])
    second.close()
    events = read_apply_log(path)
    assert [(e["event"], e.get("writer")) for e in events] == [
        ("start", "a"),
        ("start", "b"),
        ("apply", None),
    ]
