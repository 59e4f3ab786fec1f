"""The TFDV gate: clean data passes, anomalies stop it with the feature named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tasks.config import IngestConfig, ValidateConfig
from tasks.ingest import ingest_ali_ccp
from tasks.validate import DataValidationError, validate_data


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, small_raw):
    out = tmp_path_factory.mktemp("ingest")
    ingest_ali_ccp(small_raw, out, IngestConfig(valid_fraction=0.2, min_count=1))
    return out


def test_clean_data_passes_and_a_schema_is_proposed(tmp_path, ingested):
    result = validate_data(ingested, tmp_path / "out", tmp_path / "schema", ValidateConfig())
    assert result.passed and not result.anomalies
    assert result.num_examples["train/impressions"] > 0 and result.num_examples["test/common"] > 0
    assert (tmp_path / "schema" / "impressions.pbtxt").is_file()
    assert (tmp_path / "out" / "train_impressions.stats.binpb").is_file()


def test_label_outside_domain_is_named(tmp_path, ingested):
    """A click label of 2 in the test split is an anomaly on feature 'click'."""
    validate_data(ingested, tmp_path / "first", tmp_path / "schema", ValidateConfig())
    corrupt = tmp_path / "ingest"
    for split in ("train", "valid", "test"):
        (corrupt / split).mkdir(parents=True)
        for name in ("impressions.parquet", "common.parquet"):
            table = pq.read_table(ingested / split / name)
            if split == "test" and name == "impressions.parquet":
                click = pc.add(table["click"], pa.scalar(2, pa.int8()))
                table = table.set_column(table.schema.get_field_index("click"), "click", click)
            pq.write_table(table, corrupt / split / name)
    with pytest.raises(DataValidationError, match=r"test/impressions: feature 'click'"):
        validate_data(corrupt, tmp_path / "out", tmp_path / "schema", ValidateConfig())
