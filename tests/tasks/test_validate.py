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


def test_multi_process_statistics_equal_single_process(tmp_path, ingested):
    """The same data profiled by one in-memory process and by two Beam worker processes
    gives the same statistics (up to float summation order)."""
    from tasks.validate import generate_statistics

    tables = {"train_impressions": ingested / "train" / "impressions.parquet"}
    runs = {}
    for mode, workers in (("in_memory", 1), ("multi_processing", 2)):
        cfg = ValidateConfig(
            beam_options=[f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]
        )
        (tmp_path / mode).mkdir()
        runs[mode] = generate_statistics(tables, tmp_path / mode, cfg)[
            "train_impressions"
        ].datasets[0]
    one, two = runs["in_memory"], runs["multi_processing"]
    assert one.num_examples == two.num_examples > 0
    features_one = {f.path.step[0]: f for f in one.features}
    features_two = {f.path.step[0]: f for f in two.features}
    assert set(features_one) == set(features_two)
    for name, a in features_one.items():
        b = features_two[name]
        assert a.type == b.type, name
        sa, sb = a.num_stats, b.num_stats
        assert sa.common_stats.num_non_missing == sb.common_stats.num_non_missing, name
        assert sa.common_stats.tot_num_values == sb.common_stats.tot_num_values, name
        assert (sa.min, sa.max, sa.num_zeros) == (sb.min, sb.max, sb.num_zeros), name
        assert sa.mean == pytest.approx(sb.mean, rel=1e-9), name
        assert sa.std_dev == pytest.approx(sb.std_dev, rel=1e-6), name


def test_serving_records_without_labels_validate_in_the_serving_environment(tmp_path, ingested):
    """Records as a serving request sends them (no click/conversion) pass the SERVING
    environment of the schema; the TRAINING environment would require the labels."""
    import tensorflow_data_validation as tfdv

    from tasks.validate import SERVING, TRAINING, validate_records

    validate_data(ingested, tmp_path / "first", tmp_path / "schema", ValidateConfig())
    schema_path = tmp_path / "schema" / "impressions.pbtxt"
    schema = tfdv.load_schema_text(str(schema_path))
    assert list(schema.default_environment) == [TRAINING, SERVING]
    records = pq.read_table(ingested / "test" / "impressions.parquet").drop(["click", "conversion"])
    assert validate_records(records, schema_path, ValidateConfig()) == []

    # The same records are missing their labels as far as training is concerned.
    anomalies = validate_records(records, schema_path, ValidateConfig(), environment=TRAINING)
    assert any("'click'" in a for a in anomalies) and any("'conversion'" in a for a in anomalies)


def test_schema_diff_shows_a_deliberate_change(tmp_path, ingested):
    from tasks.validate import propose_schemas, schema_diff

    proposed = propose_schemas(ingested, tmp_path / "proposed", ValidateConfig())
    schema_dir = tmp_path / "schema"
    schema_dir.mkdir()
    for table, text in proposed.items():
        (schema_dir / f"{table}.pbtxt").write_text(text)
    assert schema_diff(schema_dir, proposed) == ""
    (schema_dir / "impressions.pbtxt").write_text(
        proposed["impressions"].replace('"SERVING"', '"LIVE"')
    )
    diff = schema_diff(schema_dir, proposed)
    assert '-  not_in_environment: "LIVE"' in diff and '+  not_in_environment: "SERVING"' in diff
