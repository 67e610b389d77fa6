"""Replay: every file format through the worker's pipeline, on the real logs in ../shared/data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import orjson
import pytest

from stream_fm.cli import main
from stream_fm.config import build_settings
from stream_fm.events import Click, EventDecoder, Impression, Labeled
from stream_fm.features import FeatureHasher
from stream_fm.pipeline import Pipeline
from stream_fm.replay import FORMATS, read_batches, replay

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETTINGS = build_settings({"hash_bits": 16, "k": 4, "attribution_window_s": 3600.0})

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


@pytest.mark.parametrize(("fmt", "name", "rows", "ctr"), REAL_LOGS, ids=[r[1] for r in REAL_LOGS])
def test_real_labeled_logs_replay_with_their_click_rate(
    fmt: str, name: str, rows: int, ctr: tuple[float, float]
) -> None:
    path = DATA / name
    assert path.is_file(), f"{path}: the shared data must sit beside the repository"
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


def test_talkingdata_conversions_join_with_their_real_delays() -> None:
    path = DATA / "talkingdata" / "train_sample.sorted.csv"
    events = _events(path, "talkingdata")
    impressions = [e for e in events if type(e) is Impression]
    clicks = [e for e in events if type(e) is Click]
    assert len(impressions) == 100_000 and 150 < len(clicks) < 300
    ts = [e.ts_ms for e in events]  # type: ignore[attr-defined]
    assert ts == sorted(ts), "conversions are emitted in event-time order among impressions"
    report = replay(Pipeline.from_settings(SETTINGS), read_batches(path, "talkingdata", _decoder()))
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
            str(DATA / "xlearn_criteo" / "small_train.txt"),
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
        "examples_per_second", "seconds",
    ):  # fmt: skip
        assert key in report, key
    assert report["examples"] == 200
    assert json.loads(capsys.readouterr().out)["examples"] == 200
