"""Data made differently from our generator (benchmarks/foreign.py) goes through ingestion
and the committed validation gate with the default settings: the product is built for the
format, not for our generator."""

import json
from pathlib import Path

import pytest

from benchmarks.foreign import foreign_data
from tasks.config import IngestConfig, ValidateConfig
from tasks.ingest import ingest_ali_ccp
from tasks.validate import validate_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    raw = tmp_path_factory.mktemp("foreign") / "raw"
    oracle = foreign_data(raw, 20_000, 6_000, seed=3)
    return raw, oracle


def test_foreign_files_are_the_format_and_carry_an_oracle(foreign):
    raw, oracle = foreign
    assert json.loads((raw / "oracle.json").read_text()) == oracle
    assert oracle["test"]["impressions"] <= 6_000 < oracle["test"]["impressions"] + 200
    assert 0.5 < oracle["test"]["ctr_auc"] < 1 and oracle["train"]["conversions"] > 0
    line = (raw / "sample_skeleton_train.csv").read_text().split("\n", 1)[0]
    sample_id, click, conversion, key, count, features = line.split(",", 5)
    entries = features.split("\x01")
    assert int(count) == len(entries) and len(key) == 32
    field, rest = entries[0].split("\x02")
    feature_id, value = rest.split("\x03")
    assert int(feature_id) >= 10**8  # 9-10 digit ids, not our generator's ranges


def test_foreign_data_passes_ingestion_and_the_committed_gate(foreign, tmp_path):
    raw, oracle = foreign
    report = ingest_ali_ccp(raw, tmp_path / "ingest", IngestConfig())
    assert report.rows_quarantined == 0
    assert report.split_rows["test"] == oracle["test"]["impressions"]
    cfg = ValidateConfig(beam_options=["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    result = validate_data(tmp_path / "ingest", tmp_path / "validate", REPO / "schema", cfg)
    assert result.passed, result.anomalies
    assert any(c.kind == "skew" for c in result.comparisons)  # skew was measured


def test_foreign_data_is_a_function_of_its_seed(foreign, tmp_path):
    raw, _ = foreign
    again = tmp_path / "again"
    foreign_data(again, 20_000, 6_000, seed=3)
    for name in ("sample_skeleton_test.csv", "common_features_train.csv", "oracle.json"):
        assert (again / name).read_bytes() == (raw / name).read_bytes(), name
