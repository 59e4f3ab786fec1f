"""Tests of the synthetic Ali-CCP generator's output (the raw format, ids, contexts, crosses,
oracle, argument checks, recorded bytes), read back with an independent small parser.
Profiles and defects: test_synth_profiles.py, test_synth_defects.py."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from aliccp.format import RAW_SPLITS as SPLITS
from aliccp.synth import CRLF, CROSS_FIELDS, PROFILES, feature_id_ranges, synthesize_ali_ccp
from models.features import ALL_FIELDS, COMMON_FIELDS, SKELETON_FIELDS, WEIGHTED_FIELDS

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
