"""Ingestion: every field and weight kept, every bad line quarantined with its reason."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import aliccp.format as fmt
from models.features import ALL_FIELDS, COMMON_FIELDS, SKELETON_FIELDS, ids_key, wts_key
from tasks import ingest as ing
from tasks.config import IngestConfig

KEY_A, KEY_B, KEY_UNKNOWN = "a" * 32, "b" * 32, "c" * 32
LENIENT = IngestConfig(valid_fraction=0.0, min_count=1, max_quarantine_fraction=1.0)
REPO = Path(__file__).resolve().parents[2]


def _features(entries) -> str:
    return "\x01".join(f"{f}\x02{i}\x03{v}" for f, i, v in entries)


def _write_raw(folder: Path, skeleton_lines: list[str], common_lines: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (folder / f"sample_skeleton_{split}.csv").write_text("".join(skeleton_lines))
        (folder / f"common_features_{split}.csv").write_text("".join(common_lines))
    return folder


COMMON = [
    f"{KEY_A},3,{_features([('101', 1, 1.0), ('109_14', 5, 1.5), ('109_14', 6, 0.7)])}\n",
    f"{KEY_B},2,{_features([('101', 2, 1.0), ('999', 7, 1.0)])}\n",
]
GOOD = [
    f"1,0,0,{KEY_A},2,{_features([('205', 100, 1.0), ('210', 200, 1.0)])}\n",
    f"2,1,1,{KEY_A},3,{_features([('205', 101, 1.0), ('210', 200, 1.0), ('508', 300, 2.5)])}\n",
    f"3,1,0,{KEY_B},0,\n",
]
BAD = {  # line text -> expected reason
    f"4,0,1,{KEY_A},1,{_features([('205', 100, 1.0)])}\n": fmt.R_CONV_NO_CLICK,
    f"5,2,0,{KEY_A},1,{_features([('205', 100, 1.0)])}\n": fmt.R_LABEL,
    f"6,x,0,{KEY_A},1,{_features([('205', 100, 1.0)])}\n": fmt.R_LABEL,
    f"7,1,0,{KEY_UNKNOWN},1,{_features([('205', 100, 1.0)])}\n": fmt.R_UNKNOWN_KEY,
    f"8,1,0,{KEY_A},5,{_features([('205', 100, 1.0)])}\n": fmt.R_FEATURE_NUM,
    "9,1,0\n": fmt.R_COLUMNS,
    f"10;1;0;{KEY_A};1;{_features([('205', 100, 1.0)])}\n": fmt.R_COLUMNS,
    f"11,1,0,{KEY_A},1,205\x02abc\x031.0\n": fmt.R_ENTRY,
    "\n": fmt.R_EMPTY,
}


def _read_quarantine(out: Path) -> list[dict]:
    with open(out / "quarantine.csv") as fh:
        return list(csv.DictReader(fh))


def test_every_defect_is_quarantined_with_reason_and_line(tmp_path):
    """Each bad line lands in quarantine.csv with its file, line number and reason; good lines survive."""
    lines = [GOOD[0], *BAD.keys(), GOOD[1], GOOD[2]]
    raw = _write_raw(tmp_path / "raw", lines, COMMON)
    report = ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)

    rows = [
        r for r in _read_quarantine(tmp_path / "out") if r["file"] == "sample_skeleton_train.csv"
    ]
    got = {int(r["line"]): r["reason"] for r in rows}
    expected = {i + 2: reason for i, reason in enumerate(BAD.values())}  # after GOOD[0] on line 1
    assert got == expected
    train = pq.read_table(tmp_path / "out" / "train" / "impressions.parquet")
    assert train["sample_id"].to_pylist() == ["1", "2", "3"]
    skeleton = next(f for f in report.files if f.path.endswith("sample_skeleton_train.csv"))
    assert skeleton.rows_read == len(lines)
    assert skeleton.rows_written == 3
    assert skeleton.rows_quarantined == len(BAD)


def test_rows_read_equals_written_plus_quarantined(tmp_path):
    """The accounting identity holds for every file and in the JSON report."""
    raw = _write_raw(tmp_path / "raw", [*GOOD, *BAD.keys()], COMMON)
    report = ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    for f in report.files:
        assert f.rows_read == f.rows_written + f.rows_quarantined
        assert f.rows_quarantined == sum(f.quarantined_by_reason.values())
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["rows_read"] == saved["rows_written"] + saved["rows_quarantined"] > 0


def test_all_entries_and_weights_kept(tmp_path):
    """Multi-valued fields keep every entry with its weight; absent fields are empty lists."""
    raw = _write_raw(tmp_path / "raw", GOOD, COMMON)
    ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    imp = pq.read_table(tmp_path / "out" / "train" / "impressions.parquet").to_pylist()
    assert imp[1][ids_key("210")] == [200] and imp[1][ids_key("508")] == [300]
    assert imp[1][wts_key("508")] == [2.5]
    assert imp[2][ids_key("205")] == [] and imp[2]["click"] == 1
    common = {
        r["common_feature_index"]: r
        for r in pq.read_table(tmp_path / "out" / "train" / "common.parquet").to_pylist()
    }
    assert common[KEY_A][ids_key("109_14")] == [5, 6]
    assert common[KEY_A][wts_key("109_14")] == pytest.approx([1.5, 0.7])


def test_unknown_field_is_counted_not_silently_lost(tmp_path):
    raw = _write_raw(tmp_path / "raw", GOOD, COMMON)
    report = ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    common = next(f for f in report.files if f.path.endswith("common_features_train.csv"))
    assert common.unknown_fields == {"999": 1}


def test_crlf_lines_are_accepted_and_counted(tmp_path):
    """CRLF endings are accepted (the \\r is stripped) and counted in the report."""
    raw = _write_raw(tmp_path / "raw", [g.replace("\n", "\r\n") for g in GOOD], COMMON)
    report = ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    skeleton = next(f for f in report.files if f.path.endswith("sample_skeleton_train.csv"))
    assert skeleton.rows_written == 3 and skeleton.crlf_lines == 3


def test_invalid_utf8_is_quarantined(tmp_path):
    raw = _write_raw(tmp_path / "raw", GOOD, COMMON)
    with open(raw / "sample_skeleton_train.csv", "ab") as fh:
        fh.write(b"12,0,0," + KEY_A.encode() + b",1,205\x02\xff\xfe\x031.0\n")
    ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    rows = _read_quarantine(tmp_path / "out")
    assert {
        "file": "sample_skeleton_train.csv",
        "line": "4",
        "sample_id": "",
        "reason": fmt.R_UTF8,
    } in rows


@pytest.mark.parametrize("workers", [1, 2])
def test_small_chunks_give_the_same_result(tmp_path, workers):
    """Chunking and worker processes are invisible: tiny chunks parsed in-process or by two
    workers yield the same tables and line numbers as one chunk."""
    lines = [*GOOD, *BAD.keys(), *GOOD]
    raw = _write_raw(tmp_path / "raw", lines, COMMON)
    ing.ingest_ali_ccp(raw, tmp_path / "big", LENIENT)
    small = LENIENT.model_copy(update={"chunk_bytes": 40, "workers": workers})
    ing.ingest_ali_ccp(raw, tmp_path / "small", small)
    for split in ("train", "test"):
        assert pq.read_table(tmp_path / "big" / split / "impressions.parquet").equals(
            pq.read_table(tmp_path / "small" / split / "impressions.parquet")
        )
    assert _read_quarantine(tmp_path / "big") == _read_quarantine(tmp_path / "small")


def test_gzip_input(tmp_path):
    raw = _write_raw(tmp_path / "raw", GOOD, COMMON)
    for path in list(raw.iterdir()):
        with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()
    report = ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    assert report.split_rows["train"] == 3


def test_missing_raw_file_names_it(tmp_path):
    raw = _write_raw(tmp_path / "raw", GOOD, COMMON)
    (raw / "common_features_test.csv").unlink()
    with pytest.raises(ing.IngestError, match="common_features_test.csv"):
        ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)


def test_too_much_bad_input_fails_the_stage(tmp_path):
    raw = _write_raw(tmp_path / "raw", [*GOOD, *BAD.keys()], COMMON)
    strict = LENIENT.model_copy(update={"max_quarantine_fraction": 0.05})
    with pytest.raises(ing.IngestError, match="max_quarantine_fraction"):
        ing.ingest_ali_ccp(raw, tmp_path / "out", strict)


def test_validation_split_is_by_context(tmp_path, small_raw):
    """No common_feature_index appears in both train and valid."""
    cfg = IngestConfig(valid_fraction=0.3, min_count=1)
    ing.ingest_ali_ccp(small_raw, tmp_path / "out", cfg)
    keys = {
        s: set(
            pq.read_table(tmp_path / "out" / s / "impressions.parquet")[
                "common_feature_index"
            ].to_pylist()
        )
        for s in ("train", "valid")
    }
    assert keys["train"] and keys["valid"] and not keys["train"] & keys["valid"]


def test_generator_round_trip(tmp_path, small_raw):
    """Every field, id and weight of every generated line comes back from the Parquet tables."""
    ing.ingest_ali_ccp(small_raw, tmp_path / "out", IngestConfig(valid_fraction=0.2, min_count=1))
    tables = {
        s: pq.read_table(tmp_path / "out" / s / "impressions.parquet").to_pylist()
        for s in ("train", "valid")
    }
    parsed = {r["sample_id"]: r for rows in tables.values() for r in rows}
    common = {}
    for s in ("train", "valid"):
        for r in pq.read_table(tmp_path / "out" / s / "common.parquet").to_pylist():
            common[r["common_feature_index"]] = r
    n = 0
    for line in (small_raw / "sample_skeleton_train.csv").read_text().splitlines():
        sid, click, conv, key, _, flist = line.split(",")
        row = parsed[sid]
        assert (row["click"], row["conversion"], row["common_feature_index"]) == (
            int(click),
            int(conv),
            key,
        )
        assert _grouped(flist, SKELETON_FIELDS) == _row_lists(row, SKELETON_FIELDS)
        n += 1
    assert n == sum(len(t) for t in tables.values())
    for line in (small_raw / "common_features_train.csv").read_text().splitlines():
        key, _, flist = line.split(",")
        assert _grouped(flist, COMMON_FIELDS) == _row_lists(common[key], COMMON_FIELDS)


def _grouped(flist: str, fields) -> dict:
    out = {f: ([], []) for f in fields}
    for entry in filter(None, flist.split("\x01")):
        field, rest = entry.split("\x02")
        fid, value = rest.split("\x03")
        out[field][0].append(int(fid))
        out[field][1].append(float(np.float32(value)))  # stored as float32, exactly
    return out


def _row_lists(row: dict, fields) -> dict:
    return {f: (row[ids_key(f)], row[wts_key(f)]) for f in fields}


def test_vocabulary_learned_from_train_only(tmp_path):
    """Ids that occur only in the test split are not in the vocabulary (they map to OOV)."""
    raw = _write_raw(tmp_path / "raw", GOOD, COMMON)
    (raw / "sample_skeleton_test.csv").write_text(
        f"1,0,0,{KEY_A},1,{_features([('205', 777, 1.0)])}\n"
    )
    ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    vocab = ing.load_vocabularies(tmp_path / "out" / "vocab.parquet")
    assert set(vocab) == set(ALL_FIELDS)
    assert 777 not in vocab["205"] and {100, 101} <= set(vocab["205"])


def test_duplicate_sample_id_quarantines_the_later_line(tmp_path):
    """A repeated sample id keeps its first line and quarantines the repeat, across chunks."""
    repeat = GOOD[0]
    raw = _write_raw(tmp_path / "raw", [*GOOD, repeat], COMMON)
    ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT.model_copy(update={"chunk_bytes": 64}))
    rows = [
        r for r in _read_quarantine(tmp_path / "out") if r["file"] == "sample_skeleton_train.csv"
    ]
    assert rows == [
        {
            "file": "sample_skeleton_train.csv",
            "line": "4",
            "sample_id": "1",
            "reason": fmt.R_DUP_SAMPLE,
        }
    ]


def test_published_archives_are_read(tmp_path):
    """The two downloaded archives sample_train.tar.gz / sample_test.tar.gz work as they are."""
    import tarfile

    raw = _write_raw(tmp_path / "files", GOOD, COMMON)
    archives = tmp_path / "raw"
    archives.mkdir()
    for split in ("train", "test"):
        with tarfile.open(archives / f"sample_{split}.tar.gz", "w:gz") as tar:
            for name in (f"sample_skeleton_{split}.csv", f"common_features_{split}.csv"):
                tar.add(raw / name, arcname=f"sample_{split}/{name}")
    report = ing.ingest_ali_ccp(archives, tmp_path / "out", LENIENT)
    assert report.split_rows == {"train": 3, "valid": 0, "test": 3}
    assert any("sample_train.tar.gz:" in f.path for f in report.files)


def test_blocks_are_bounded_by_the_chunk_size(tmp_path):
    """Streaming: no block is larger than chunk_bytes plus one line, and lines are numbered."""
    path = tmp_path / "lines.csv"
    lines = [f"{i},{'x' * (i % 50)}" for i in range(1, 2001)]
    path.write_text("\n".join(lines) + "\n")
    longest = max(len(line) for line in lines) + 1
    blocks = list(ing.read_blocks(ing.RawSource(path), chunk_bytes=1000))
    assert len(blocks) > 10
    assert all(len(block) <= 1000 + longest for block, _ in blocks)
    rebuilt = [ln for block, _ in blocks for ln in block.decode().split("\n")]
    assert rebuilt == lines
    assert [first for _, first in blocks] == [
        1 + sum(b.count(b"\n") + 1 for b, _ in blocks[:i]) for i in range(len(blocks))
    ]


def test_parallel_map_keeps_order_and_bounds_work_in_flight():
    """At most `in_flight` inputs are pulled ahead of what the consumer has taken."""
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield (i,)

    results = ing.ordered_map(abs, items(), workers=2, in_flight=3)
    assert next(results) == 0
    assert len(pulled) <= 3
    assert list(results) == list(range(1, 20))


def test_seen_keys_matches_a_set():
    rng = np.random.default_rng(0)
    seen, reference = ing.SeenKeys(max_runs=3), set()
    for _ in range(20):
        batch = rng.integers(0, 500, size=50).astype(np.uint64)
        expected = []
        for key in batch.tolist():
            expected.append(key in reference)
            reference.add(key)
        assert seen.check_and_add(batch).tolist() == expected
    assert len(seen) == len(reference)


def test_quarantined_id_text_is_capped_and_decoded_leniently(tmp_path):
    """A long line without commas (wrong separator) does not copy the whole line as its id,
    and a cut multi-byte character does not break the quarantine file."""
    long_line = "x" + "é" * 100 + ";1;0\n"  # the 64-byte cap falls inside an é
    raw = _write_raw(tmp_path / "raw", [*GOOD, long_line], COMMON)
    ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    row = next(
        r for r in _read_quarantine(tmp_path / "out") if r["file"] == "sample_skeleton_train.csv"
    )
    assert row["reason"] == fmt.R_COLUMNS and row["line"] == "4"
    assert len(row["sample_id"].encode()) <= 64 + 3  # the cap, plus a replacement character


def test_key_hashes_equal_pandas_hash_array():
    """The train/valid split depends on hash_keys: it must stay pandas' hash_array exactly
    (re-done with numpy so ingestion does not import pandas), for any length and UTF-8."""
    import pandas as pd
    import pyarrow as pa

    rng = np.random.default_rng(0)
    alphabet = [*"abcdef0123456789,", "é", "中", "\x00", "😀"]
    keys = ["", "a", KEY_A] + [
        "".join(rng.choice(alphabet, size=int(rng.integers(0, 40)))) for _ in range(500)
    ]
    expected = pd.util.hash_array(np.array(keys, dtype=object), categorize=False)
    assert np.array_equal(ing.hash_keys(pa.array(keys)), expected)
    assert np.array_equal(ing.hash_keys(pa.array(keys).slice(3, 50)), expected[3:53])


def test_known_keys_compare_strings_not_just_hashes():
    """Membership is exact even when distinct keys share a hash (forced here)."""
    import pyarrow as pa

    known = ing.KnownKeys(pa.array(["a", "b", "c"]), np.array([7, 7, 9], dtype=np.uint64))
    queries = pa.array(["b", "x", "a", "c", "y"])
    hashes = np.array([7, 7, 7, 9, 3], dtype=np.uint64)
    assert known.contains(queries, hashes).tolist() == [True, False, True, True, False]
    empty = ing.KnownKeys(pa.array([], pa.string()), np.zeros(0, dtype=np.uint64))
    assert empty.contains(queries, hashes).tolist() == [False] * 5


def test_unknown_field_ids_are_counted_by_exact_name(tmp_path):
    """Field ids are matched on all their bytes: longer ids, prefixes of known ids and ids
    with a NUL byte are unknown, counted under their own name, and not kept."""
    odd = [("1010", 8, 1.0), ("10", 9, 1.0), ("101\x00", 10, 1.0), ("109_14_extra", 11, 2.0)]
    common = [f"{KEY_A},5,{_features([('101', 1, 1.0), *odd])}\n", COMMON[1]]
    raw = _write_raw(tmp_path / "raw", GOOD, common)
    report = ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    counted = next(f for f in report.files if f.path.endswith("common_features_train.csv"))
    assert counted.unknown_fields == {"1010": 1, "10": 1, "101\x00": 1, "109_14_extra": 1, "999": 1}
    contexts = pq.read_table(tmp_path / "out" / "train" / "common.parquet").to_pylist()
    first = next(c for c in contexts if c["common_feature_index"] == KEY_A)
    assert first["ids_101"] == [1] and first["wts_101"] == [1.0]


ARABIC_THREE = "\u0663"  # a Unicode digit, not an ASCII one
ODD_NUMBERS = {  # forms that Arrow's casts read but the format does not: (line, reason)
    "hexadecimal id": (f"21,0,0,{KEY_A},1,{_features([('205', '0x1F', 1.0)])}\n", fmt.R_ENTRY),
    "signed id": (f"22,0,0,{KEY_A},1,{_features([('205', '-0', 1.0)])}\n", fmt.R_ENTRY),
    "19-digit id": (f"26,0,0,{KEY_A},1,{_features([('205', 10**18, 1.0)])}\n", fmt.R_ENTRY),
    "non-ASCII digit id": (
        f"23,0,0,{KEY_A},1,{_features([('205', ARABIC_THREE, 1.0)])}\n",
        fmt.R_ENTRY,
    ),
    "weight with +": (f"24,0,0,{KEY_A},1,{_features([('205', 100, '+1.0')])}\n", fmt.R_ENTRY),
    "non-ASCII feature_num": (
        f"25,0,0,{KEY_A},{ARABIC_THREE},{_features([('205', 100, 1.0)])}\n",
        fmt.R_FEATURE_NUM,
    ),
}


@pytest.mark.parametrize("other_bad", [False, True])
@pytest.mark.parametrize("odd", list(ODD_NUMBERS))
def test_odd_numbers_are_quarantined_whatever_else_the_block_holds(tmp_path, odd, other_bad):
    """A hexadecimal, signed or 19-digit id, a non-ASCII digit or a '+' weight makes a line
    malformed, alone in its block or next to other malformed ids and weights (which send the
    parser down its slower path); never an exception."""
    line, reason = ODD_NUMBERS[odd]
    others = [f"31,0,0,{KEY_A},1,205\x02x\x03y\n"] if other_bad else []
    raw = _write_raw(tmp_path / "raw", [GOOD[0], line, *others], COMMON)
    ing.ingest_ali_ccp(raw, tmp_path / "out", LENIENT)
    rows = _read_quarantine(tmp_path / "out")
    got = {(r["line"], r["reason"]) for r in rows if r["file"] == "sample_skeleton_train.csv"}
    assert ("2", reason) in got
    train = pq.read_table(tmp_path / "out" / "train" / "impressions.parquet")
    assert train["sample_id"].to_pylist() == ["1"]


def test_ingestion_imports_no_pandas_nor_the_training_stack(tmp_path, small_raw):
    """Ingestion loads only numpy and pyarrow: pandas (0.3-0.7 s to import, pulled in by
    pyarrow 10's `Array.take`/`Table.filter` methods and `pa.array`) and the heavy stacks
    would add their start-up to every run."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tasks.config import IngestConfig\n"
        "from tasks.ingest import ingest_ali_ccp\n"
        f"ingest_ali_ccp(Path({str(small_raw)!r}), Path({str(tmp_path / 'out')!r}),"
        " IngestConfig(valid_fraction=0.2, min_count=1, chunk_bytes=4096, workers=2))\n"
        "heavy = ('pandas', 'tensorflow', 'tensorflow_data_validation', 'apache_beam',"
        " 'mlflow', 'prefect')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.strip() == "[]"
