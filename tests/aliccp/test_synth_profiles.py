"""Tests of the generator's profiles (aliccp.synth.profiles): the realistic profile's rates,
behaviour lists, context sizes, item popularity and world sizes."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest

import aliccp.synth as synth
from aliccp.format import RAW_SPLITS as SPLITS
from aliccp.synth import PROFILES, feature_id_ranges, synthesize_ali_ccp
from models.features import HISTORY_FIELDS
from tasks.config import SynthConfig


def read_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"\r" not in data
    return data.decode().split("\n")[:-1]


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
