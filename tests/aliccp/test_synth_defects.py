"""Tests of defect injection (aliccp.synth.defects): ingestion quarantines exactly the lines
listed in defects.csv, valid lines stay byte-identical, and the CLI passes the options."""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import aliccp.format as fmt
import aliccp.synth as synth
import aliccp.synth.generate as generate
import tasks.ingest as ingest
from aliccp.format import RAW_SPLITS as SPLITS
from aliccp.format import common_file, skeleton_file
from aliccp.synth import (
    COMMON_KINDS,
    CRLF,
    DEFECT_KINDS,
    DEFECT_REASONS,
    DEFECTS_FILE,
    LINE_KINDS,
    SKELETON_KINDS,
    synthesize_ali_ccp,
)
from models.features import SAMPLE_ID_KEY
from tasks.config import IngestConfig


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


DEFECT_SIZES = (2000, 1000, 3)  # n_train, n_test, seed
DEFECT_RATE = 0.04
LENIENT = IngestConfig(max_quarantine_fraction=1.0, min_count=1)


@dataclass(frozen=True)
class Marked:
    file: str
    line: int
    sample_id: str
    kind: str


def synth_in_chunks(out: Path, **kwargs: object) -> synth.SynthSummary:
    """Generate the small defect-test data set in chunks of 16 contexts (about 10 chunks per
    split), so that line numbering and duplicate ids are exercised across chunks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, "CHUNK_CONTEXTS", 16)
        return synthesize_ali_ccp(out, *DEFECT_SIZES, **kwargs)


def read_manifest(path: Path) -> list[Marked]:
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == synth.DEFECTS_HEADER
    return [Marked(f, int(line), sample_id, kind) for f, line, sample_id, kind in rows[1:]]


def raw_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def test_defect_reasons_are_ingestions_reasons() -> None:
    """Every defect kind maps to a quarantine reason of tasks.ingest; all ten are covered."""
    reasons = {
        fmt.R_EMPTY,
        fmt.R_UTF8,
        fmt.R_COLUMNS,
        fmt.R_LABEL,
        fmt.R_CONV_NO_CLICK,
        fmt.R_FEATURE_NUM,
        fmt.R_ENTRY,
        fmt.R_UNKNOWN_KEY,
        fmt.R_DUP_KEY,
        fmt.R_DUP_SAMPLE,
    }
    assert set(DEFECT_REASONS.values()) == reasons
    assert DEFECT_KINDS == tuple(DEFECT_REASONS) and CRLF not in DEFECT_REASONS
    assert set(LINE_KINDS) == SKELETON_KINDS | COMMON_KINDS


@pytest.mark.parametrize("kind", [*LINE_KINDS, None], ids=[*LINE_KINDS, "all"])
def test_ingestion_quarantines_exactly_the_listed_lines(tmp_path: Path, kind: str | None) -> None:
    """Per kind (and all defect kinds at once), ingestion quarantines exactly the lines of
    defects.csv, at the listed line with the mapped reason; every valid impression (the
    ground truth) is ingested; CRLF lines are counted, not quarantined."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    summary = synth_in_chunks(
        raw, defect_rate=DEFECT_RATE, defects=None if kind is None else [kind]
    )
    marked = read_manifest(raw / DEFECTS_FILE)
    assert {m.kind for m in marked} == (set(DEFECT_KINDS) if kind is None else {kind})
    defects = [m for m in marked if m.kind != CRLF]
    assert Counter(m.kind for m in marked) == summary.defects
    assert len(defects) == sum(c.defective_lines for c in summary.counts.values())

    report = ingest.ingest_ali_ccp(raw, out, LENIENT)
    with (out / "quarantine.csv").open(newline="") as handle:
        quarantined = list(csv.DictReader(handle))
    assert sorted((q["file"], int(q["line"]), q["reason"]) for q in quarantined) == sorted(
        (m.file, m.line, DEFECT_REASONS[m.kind]) for m in defects
    )
    # The sample id (or key) listed is the one ingestion reads, where it can read one.
    listed = {(m.file, m.line): m for m in defects}
    for q in quarantined:
        m = listed[(q["file"], int(q["line"]))]
        if m.kind not in ("utf8", "separator"):
            assert q["sample_id"] == m.sample_id, m

    lines = {p.name: len(raw_lines(p)) for p in raw.glob("*_*_*.csv") if "ground" not in p.name}
    assert report.rows_read == sum(lines.values())
    assert report.rows_quarantined == len(defects)
    assert report.rows_written == report.rows_read - len(defects)
    crlf = Counter(m.file for m in marked if m.kind == CRLF)
    assert {Path(f.path).name: f.crlf_lines for f in report.files} == {
        name: crlf.get(name, 0) for name in lines
    }

    # The valid impressions, and only they, are ingested: those of the ground truth.
    for split, parts in (("train", ("train", "valid")), ("test", ("test",))):
        ingested = sorted(
            int(i)
            for part in parts
            for i in pq.read_table(out / part / "impressions.parquet", columns=[SAMPLE_ID_KEY])[
                SAMPLE_ID_KEY
            ].to_pylist()
        )
        truth = pacsv.read_csv(raw / f"ground_truth_{split}.csv")["sample_id"].to_pylist()
        assert ingested == sorted(truth)
        assert summary.counts[split].impressions == len(truth)
        assert summary.oracle[split]["impressions"] == len(truth)
    train_contexts = report.split_contexts["train"] + report.split_contexts["valid"]
    assert train_contexts == summary.counts["train"].contexts
    assert report.split_contexts["test"] == summary.counts["test"].contexts


def test_defects_leave_every_valid_line_as_it_was(tmp_path: Path) -> None:
    """Against the same data without defects: unlisted skeleton lines are unchanged (same
    line, same sample id), CRLF lines differ only by the \\r, listed common lines were added
    after the line they copy, and the ground truth lost exactly the defective impressions."""
    clean = synth_in_chunks(tmp_path / "clean")
    dirty = synth_in_chunks(tmp_path / "dirty", defect_rate=0.05, defects=LINE_KINDS)
    marked = read_manifest(tmp_path / "dirty" / DEFECTS_FILE)
    assert {m.kind for m in marked} == set(LINE_KINDS)
    for split in SPLITS:
        skeleton, common = skeleton_file(split), common_file(split)
        kind_at = {m.line: m.kind for m in marked if m.file == skeleton}
        before = raw_lines(tmp_path / "clean" / skeleton)
        after = raw_lines(tmp_path / "dirty" / skeleton)
        assert len(before) == len(after)
        for line, (old, new) in enumerate(zip(before, after, strict=True), start=1):
            if line not in kind_at:
                assert new == old
            elif kind_at[line] == CRLF:
                assert new == old + b"\r"
            else:
                assert new != old
        assert 0.02 < len(kind_at) / len(before) < 0.09  # the rate, give or take the noise

        added = {m.line for m in marked if m.file == common and m.kind != CRLF}
        assert added
        after = raw_lines(tmp_path / "dirty" / common)
        kept = [ln.rstrip(b"\r") for i, ln in enumerate(after, start=1) if i not in added]
        assert kept == raw_lines(tmp_path / "clean" / common)

        # Sample id k is on skeleton line k: the lost impressions are the listed lines.
        lost = {line for line, kind in kind_at.items() if kind != CRLF}
        truth = raw_lines(tmp_path / "clean" / synth.ground_truth_file(split))
        expected = [truth[0]] + [row for row in truth[1:] if int(row.split(b",")[0]) not in lost]
        assert raw_lines(tmp_path / "dirty" / synth.ground_truth_file(split)) == expected
        assert dirty.counts[split].impressions == clean.counts[split].impressions - len(lost)
        assert dirty.counts[split].contexts == clean.counts[split].contexts


def test_defects_are_deterministic(tmp_path: Path) -> None:
    """Same arguments, same bytes (defects.csv included); another seed, other defects."""
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        synthesize_ali_ccp(tmp_path / name, 1500, 500, seed, defect_rate=0.05)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    a, c = (read_manifest(tmp_path / name / DEFECTS_FILE) for name in "ac")
    assert a != c
    assert SKELETON_KINDS - {CRLF} <= {m.kind for m in a} <= set(DEFECT_KINDS)


def test_a_rerun_without_defects_removes_the_manifest(tmp_path: Path) -> None:
    """defects.csv exists only when defects were written into that folder by the last run."""
    summary = synthesize_ali_ccp(tmp_path, 1500, 500, 3, defect_rate=0.02, defects="empty,crlf")
    assert tmp_path / DEFECTS_FILE in summary.files
    assert {m.kind for m in read_manifest(tmp_path / DEFECTS_FILE)} <= {"empty", CRLF}
    summary = synthesize_ali_ccp(tmp_path, 1500, 500, 3)
    assert not (tmp_path / DEFECTS_FILE).exists() and summary.defects == {}
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in summary.files}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"defect_rate": -0.1}, "defect_rate"),
        ({"defect_rate": 1.5}, "defect_rate"),
        ({"defect_rate": "0.1"}, "defect_rate"),
        ({"defect_rate": 0.1, "defects": ["truncated", "nonsense"]}, "defects"),
        ({"defect_rate": 0.1, "defects": []}, "defects"),
        ({"profile": "huge"}, "profile"),
    ],
)
def test_invalid_defect_arguments_raise_naming_the_argument(
    tmp_path: Path, kwargs: dict[str, object], name: str
) -> None:
    """A rate outside [0, 1], an unknown kind or profile raise a ValueError, writing nothing."""
    with pytest.raises(ValueError, match=name):
        synthesize_ali_ccp(tmp_path, 100, 100, 1, **kwargs)
    assert not any(tmp_path.iterdir())


def test_cli_synth_takes_profile_and_defects(tmp_path: Path) -> None:
    """`esmm synth --profile realistic --defect-rate 0.02 --defects truncated,crlf` writes
    them; an unknown kind is an error with a message."""
    from flows.cli import app

    params = Path(__file__).resolve().parents[2] / "params.yaml"
    base = ["synth", "--params", str(params), "--train", "3000", "--test", "1000"]
    result = CliRunner().invoke(
        app,
        [*base, "--out", str(tmp_path / "a"), "--profile", "realistic"]
        + ["--defect-rate", "0.02", "--defects", "truncated,crlf"],
    )
    assert result.exit_code == 0, result.output
    assert "defects.csv" in result.output
    assert {m.kind for m in read_manifest(tmp_path / "a" / DEFECTS_FILE)} == {"truncated", CRLF}
    oracle = json.loads((tmp_path / "a" / "oracle.json").read_text())
    assert 90 <= oracle["train"]["contexts"] <= 160  # about 25 impressions each: realistic

    result = CliRunner().invoke(
        app, [*base, "--out", str(tmp_path / "b"), "--defect-rate", "0.1", "--defects", "oops"]
    )
    assert result.exit_code == 1 and "oops" in result.output
