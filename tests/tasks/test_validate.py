"""The TFDV gate: clean data passes; each injected defect is an anomaly naming the feature and
the reason; drift and skew are measured against thresholds; the reports are readable offline."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tasks.config import DriftConfig, IngestConfig, ValidateConfig
from tasks.ingest import ingest_ali_ccp
from tasks.validate import DataValidationError, validate_data

REPO = Path(__file__).resolve().parents[2]
# One in-memory process (fast on tiny data); drift and skew measured even on a few hundred
# rows, with thresholds above the sampling noise of this data.
LOOSE = DriftConfig(jensen_shannon=0.5, infinity_norm=0.3, min_examples=50)
CFG = ValidateConfig(
    beam_options=["--direct_running_mode=in_memory", "--direct_num_workers=1"],
    drift=LOOSE,
    skew=LOOSE,
)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, small_raw):
    out = tmp_path_factory.mktemp("ingest")
    ingest_ali_ccp(small_raw, out, IngestConfig(valid_fraction=0.2, min_count=1))
    return out


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory, ingested):
    """Schemas proposed from the clean training split (validation writes them when absent)."""
    folder = tmp_path_factory.mktemp("schema")
    validate_data(ingested, tmp_path_factory.mktemp("first"), folder, CFG)
    return folder


def _copy_with(ingested: Path, dest: Path, split: str, name: str, change) -> Path:
    """A copy of the ingested folder with one table of one split changed by `change`."""
    shutil.copytree(ingested, dest)
    path = dest / split / f"{name}.parquet"
    pq.write_table(change(pq.read_table(path)), path)
    return dest


def _replace(table: pa.Table, name: str, column) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def _anomalies(ingest_dir: Path, tmp_path: Path, schema_dir: Path, **kwargs) -> str:
    with pytest.raises(DataValidationError) as err:
        validate_data(ingest_dir, tmp_path / "out", schema_dir, CFG, **kwargs)
    return str(err.value)


def test_clean_data_passes_the_committed_schema(tmp_path, ingested):
    """Generated data passes the schemas committed in schema/, and every report is written."""
    result = validate_data(ingested, tmp_path / "out", REPO / "schema", CFG)
    assert result.passed and not result.anomalies
    assert result.num_examples["train/impressions"] > 0 and result.num_examples["test/common"] > 0
    assert {c.kind for c in result.comparisons} == {"skew"}  # no earlier version: no drift
    for name in ("train_impressions.stats.binpb", "report.json", "report.txt", "report.html"):
        assert (tmp_path / "out" / name).is_file()


def test_format_typical_data_passes_the_committed_schema(tmp_path, ingested):
    """What the format allows but the small generated data lacks passes, in every split:
    behaviour lists of hundreds of entries, a cross field that rarely matches, and 97
    profile categories (field 121 of the real Ali-CCP)."""

    def longer_lists(t):
        for field in ("109_14", "110_14"):
            n = 600
            ids = t[f"ids_{field}"].to_pylist()
            wts = t[f"wts_{field}"].to_pylist()
            ids = [list(range(1, n + 1)) if i % 3 == 0 else v for i, v in enumerate(ids)]
            wts = [[1.0] * n if i % 3 == 0 else v for i, v in enumerate(wts)]
            t = _replace(t, f"ids_{field}", pa.array(ids, pa.list_(pa.int64())))
            t = _replace(t, f"wts_{field}", pa.array(wts, pa.list_(pa.float32())))
        profile = [[9_000 + i % 97] for i in range(t.num_rows)]
        return _replace(t, "ids_121", pa.array(profile, pa.list_(pa.int64())))

    def rare_matches(t):  # field 509 on 2% of impressions
        for name in ("ids_509", "wts_509"):
            values = [v if i % 50 == 0 else [] for i, v in enumerate(t[name].to_pylist())]
            t = _replace(t, name, pa.array(values, t.schema.field(name).type))
        return t

    def some_profiles_unknown(t):  # 126 absent for 40% of the users, as in the real data
        for name in ("ids_126", "wts_126"):
            values = [[] if i % 5 < 2 else v for i, v in enumerate(t[name].to_pylist())]
            t = _replace(t, name, pa.array(values, t.schema.field(name).type))
        return t

    data = tmp_path / "ingest"
    shutil.copytree(ingested, data)
    for split in ("train", "valid", "test"):
        for name, change in (
            ("common", lambda t: some_profiles_unknown(longer_lists(t))),
            ("impressions", rare_matches),
        ):
            path = data / split / f"{name}.parquet"
            pq.write_table(change(pq.read_table(path)), path)
    result = validate_data(data, tmp_path / "out", REPO / "schema", CFG)
    assert result.passed, result.anomalies


def test_absent_schema_is_proposed_with_curated_constraints(schema_dir):
    """The proposal carries environments, label domains, presence, value counts and domains
    for low-cardinality id fields only."""
    import tensorflow_data_validation as tfdv

    schema = tfdv.load_schema_text(str(schema_dir / "common.pbtxt"))
    features = {f.name: f for f in schema.feature}
    assert list(schema.default_environment) == ["TRAINING", "SERVING"]
    assert features["ids_124"].unique_constraints.max == 1000  # 2 values seen: the floor
    assert not features["ids_124"].HasField("string_domain")  # value_domains is off
    assert features["ids_109_14"].value_count.min == 1
    assert not features["ids_109_14"].value_count.HasField("max")  # lists of any length
    assert features["ids_121"].value_count.max == 1  # single-valued
    assert 0 < features["ids_109_14"].presence.min_fraction <= 0.8
    labels = {
        f.name: f for f in tfdv.load_schema_text(str(schema_dir / "impressions.pbtxt")).feature
    }
    assert labels["ids_508"].presence.min_fraction == 0  # crosses: only where history matches
    assert features["ids_126"].presence.min_fraction == 0  # profile fields: optional
    assert features["ids_126"].presence.min_count == 1  # ... but not gone
    assert labels["ids_206"].presence.min_fraction > 0.5
    assert not labels["ids_205"].HasField("unique_constraints")  # item ids: thousands
    for key in ("click", "conversion", "clicked_conversion"):
        assert (labels[key].int_domain.min, labels[key].int_domain.max) == (0, 1)
        assert list(labels[key].not_in_environment) == ["SERVING"]


def test_no_jensen_shannon_where_it_would_measure_noise(tmp_path, ingested):
    """Shop-history ids drawn from one flat distribution of 20,000 shops in every split: with
    a few ids per context, most are seen once, and TFDV keeps 1000 ids per feature, so its
    Jensen-Shannon divergence there would be sampling noise (about 0.96 here). It is not
    measured (and the report says so); L-infinity is."""
    rng = np.random.default_rng(0)

    def many_shops(t):
        lengths = rng.integers(1, 6, t.num_rows)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(rng.integers(1, 20_001, lengths.sum())))
        wts = pa.ListArray.from_arrays(offsets, pa.array(np.ones(lengths.sum(), np.float32)))
        return _replace(_replace(t, "ids_110_14", ids), "wts_110_14", wts)

    data = tmp_path / "ingest"
    shutil.copytree(ingested, data)
    for split in ("train", "valid", "test"):
        path = data / split / "common.parquet"
        pq.write_table(many_shops(pq.read_table(path)), path)
    result = validate_data(data, tmp_path / "out", REPO / "schema", CFG)
    measured = {(c.feature, c.measure) for c in result.comparisons}
    assert ("ids_110_14", "infinity_norm") in measured
    assert ("ids_110_14", "jensen_shannon") not in measured
    assert ("ids_121", "jensen_shannon") in measured  # a complete histogram: measured
    assert any(
        re.search(r"skew common: Jensen-Shannon not measured .*ids_110_14 \([\d,]+ ids", n)
        for n in result.notes
    )
    assert not [a for a in result.anomalies if "110_14" in a]


def test_missing_field_is_named(tmp_path, ingested, schema_dir):
    data = _copy_with(
        ingested,
        tmp_path / "ingest",
        "test",
        "impressions",
        lambda t: t.drop(["ids_205", "wts_205"]),
    )
    message = _anomalies(data, tmp_path, schema_dir)
    assert re.search(r"test/impressions: feature 'ids_205': Column dropped", message)


def test_label_outside_domain_is_named(tmp_path, ingested, schema_dir):
    """A click label of 2 in the test split is an anomaly on feature 'click'."""
    data = _copy_with(
        ingested,
        tmp_path / "ingest",
        "test",
        "impressions",
        lambda t: _replace(t, "click", pc.add(t["click"], pa.scalar(2, pa.int8()))),
    )
    message = _anomalies(data, tmp_path, schema_dir)
    assert (
        "test/impressions: feature 'click': label outside {0, 1}: values range from 2 to 3"
        in message
    )
    assert "test/impressions: feature 'click': Out-of-range values" in message


def test_conversion_without_click_is_named(tmp_path, ingested, schema_dir):
    def convert_unclicked(t):
        no_click = t["click"].to_numpy() == 0
        conversion = t["conversion"].to_numpy().copy()
        conversion[np.flatnonzero(no_click)[:7]] = 1
        return _replace(t, "conversion", pa.array(conversion, pa.int8()))

    data = _copy_with(ingested, tmp_path / "ingest", "train", "impressions", convert_unclicked)
    message = _anomalies(data, tmp_path, schema_dir)
    assert (
        "train/impressions: feature 'conversion': conversion without click: "
        "7 rows have conversion=1 and click=0" in message
    )


def test_new_ids_in_a_low_cardinality_field_are_named(tmp_path, ingested, schema_dir):
    """Every impression of the test split gets a position id never seen in training."""

    def explode(t):
        assert t.num_rows > 1000  # the bound's floor
        ids = [[990_000_000 + i] for i in range(t.num_rows)]
        return _replace(t, "ids_301", pa.array(ids, pa.list_(pa.int64())))

    data = _copy_with(ingested, tmp_path / "ingest", "test", "impressions", explode)
    message = _anomalies(data, tmp_path, schema_dir)
    assert re.search(
        r"test/impressions: feature 'ids_301': High number of unique values: Expected no more "
        r"than \d+ unique values but found \d+",
        message,
    )


def test_value_domains_list_the_training_ids(ingested, tmp_path):
    """With validate.value_domains a low-cardinality field also gets its ids as a domain."""
    import tensorflow_data_validation as tfdv

    from tasks.validate_schema import infer_schema
    from tasks.validate_stats import generate_statistics

    stats = generate_statistics(
        {"train_common": ingested / "train" / "common.parquet"}, tmp_path, CFG
    )["train_common"]
    schema = infer_schema(stats, value_domains=True)
    domain = tfdv.get_domain(schema, "ids_124").value
    seen = pc.unique(
        pc.list_flatten(pq.read_table(ingested / "train" / "common.parquet")["ids_124"])
    )
    assert sorted(domain) == sorted(str(v) for v in seen.to_pylist())


def test_empty_behaviour_lists_are_named(tmp_path, ingested, schema_dir):
    """Emptying the 109_14 behaviour list of most contexts breaks its presence requirement."""

    def empty(t):
        keep = [i % 4 == 0 for i in range(t.num_rows)]
        for col in ("ids_109_14", "wts_109_14"):
            values = [v if k else [] for v, k in zip(t[col].to_pylist(), keep, strict=True)]
            t = _replace(t, col, pa.array(values, t.schema.field(col).type))
        return t

    data = _copy_with(ingested, tmp_path / "ingest", "test", "common", empty)
    message = _anomalies(data, tmp_path, schema_dir)
    assert re.search(
        r"test/common: feature 'ids_109_14': Column dropped: The feature was present in fewer "
        r"examples than expected: minimum fraction = 0\.\d+, actual = 0\.2",
        message,
    )


def _second_version(tmp_path, ingested, schema_dir, change) -> str:
    """Validate clean data as version v1, then changed training data as v2."""
    history = tmp_path / "history"
    validate_data(ingested, tmp_path / "v1", schema_dir, CFG, "v1", history)
    data = _copy_with(ingested, tmp_path / "ingest", "train", "impressions", change)
    return _anomalies(data, tmp_path, schema_dir, data_version="v2", history_dir=history)


def test_shifted_feature_distribution_is_drift(tmp_path, ingested, schema_dir):
    """Every impression of the new version moves to the first ad position seen in training."""
    message = _second_version(
        tmp_path,
        ingested,
        schema_dir,
        lambda t: _replace(
            t,
            "ids_301",
            pa.array([[t["ids_301"][0].as_py()[0]]] * t.num_rows, pa.list_(pa.int64())),
        ),
    )
    assert re.search(
        r"drift train/impressions vs v1: feature 'ids_301': High Linfty distance", message
    )
    assert "feature 'click'" not in message


def test_shifted_click_rate_is_label_drift(tmp_path, ingested, schema_dir):
    """Marking a fifth of the unclicked impressions as clicked raises the CTR by far more
    than the allowed 20%."""

    def more_clicks(t):
        click = t["click"].to_numpy().copy()
        unclicked = np.flatnonzero(click == 0)
        click[unclicked[::5]] = 1
        return _replace(t, "click", pa.array(click, pa.int8()))

    message = _second_version(tmp_path, ingested, schema_dir, more_clicks)
    assert re.search(
        r"drift train/impressions: feature 'click': click rate \(CTR\) changed by \+\d+", message
    )


@pytest.mark.slow  # two validation runs: about 35 s on 2 shared cores
def test_history_keeps_each_version_and_drift_uses_the_latest_other(tmp_path, ingested, schema_dir):
    from tasks.validate import previous_version

    history = tmp_path / "history"
    first = validate_data(ingested, tmp_path / "a", schema_dir, CFG, "v1", history)
    assert first.previous_version is None
    assert any("drift not checked" in n for n in first.notes)
    second = validate_data(ingested, tmp_path / "b", schema_dir, CFG, "v2", history)
    assert second.previous_version == "v1" and second.passed
    assert {c.kind for c in second.comparisons} == {"drift", "skew"}
    assert "previous" in second.label_rates
    assert (history / "v1" / "train_common.stats.binpb").is_file()
    # Re-running v1 compares it with v2, the most recent other version.
    assert previous_version(history, "v1") == "v2"


def test_comparisons_need_enough_rows(tmp_path, ingested, schema_dir):
    """Below min_examples drift and skew are not measured, and the report says so."""
    cfg = CFG.model_copy(update={"skew": DriftConfig(min_examples=10**9)})
    result = validate_data(ingested, tmp_path / "out", schema_dir, cfg)
    assert not [c for c in result.comparisons if c.kind == "skew"]
    assert any("validate.skew.min_examples" in n for n in result.notes)


def test_per_feature_thresholds():
    cfg = DriftConfig.model_validate(
        {"features": {"ids_101": {"jensen_shannon": None}, "ids_301": {"infinity_norm": 0.05}}}
    )
    assert cfg.thresholds("ids_101") == (None, 0.1)
    assert cfg.thresholds("ids_301") == (0.1, 0.05)
    assert cfg.thresholds("ids_205") == (0.1, 0.1)


def test_unknown_feature_in_thresholds_is_an_error(tmp_path, ingested, schema_dir):
    cfg = CFG.model_copy(
        update={
            "skew": DriftConfig.model_validate({"min_examples": 1, "features": {"ids_999": {}}})
        }
    )
    with pytest.raises(
        ValueError, match=r"validate.skew.features: unknown feature\(s\) \['ids_999'\]"
    ):
        validate_data(ingested, tmp_path / "out", schema_dir, cfg)


def test_reports_are_self_contained(tmp_path, ingested, schema_dir):
    """The HTML page loads nothing from elsewhere; text and HTML name the anomalies."""
    data = _copy_with(
        ingested,
        tmp_path / "ingest",
        "valid",
        "impressions",
        lambda t: t.drop(["ids_206", "wts_206"]),
    )
    _anomalies(data, tmp_path, schema_dir)
    page = (tmp_path / "out" / "report.html").read_text()
    text = (tmp_path / "out" / "report.txt").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert page.count("data:image/png;base64,") >= 3
    assert "valid/impressions: feature &#x27;ids_206&#x27;: Column dropped" in page
    assert "FAILED" in text and "valid/impressions: feature 'ids_206'" in text
    assert "Statistics train/common" in text


@pytest.mark.slow  # two Beam worker processes start up: about 45 s on 2 shared cores
def test_multi_process_statistics_equal_single_process(tmp_path, ingested):
    """The same data profiled by one in-memory process and by two Beam worker processes
    gives the same statistics (up to float summation order)."""
    from tasks.validate_stats import generate_statistics

    tables = {
        "train_impressions": ingested / "train" / "impressions.parquet",
        "train_common": ingested / "train" / "common.parquet",
    }
    runs = {}
    for mode, workers in (("in_memory", 1), ("multi_processing", 2)):
        cfg = ValidateConfig(
            beam_options=[f"--direct_num_workers={workers}", f"--direct_running_mode={mode}"]
        )
        runs[mode] = generate_statistics(tables, tmp_path / mode, cfg)
    for table in tables:
        one, two = runs["in_memory"][table].datasets[0], runs["multi_processing"][table].datasets[0]
        assert one.num_examples == two.num_examples > 0
        features_one = {f.path.step[0]: f for f in one.features}
        features_two = {f.path.step[0]: f for f in two.features}
        assert set(features_one) == set(features_two)
        for name, a in features_one.items():
            b = features_two[name]
            assert a.type == b.type, name
            if a.HasField("string_stats"):  # ids: counts, distinct values, most frequent
                sa, sb = a.string_stats, b.string_stats
                assert sa.common_stats == sb.common_stats, name
                assert sa.unique == sb.unique, name
                assert sa.top_values[:3] == sb.top_values[:3], name
                continue
            sa, sb = a.num_stats, b.num_stats
            assert sa.common_stats.num_non_missing == sb.common_stats.num_non_missing, name
            assert sa.common_stats.tot_num_values == sb.common_stats.tot_num_values, name
            assert (sa.min, sa.max, sa.num_zeros) == (sb.min, sb.max, sb.num_zeros), name
            assert sa.mean == pytest.approx(sb.mean, rel=1e-9), name
            assert sa.std_dev == pytest.approx(sb.std_dev, rel=1e-6), name


def test_serving_records_without_labels_validate_in_the_serving_environment(
    tmp_path, ingested, schema_dir
):
    """Records as a serving request sends them (no click/conversion) pass the SERVING
    environment of the schema; the TRAINING environment would require the labels."""
    from tasks.validate import validate_records
    from tasks.validate_schema import TRAINING

    schema_path = schema_dir / "impressions.pbtxt"
    records = pq.read_table(ingested / "test" / "impressions.parquet").drop(["click", "conversion"])
    assert validate_records(records, schema_path, CFG) == []

    # The same records are missing their labels as far as training is concerned.
    anomalies = validate_records(records, schema_path, CFG, environment=TRAINING)
    assert any("'click'" in a for a in anomalies) and any("'conversion'" in a for a in anomalies)


def test_schema_diff_shows_a_deliberate_change(tmp_path, ingested):
    from tasks.validate_schema import propose_schemas, schema_diff

    proposed = propose_schemas(ingested, tmp_path / "proposed", CFG)
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


def test_jensen_shannon_noise_rules():
    """JSD is measured on a complete histogram with many values per id; not on a cut one, nor
    where sampling alone would reach half the threshold."""
    from tensorflow_metadata.proto.v0 import statistics_pb2

    from tasks.validate_checks import unmeasurable_jensen_shannon

    def stats(unique: int, buckets: int, values: int):
        out = statistics_pb2.DatasetFeatureStatisticsList()
        feature = out.datasets.add().features.add()
        feature.path.step.append("ids_206")
        feature.string_stats.unique = unique
        feature.string_stats.common_stats.tot_num_values = values
        for i in range(buckets):
            feature.string_stats.rank_histogram.buckets.add(label=str(i))
        return out

    cfg = DriftConfig()  # threshold 0.1: noise up to 0.05 is measured
    assert (
        unmeasurable_jensen_shannon(cfg, stats(400, 400, 100_000), stats(400, 400, 100_000)) == {}
    )
    cut = unmeasurable_jensen_shannon(cfg, stats(400, 400, 10**6), stats(5000, 1000, 10**6))
    assert cut == {"ids_206": "more distinct ids than TFDV's rank histogram holds"}
    # 400 ids, 2,000 values a side: (399 / 8 ln 2) * (2 / 2000) = 0.072 > 0.05
    sparse = unmeasurable_jensen_shannon(cfg, stats(400, 400, 2000), stats(400, 400, 2000))
    assert sparse == {"ids_206": "400 ids, sampling alone about 0.07"}
    off = DriftConfig(features={"ids_206": {"jensen_shannon": None}})
    assert unmeasurable_jensen_shannon(off, stats(5000, 1000, 10), stats(5000, 1000, 10)) == {}
