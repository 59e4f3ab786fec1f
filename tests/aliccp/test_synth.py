"""Tests of the synthetic Ali-CCP generator, read back with an independent small parser."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score
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
    CROSS_FIELDS,
    DEFECT_KINDS,
    DEFECT_REASONS,
    DEFECTS_FILE,
    LINE_KINDS,
    PROFILES,
    SKELETON_KINDS,
    feature_id_ranges,
    synthesize_ali_ccp,
)
from models.features import (
    ALL_FIELDS,
    COMMON_FIELDS,
    HISTORY_FIELDS,
    SAMPLE_ID_KEY,
    SKELETON_FIELDS,
    WEIGHTED_FIELDS,
)
from tasks.config import IngestConfig, SynthConfig

N_TRAIN, N_TEST, SEED = 3000, 1500, 2018
HEX_KEY = re.compile(r"[0-9a-f]{32}")
WEIGHT_TEXT = re.compile(r"\d+\.\d{1,5}")

Entry = tuple[str, int, str]  # (field, feature id, value text)


@dataclass(frozen=True)
class Impression:
    sample_id: int
    click: int
    conversion: int
    key: str
    entries: list[Entry]


def parse_feature_list(text: str, feature_num: str) -> list[Entry]:
    """Split `field\\x02id\\x03value` entries joined by \\x01, checking every piece."""
    entries = []
    for raw in text.split("\x01"):
        field, rest = raw.split("\x02")
        feature_id, value = rest.split("\x03")
        float(value)  # must parse
        entries.append((field, int(feature_id), value))
    assert int(feature_num) == len(entries)
    return entries


def read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    return data.decode().split("\n")[:-1]


def read_skeleton(path: Path) -> list[Impression]:
    impressions = []
    for line in read_lines(path):
        sample_id, click, conversion, key, feature_num, features = line.split(",")
        assert click in ("0", "1") and conversion in ("0", "1")
        assert HEX_KEY.fullmatch(key)
        impressions.append(
            Impression(
                int(sample_id),
                int(click),
                int(conversion),
                key,
                parse_feature_list(features, feature_num),
            )
        )
    return impressions


def read_common(path: Path) -> dict[str, list[Entry]]:
    contexts: dict[str, list[Entry]] = {}
    for line in read_lines(path):
        key, feature_num, features = line.split(",")
        assert HEX_KEY.fullmatch(key)
        assert key not in contexts
        contexts[key] = parse_feature_list(features, feature_num)
    return contexts


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize_ali_ccp(out, N_TRAIN, N_TEST, SEED)
    return out


@pytest.fixture(scope="module")
def parsed(data_dir: Path) -> dict[str, tuple[list[Impression], dict[str, list[Entry]]]]:
    return {
        split: (
            read_skeleton(data_dir / f"sample_skeleton_{split}.csv"),
            read_common(data_dir / f"common_features_{split}.csv"),
        )
        for split in SPLITS
    }


def file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    """Two runs with the same seed and sizes write the same bytes."""
    synthesize_ali_ccp(tmp_path / "a", 1500, 500, 7)
    synthesize_ali_ccp(tmp_path / "b", 1500, 500, 7)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")


def test_other_seed_gives_different_files(tmp_path: Path) -> None:
    """A different seed changes every data file."""
    synthesize_ali_ccp(tmp_path / "a", 1500, 500, 7)
    synthesize_ali_ccp(tmp_path / "b", 1500, 500, 8)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(a[name] != b[name] for name in a)


def test_summary_lists_the_expected_files(tmp_path: Path) -> None:
    """The summary names exactly the files written, and its counts match oracle.json."""
    summary = synthesize_ali_ccp(tmp_path, 1500, 500, 3)
    expected = {
        f"{stem}_{split}.csv"
        for split in SPLITS
        for stem in ("sample_skeleton", "common_features", "ground_truth")
    } | {"oracle.json"}
    assert {p.name for p in summary.files} == expected
    assert {p.name for p in tmp_path.iterdir()} == expected
    assert summary.counts["train"].impressions == 1500
    assert summary.counts["test"].impressions == 500
    oracle = json.loads((tmp_path / "oracle.json").read_text())
    for split in SPLITS:
        assert oracle[split]["clicks"] == summary.counts[split].clicks
        assert oracle[split]["contexts"] == summary.counts[split].contexts


def test_skeleton_lines_parse_with_consecutive_sample_ids(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Every skeleton line has 6 columns and a valid feature list; ids run 1..n per split."""
    for split, n in zip(SPLITS, (N_TRAIN, N_TEST), strict=True):
        impressions, _ = parsed[split]
        assert [imp.sample_id for imp in impressions] == list(range(1, n + 1))


def test_common_lines_parse(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Every common line has 3 columns, a 32-hex key and a valid, non-empty feature list."""
    for split in SPLITS:
        _, contexts = parsed[split]
        assert contexts and all(entries for entries in contexts.values())


def test_values_are_formatted_per_field_kind(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Plain fields carry 1.0; weighted fields a positive float with at most 5 decimals."""
    for impressions, contexts in parsed.values():
        lists = [imp.entries for imp in impressions] + list(contexts.values())
        for field, _, value in (entry for entries in lists for entry in entries):
            if field in WEIGHTED_FIELDS:
                assert WEIGHT_TEXT.fullmatch(value) and float(value) > 0, (field, value)
            else:
                assert value == "1.0", (field, value)


def test_all_23_fields_occur(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Each of the 23 Ali-CCP fields appears in the train files."""
    impressions, contexts = parsed["train"]
    seen = {field for imp in impressions for field, _, _ in imp.entries}
    seen |= {field for entries in contexts.values() for field, _, _ in entries}
    assert seen == set(ALL_FIELDS) and len(seen) == 23


def test_fields_stay_on_their_side(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Common fields only in common files, skeleton fields only in skeleton files."""
    for impressions, contexts in parsed.values():
        assert {f for imp in impressions for f, _, _ in imp.entries} <= set(SKELETON_FIELDS)
        assert {f for entries in contexts.values() for f, _, _ in entries} <= set(COMMON_FIELDS)


def test_feature_ids_are_unique_across_fields(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """A feature id belongs to one field only, inside that field's published range."""
    ranges = feature_id_ranges(N_TRAIN, SEED)
    field_of: dict[int, str] = {}
    for impressions, contexts in parsed.values():
        lists = [imp.entries for imp in impressions] + list(contexts.values())
        for field, feature_id, _ in (entry for entries in lists for entry in entries):
            assert field_of.setdefault(feature_id, field) == field
            assert feature_id in ranges[field]


def test_single_valued_fields_appear_at_most_once(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Item id and position are on every impression once; a user id on every context once."""
    for impressions, contexts in parsed.values():
        for imp in impressions:
            fields = [f for f, _, _ in imp.entries]
            assert fields.count("205") == 1 and fields.count("301") == 1
            assert fields.count("206") == 1 and fields.count("216") <= 1
        for entries in contexts.values():
            assert [f for f, _, _ in entries].count("101") == 1


def test_contexts_join_and_are_consecutive(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Skeleton keys exist in the split's common file, each key's impressions form one run."""
    for impressions, contexts in parsed.values():
        keys = [imp.key for imp in impressions]
        runs = [key for i, key in enumerate(keys) if i == 0 or key != keys[i - 1]]
        assert len(runs) == len(set(runs))
        assert set(runs) == set(contexts)


def test_contexts_vary_in_size_and_users_repeat(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """Contexts hold a variable number of impressions (mean 10-20); users have several."""
    impressions, contexts = parsed["train"]
    sizes = np.unique([imp.key for imp in impressions], return_counts=True)[1]
    assert 10 <= sizes.mean() <= 20 and sizes.min() < sizes.max()
    users = [next(i for f, i, _ in entries if f == "101") for entries in contexts.values()]
    assert len(set(users)) < len(users)


def test_train_and_test_contexts_are_disjoint(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """No common_feature_index is shared between train and test."""
    assert not set(parsed["train"][1]) & set(parsed["test"][1])


def test_no_conversion_without_click(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """A conversion is only ever recorded on a clicked impression."""
    for impressions, _ in parsed.values():
        assert all(imp.click == 1 for imp in impressions if imp.conversion == 1)


def test_crosses_appear_exactly_on_history_matches(
    parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]],
) -> None:
    """A cross entry appears iff the context's history holds the item's entity, with its weight.

    Uses the published id layout: entity k of a kind has id `ranges[field].start + k` in
    every field naming that kind (e.g. 508, 206 and 109_14 for categories).
    """
    ranges = feature_id_ranges(N_TRAIN, SEED)
    crosses_seen = 0
    for impressions, contexts in parsed.values():
        for imp in impressions:
            history = contexts[imp.key]
            for cross, (history_field, item_field) in CROSS_FIELDS.items():
                item_entities = {
                    i - ranges[item_field].start for f, i, _ in imp.entries if f == item_field
                }
                weight_of = {
                    i - ranges[history_field].start: v for f, i, v in history if f == history_field
                }
                written = {i - ranges[cross].start: v for f, i, v in imp.entries if f == cross}
                expected = {k: weight_of[k] for k in item_entities if k in weight_of}
                assert written == expected, (imp.sample_id, cross)
                crosses_seen += len(written)
    assert crosses_seen > 0


def test_oracle_matches_aucs_recomputed_from_files(
    data_dir: Path, parsed: dict[str, tuple[list[Impression], dict[str, list[Entry]]]]
) -> None:
    """oracle.json holds the AUCs of ground_truth_test.csv against the skeleton's labels."""
    text = (data_dir / "oracle.json").read_text()
    oracle = json.loads(text)
    assert text == json.dumps(oracle, sort_keys=True, indent=2) + "\n"

    lines = read_lines(data_dir / "ground_truth_test.csv")
    assert lines[0] == "sample_id,p_ctr,p_cvr"
    rows = [line.split(",") for line in lines[1:]]
    impressions, contexts = parsed["test"]
    assert [int(r[0]) for r in rows] == [imp.sample_id for imp in impressions]
    p_ctr = np.array([float(r[1]) for r in rows])
    p_cvr = np.array([float(r[2]) for r in rows])
    click = np.array([imp.click for imp in impressions])
    conversion = np.array([imp.conversion for imp in impressions])
    clicked = click == 1

    test = oracle["test"]
    assert test["ctr_auc"] == pytest.approx(roc_auc_score(click, p_ctr), abs=1e-12)
    assert test["ctcvr_auc"] == pytest.approx(
        roc_auc_score(click * conversion, p_ctr * p_cvr), abs=1e-12
    )
    assert test["cvr_auc_clicked"] == pytest.approx(
        roc_auc_score(conversion[clicked], p_cvr[clicked]), abs=1e-12
    )
    assert (test["impressions"], test["clicks"], test["conversions"], test["contexts"]) == (
        len(impressions),
        int(click.sum()),
        int(conversion.sum()),
        len(contexts),
    )


def test_rates_are_plausible_on_a_medium_size(tmp_path: Path) -> None:
    """On 20k impressions CTR and conversion-given-click sit near the default profile's targets."""
    profile = PROFILES["default"]
    summary = synthesize_ali_ccp(tmp_path, 20_000, 5_000, 5)
    counts = summary.counts["train"]
    ctr = counts.clicks / counts.impressions
    cvr = counts.conversions / counts.clicks
    assert 0.05 <= ctr <= 0.10 and abs(ctr - profile.ctr) < 0.015
    assert 0.08 <= cvr <= 0.18 and abs(cvr - profile.cvr) < 0.04
    assert 0.6 < summary.oracle["train"]["ctr_auc"] < 0.9


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_train": 0, "n_test": 10, "seed": 1}, "n_train"),
        ({"n_train": 10, "n_test": -5, "seed": 1}, "n_test"),
        ({"n_train": 10, "n_test": 10, "seed": -1}, "seed"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(
    tmp_path: Path, kwargs: dict[str, int], name: str
) -> None:
    """Non-positive sizes (and a negative seed) raise a ValueError naming the argument."""
    with pytest.raises(ValueError, match=name):
        synthesize_ali_ccp(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


# --- byte-identity of the default output ------------------------------------------------

# md5 of every file of synthesize_ali_ccp(out, 1500, 500, 7), recorded before the realistic
# profile and defect injection were added; the default output must never change (data.dvc).
TINY_MD5 = {
    "common_features_test.csv": "a869510d881be4ff0bcdf98bb5b93a8c",
    "common_features_train.csv": "d6ddd08eff6a16a8b7561e8e19387013",
    "ground_truth_test.csv": "1e36b0d123c3ba86c512824229954131",
    "ground_truth_train.csv": "43cdecadcbaeda5da81bb245b9fc4d9b",
    "oracle.json": "920abe068d4472fd05880aafcaa3fb93",
    "sample_skeleton_test.csv": "ba0c42517b575a4cff80efa341cfcf4a",
    "sample_skeleton_train.csv": "ff89a04b58bad4f1027418263e132b84",
}


def file_md5(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_default_output_matches_the_recorded_md5(tmp_path: Path) -> None:
    """The default profile without defects (rate 0, whatever kinds) writes the recorded bytes."""
    synthesize_ali_ccp(tmp_path / "a", 1500, 500, 7)
    synthesize_ali_ccp(
        tmp_path / "b", 1500, 500, 7, profile="default", defect_rate=0.0, defects=["empty", CRLF]
    )
    assert file_md5(tmp_path / "a") == TINY_MD5
    assert file_md5(tmp_path / "b") == TINY_MD5


# --- the realistic profile --------------------------------------------------------------

REALISTIC_TRAIN, REALISTIC_TEST, REALISTIC_SEED = 200_000, 40_000, 11


@pytest.fixture(scope="module")
def realistic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, synth.SynthSummary]:
    out = tmp_path_factory.mktemp("realistic")
    summary = synthesize_ali_ccp(
        out, REALISTIC_TRAIN, REALISTIC_TEST, REALISTIC_SEED, profile="realistic"
    )
    return out, summary


def test_realistic_rates_are_those_of_ali_ccp(realistic: tuple[Path, synth.SynthSummary]) -> None:
    """About 4% CTR and 0.5% conversion given click: exactly in expectation (the true
    probabilities), within sampling noise in the drawn labels (about 50 conversions)."""
    out, summary = realistic
    profile = PROFILES["realistic"]
    assert (profile.ctr, profile.cvr) == (0.04, 0.005)
    truth = pacsv.read_csv(out / "ground_truth_train.csv")
    p_ctr, p_cvr = truth["p_ctr"].to_numpy(), truth["p_cvr"].to_numpy()
    assert p_ctr.mean() == pytest.approx(0.04, rel=0.1)
    assert (p_ctr * p_cvr).sum() / p_ctr.sum() == pytest.approx(0.005, rel=0.2)

    impressions = sum(c.impressions for c in summary.counts.values())
    clicks = sum(c.clicks for c in summary.counts.values())
    conversions = sum(c.conversions for c in summary.counts.values())
    assert impressions == REALISTIC_TRAIN + REALISTIC_TEST
    assert 0.035 <= clicks / impressions <= 0.045
    assert 0.0025 <= conversions / clicks <= 0.0085
    assert 0.65 < summary.oracle["train"]["ctr_auc"] < 0.9


def test_realistic_behaviour_lists_are_long(realistic: tuple[Path, synth.SynthSummary]) -> None:
    """Contexts hold hundreds of behaviour entries: 109_14 median >= 100 (half of them 100+),
    110_14 median >= 250 (a quarter 300+), 127_14 and 150_14 median >= 100."""
    out, _ = realistic
    lengths: dict[str, list[int]] = {field: [] for field in HISTORY_FIELDS}
    for line in read_lines(out / "common_features_test.csv"):
        features = "\x01" + line.split(",")[2]
        for field in lengths:
            lengths[field].append(features.count(f"\x01{field}\x02"))
    length = {field: np.array(values) for field, values in lengths.items()}
    assert np.median(length["109_14"]) >= 100 and (length["109_14"] >= 100).mean() >= 0.5
    assert np.median(length["110_14"]) >= 250 and (length["110_14"] >= 300).mean() >= 0.25
    assert np.median(length["127_14"]) >= 100 and np.median(length["150_14"]) >= 100
    assert all(values.min() < values.max() for values in length.values())  # they vary


def test_realistic_contexts_hold_about_25_impressions(
    realistic: tuple[Path, synth.SynthSummary],
) -> None:
    """About 25 impressions per common_feature_index, varying between contexts."""
    _, summary = realistic
    for split, n in zip(SPLITS, (REALISTIC_TRAIN, REALISTIC_TEST), strict=True):
        assert 23 <= n / summary.counts[split].contexts <= 27


def test_realistic_item_popularity_is_long_tailed(
    realistic: tuple[Path, synth.SynthSummary],
) -> None:
    """The top 1% of the items shown draw over 8% of the impressions and the top 10% over
    45%, while over 10% of the items are shown once."""
    out, _ = realistic
    text = (out / "sample_skeleton_train.csv").read_text()
    items = Counter(re.findall(r"[,\x01]205\x02(\d+)", text))
    counts = np.sort(np.array(list(items.values())))[::-1]
    assert counts.sum() == REALISTIC_TRAIN
    assert counts[: len(counts) // 100].sum() / REALISTIC_TRAIN > 0.08
    assert counts[: len(counts) // 10].sum() / REALISTIC_TRAIN > 0.45
    assert (counts == 1).mean() > 0.1


def test_realistic_world_scales_with_the_train_size() -> None:
    """Users, items, shops and brands grow with n_train (about 210 and 20 impressions per
    user and item, as in the paper's Table 1); categories grow up to 8000."""
    sizes = {n: feature_id_ranges(n, 1, "realistic") for n in (100_000, 1_000_000, 10_000_000)}
    for n, ranges in sizes.items():
        assert len(ranges["101"]) == n // 210
        assert len(ranges["205"]) == n // 20
        assert len(ranges["206"]) == len(ranges["109_14"]) == len(ranges["508"])
    assert [len(r["206"]) for r in sizes.values()] == [600, 800, 8000]
    assert len(sizes[10_000_000]["207"]) == 250_000 and len(sizes[10_000_000]["216"]) == 125_000


def test_synth_config_accepts_both_profiles() -> None:
    """params.yaml may name either profile; the names are those of PROFILES."""
    assert set(PROFILES) == {"default", "realistic"}
    for name in PROFILES:
        assert SynthConfig(profile=name).profile == name


# --- defect injection -------------------------------------------------------------------

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
