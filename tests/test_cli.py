"""The command line: each command's help shows the settings it reads, with help and default;
bad input and bad configuration end in one line naming the problem."""

from __future__ import annotations

import re

import pytest

from stream_fm.cli import SYNC_SETTINGS, main
from stream_fm.config import LEARNING_SETTINGS, SPECS


def _help(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def _words(text: str) -> str:
    return " ".join(text.split())  # help lines wrap anywhere


def _flags(text: str) -> set[str]:
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", text, re.M))


def _setting_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_run_lists_every_setting_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(capsys, "run")
    flags = _flags(text)
    for name in SPECS:
        assert _setting_flag(name) in flags, name
    assert "(default: 127.0.0.1:9092)" in _words(text) and "(default: 3600.0)" in _words(text)


@pytest.mark.parametrize("command", [("replay",), ("bench",), ("bench", "sync")])
def test_offline_commands_show_only_the_settings_they_read(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    flags = _flags(_help(capsys, *command))
    read = {*LEARNING_SETTINGS, *(SYNC_SETTINGS if command == ("bench", "sync") else ())}
    for name in SPECS:
        assert (_setting_flag(name) in flags) == (name in read), name


@pytest.mark.parametrize(
    "command",
    [
        ("replay",),
        ("simulate",),
        ("demo",),
        ("bench",),
        ("bench", "kafka"),
        ("bench", "sync"),
        ("run",),
    ],
)
def test_every_option_has_help(
    capsys: pytest.CaptureFixture[str], command: tuple[str, ...]
) -> None:
    text = _help(capsys, *command)
    # An option without help is a line holding only the flag (and its metavar).
    bare = re.findall(r"^  (--[a-z0-9-]+)(?: [A-Z_]+)?\n(?!\s{20,}\S)", text, re.M)
    assert not bare, bare


def test_simulate_and_demo_show_their_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    demo = _words(_help(capsys, "demo"))
    assert "(default: 5000.0)" in demo and "(default: 9464)" in demo and "(default: 2)" in demo
    simulate = _words(_help(capsys, "simulate"))
    assert "(default: 100000)" in simulate and "(default: 3600.0)" in simulate


def test_a_bad_setting_is_one_line_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--max-poll-records", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["stream-fm: max_poll_records: must be >= 1"]


def test_replay_of_a_missing_file_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["replay", "no-such-file.jsonl", "--format", "jsonl"])
    assert code == 2
    assert capsys.readouterr().err.strip() == "stream-fm: no such file: no-such-file.jsonl"


def test_simulate_needs_one_destination(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--impressions", "10"]) == 2
    assert "--out PATH" in capsys.readouterr().err
    assert main(["simulate", "--duration-s", "5"]) == 2
    assert "--duration-s needs --rate" in capsys.readouterr().err


def test_demo_snapshot_needs_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--snapshot", "x.png"]) == 2
    assert "--snapshot needs --duration-s" in capsys.readouterr().err
