"""Writes the made-up format fixtures in this folder: a few dozen rows per format, laid out like
the public ad logs (libsvm/libffm, Criteo CSV and TSV, Avazu CSV, TalkingData CSV) but with
invented values, so the format tests run on a plain clone. Deterministic: run it again and the
files do not change (``python tests/data/make_fixtures.py``).

Every file has ``ROWS`` rows and ``POSITIVES[file]`` positives, which the tests assert.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).parent
ROWS = 48
POSITIVES = {
    "ipinyou_like.libsvm": 6,
    "xlearn_like.libffm": 12,
    "criteo_like.csv": 10,
    "criteo_like.tsv": 10,
    "avazu_like.csv": 8,
    "talkingdata_like.csv": 5,  # conversions
}


def labels(name: str, rng: random.Random) -> list[int]:
    rows = [1] * POSITIVES[name] + [0] * (ROWS - POSITIVES[name])
    rng.shuffle(rows)
    return rows


def hex8(rng: random.Random) -> str:
    return f"{rng.getrandbits(32):08x}"


def ipinyou(rng: random.Random) -> str:
    out = []
    for label in labels("ipinyou_like.libsvm", rng):
        base = [1, 6 + label, 31, 45 + rng.randrange(4)]  # one field leans on the label
        base += [131_280 + rng.randrange(40) + 40 * f for f in range(12)]
        out.append(f"{label} " + " ".join(f"{i}:1" for i in base))
    return "\n".join(out) + "\n"


def xlearn(rng: random.Random) -> str:
    out = []
    for label in labels("xlearn_like.libffm", rng):
        items = [f"{f}:{rng.randrange(10_000)}:0.3651" for f in range(16)]
        items.append(f"16:{7755 if label else rng.randrange(10_000)}:0.50000")
        out.append(f"{label} " + " ".join(items))
    return "\n".join(out) + "\n"


def criteo_columns(rng: random.Random, label: int) -> list[str]:
    counts = ["" if rng.random() < 0.1 else str(rng.randrange(0, 2_000)) for _ in range(13)]
    cats = ["" if rng.random() < 0.1 else hex8(rng) for _ in range(26)]
    cats[0] = "68fd1e64" if label else "05db9164"
    return [str(label), *counts, *cats]


def criteo_csv(rng: random.Random) -> str:
    header = ["Id", "Label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    rows = [
        ",".join([str(10_000_000 + n), *criteo_columns(rng, label)])
        for n, label in enumerate(labels("criteo_like.csv", rng))
    ]
    return "\n".join([",".join(header), *rows]) + "\n"


def criteo_tsv(rng: random.Random) -> str:
    rows = ["\t".join(criteo_columns(rng, label)) for label in labels("criteo_like.tsv", rng)]
    return "\n".join(rows) + "\n"


def avazu(rng: random.Random) -> str:
    header = (
        "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,"
        "app_category,device_id,device_ip,device_model,device_type,device_conn_type,"
        "C14,C15,C16,C17,C18,C19,C20,C21"
    )
    rows = []
    for n, label in enumerate(labels("avazu_like.csv", rng)):
        row = [str(10**18 + n * 7919), str(label), f"141021{n % 24:02d}", "1005", str(label)]
        row += [hex8(rng) for _ in range(9)]
        row += ["1", str(rng.randrange(3)), str(15_000 + rng.randrange(800)), "320", "50"]
        row += [str(rng.randrange(1_700, 1_800)), "0", "35", "-1", str(rng.randrange(100))]
        rows.append(",".join(row))
    return "\n".join([header, *rows]) + "\n"


def talkingdata(rng: random.Random) -> str:
    header = "ip,app,device,os,channel,click_time,attributed_time,is_attributed"
    rows = []
    for n, label in enumerate(labels("talkingdata_like.csv", rng)):
        second = 9 * n
        click = f"2017-11-06 16:{second // 60:02d}:{second % 60:02d}"
        done = second + rng.randrange(5, 240)  # conversions seconds to minutes later
        attributed = f"2017-11-06 {16 + done // 3600}:{done // 60 % 60:02d}:{done % 60:02d}"
        app = "19" if label else str(rng.choice([3, 12, 15, 18]))
        fields = [str(rng.randrange(1, 99_999)), app, "1", str(rng.randrange(10, 40))]
        fields += [str(rng.randrange(100, 500)), click, attributed if label else "", str(label)]
        rows.append(",".join(fields))
    return "\n".join([header, *rows]) + "\n"


WRITERS = {
    "ipinyou_like.libsvm": ipinyou,
    "xlearn_like.libffm": xlearn,
    "criteo_like.csv": criteo_csv,
    "criteo_like.tsv": criteo_tsv,
    "avazu_like.csv": avazu,
    "talkingdata_like.csv": talkingdata,
}


def main() -> None:
    for name, write in WRITERS.items():
        (HERE / name).write_text(write(random.Random(name)))


if __name__ == "__main__":
    main()
