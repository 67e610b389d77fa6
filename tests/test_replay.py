"""Replay: every file format through the worker's pipeline.

Format tests read the made-up fixtures in tests/data (a plain clone has them); the tests on the
real public logs take ``real_data`` and are skipped, with the reason, where the logs are absent.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import orjson
import pytest

from stream_fm.cli import main
from stream_fm.config import build_settings
from stream_fm.events import Click, EventDecoder, Impression, Labeled
from stream_fm.features import FeatureHasher
from stream_fm.pipeline import Pipeline
from stream_fm.replay import FORMATS, ReplayReport, read_batches, replay
from tests.data.make_fixtures import POSITIVES, ROWS

FIXTURES = Path(__file__).parent / "data"
SETTINGS = build_settings({"hash_bits": 16, "k": 4, "attribution_window_s": 3600.0})

# (format, fixture) for every labeled-row format
FIXTURE_LOGS = [
    ("libsvm", "ipinyou_like.libsvm"),
    ("libsvm", "xlearn_like.libffm"),
    ("criteo", "criteo_like.csv"),
    ("criteo_tsv", "criteo_like.tsv"),
    ("avazu", "avazu_like.csv"),
]

# (format, file, rows to read at least, share of positives between)
REAL_LOGS = [
    ("libsvm", "ipinyou_deepctr/train.fm.txt", 26_773, (0.005, 0.02)),
    ("libsvm", "xlearn_criteo/small_train.txt", 200, (0.1, 0.4)),
    ("criteo", "criteo_3idiots/train.tiny.csv", 1_999, (0.1, 0.3)),
    ("criteo_tsv", "criteo_kaggle_head10k/train.head10k.tsv", 10_000, (0.15, 0.3)),
    ("avazu", "avazu_head9k/train.head9k.csv", 8_999, (0.1, 0.25)),
    ("avazu", "avazu_4idiots/tr.rx.csv", 2_994, (0.1, 0.25)),
]


def _decoder() -> EventDecoder:
    return EventDecoder(FeatureHasher(bits=16))


def _events(path: Path, fmt: str) -> list[object]:
    return [e for events, _ in read_batches(path, fmt, _decoder()) for _, e in events]


@pytest.mark.parametrize(("fmt", "name"), FIXTURE_LOGS, ids=[f[1] for f in FIXTURE_LOGS])
def test_every_labeled_format_replays_each_row_once(fmt: str, name: str) -> None:
    path = FIXTURES / name
    events = _events(path, fmt)
    assert len(events) == ROWS
    assert all(type(e) is Labeled and e.keys for e in events)
    assert sum(e.label for e in events) == POSITIVES[name]
    report = replay(Pipeline.from_settings(SETTINGS), read_batches(path, fmt, _decoder()))
    assert report.examples == ROWS and report.invalid_events == {}
    assert report.positives == POSITIVES[name]
    assert 0.0 < report.logloss < 1.0


def test_the_fixtures_are_what_their_generator_writes(tmp_path: Path) -> None:
    """tests/data is made by tests/data/make_fixtures.py, never edited by hand."""
    from tests.data import make_fixtures

    for name, write in make_fixtures.WRITERS.items():
        assert (FIXTURES / name).read_text() == write(random.Random(name)), name


@pytest.mark.parametrize(("fmt", "name", "rows", "ctr"), REAL_LOGS, ids=[r[1] for r in REAL_LOGS])
def test_real_labeled_logs_replay_with_their_click_rate(
    real_data: Path, fmt: str, name: str, rows: int, ctr: tuple[float, float]
) -> None:
    path = real_data / name
    assert path.is_file(), f"{path}: missing from the real-log folder"
    events = _events(path, fmt)
    assert len(events) == rows
    assert all(type(e) is Labeled and e.keys for e in events)
    report = replay(Pipeline.from_settings(SETTINGS), read_batches(path, fmt, _decoder()))
    assert report.examples == rows and report.invalid_events == {}
    assert ctr[0] < report.positives / rows < ctr[1]
    assert 0.0 < report.logloss < 1.0 and 0.5 < report.auc <= 1.0


def test_criteo_tsv_keeps_counts_numeric_and_skips_empty_fields(tmp_path: Path) -> None:
    line = "1\t" + "\t".join(["5", ""] + [""] * 11) + "\t" + "\t".join(["68fd1e64"] + [""] * 25)
    path = tmp_path / "one.tsv"
    path.write_text(line + "\n")
    (event,) = _events(path, "criteo_tsv")
    assert isinstance(event, Labeled) and event.label == 1
    assert event.keys == ["I1", "C1=68fd1e64"]
    bad = tmp_path / "short.tsv"
    bad.write_text("1\t2\t3\n")
    with pytest.raises(Exception, match="40"):
        _events(bad, "criteo_tsv")


def _talkingdata_joins(path: Path) -> tuple[list[Impression], list[Click], ReplayReport]:
    events = _events(path, "talkingdata")
    impressions = [e for e in events if type(e) is Impression]
    clicks = [e for e in events if type(e) is Click]
    ts = [e.ts_ms for e in events]
    assert ts == sorted(ts), "conversions are emitted in event-time order among impressions"
    report = replay(Pipeline.from_settings(SETTINGS), read_batches(path, "talkingdata", _decoder()))
    return impressions, clicks, report


def test_talkingdata_conversions_join_with_their_delays() -> None:
    impressions, clicks, report = _talkingdata_joins(FIXTURES / "talkingdata_like.csv")
    assert len(impressions) == ROWS and len(clicks) == POSITIVES["talkingdata_like.csv"]
    assert report.examples == ROWS
    # Every conversion comes within minutes, inside the hour's window: each one joins.
    assert report.positives == len(clicks)


def test_real_talkingdata_conversions_join_with_their_real_delays(real_data: Path) -> None:
    path = real_data / "talkingdata" / "train_sample.sorted.csv"
    impressions, clicks, report = _talkingdata_joins(path)
    assert len(impressions) == 100_000 and 150 < len(clicks) < 300
    assert report.examples == 100_000
    assert 0 < report.positives <= len(clicks)


@pytest.mark.parametrize("year_ms", [1_400_000_000_000, 3_900_000_000_000])
def test_historical_and_future_files_replay_unchanged(tmp_path: Path, year_ms: int) -> None:
    """A file has no "now": timestamps years ago (2014) or ahead (2093) are never refused, so
    replaying history gives what the worker gave then."""
    lines = [
        {"type": "impression", "id": f"i{n}", "ts": year_ms + n * 1000, "features": {"s": "a"}}
        for n in range(50)
    ] + [{"type": "click", "id": "i3", "ts": year_ms + 3_500}]
    path = tmp_path / "events.jsonl.gz"
    with gzip.open(path, "wb") as sink:
        sink.write(
            b"".join(orjson.dumps(line) + b"\n" for line in sorted(lines, key=lambda x: x["ts"]))
        )
    report = replay(Pipeline.from_settings(SETTINGS), read_batches(path, "jsonl", _decoder()))
    assert report.invalid_events == {}
    assert report.examples == 50 and report.positives == 1


def test_jsonl_bad_lines_are_counted_by_reason(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"type":"impression","id":"a","ts":1,"features":{"s":"x"}}\n'
        b"not json\n"
        b'{"type":"view","id":"a","ts":2}\n'
    )
    report = replay(Pipeline.from_settings(SETTINGS), read_batches(path, "jsonl", _decoder()))
    assert report.invalid_events == {"not_json": 1, "unknown_type": 1}
    assert report.events == 3 and report.examples == 1


def test_every_format_is_documented_in_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["replay", "--help"])
    text = capsys.readouterr().out
    for fmt in FORMATS:
        assert fmt in text


def test_replay_cli_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.json"
    code = main(
        [
            "replay",
            str(FIXTURES / "xlearn_like.libffm"),
            "--format",
            "libsvm",
            "--report",
            str(out),
            "--no-progress",
            "--hash-bits",
            "16",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    for key in (
        "examples", "logloss", "normalized_entropy", "auc", "calibration",
        "examples_per_second", "seconds", "compile_seconds",
    ):  # fmt: skip
        assert key in report, key
    assert report["examples"] == ROWS
    assert report["compile_seconds"] > 0  # timed apart from the stream's seconds
    assert json.loads(capsys.readouterr().out)["examples"] == ROWS
