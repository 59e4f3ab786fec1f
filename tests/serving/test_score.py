"""Batch scoring of raw files: the ingested predictions, bad lines counted and listed,
a missing common file named, `esmm score` with the champion, gzip files."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from aliccp.format import R_COLUMNS, R_ENTRY, R_UNKNOWN_KEY
from models.features import OUTPUT_KEYS, SAMPLE_ID_KEY
from serving.score import score_raw
from tasks.inputs import predict_split


def test_score_matches_the_ingested_predictions(small_raw, ingested, keras_model, tmp_path):
    """Scoring the raw folder gives, impression for impression, the predictions made from
    the ingested test split."""
    report = score_raw(
        small_raw, tmp_path / "predictions.parquet", keras_model, batch_size=500, progress=False
    )
    assert report.rows_read == report.rows_scored + report.rows_not_scored
    scored = pq.read_table(tmp_path / "predictions.parquet").to_pandas()
    assert len(scored) == report.rows_scored
    test = scored[scored["file"] == "sample_skeleton_test.csv"].set_index(SAMPLE_ID_KEY)
    expected = predict_split(keras_model, ingested / "test", batch_size=700).set_index(
        SAMPLE_ID_KEY
    )
    assert len(test) == len(expected)
    test = test.loc[expected.index]
    np.testing.assert_allclose(
        test[list(OUTPUT_KEYS)], expected[list(OUTPUT_KEYS)], rtol=1e-5, atol=1e-7
    )
    assert (test["click"].to_numpy() == expected["click"].to_numpy()).all()


def test_score_reports_bad_lines(small_raw, keras_model, tmp_path):
    """Bad lines are counted by reason and listed with their line numbers, not dropped."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(small_raw / "common_features_test.csv", raw / "common_features_x.csv")
    good = (small_raw / "sample_skeleton_test.csv").read_text().splitlines()[:20]
    fields = good[0].split(",")
    unknown_key = ",".join([fields[0] + "u", fields[1], fields[2], "f" * 32, *fields[4:]])
    nan_weight = good[1].rsplit("\x03", 1)[0] + "\x03nan"
    lines = [*good, good[2][:15], unknown_key, nan_weight]
    (raw / "sample_skeleton_x.csv").write_text("\n".join(lines) + "\n")

    report = score_raw(raw, tmp_path / "out" / "p.parquet", keras_model, progress=False)
    assert (report.rows_read, report.rows_scored, report.rows_not_scored) == (23, 20, 3)
    assert report.bad_lines == {R_COLUMNS: 1, R_UNKNOWN_KEY: 1, R_ENTRY: 1}
    bad = pd.read_csv(report.bad_lines_path)
    assert bad["line"].tolist() == [21, 22, 23]
    assert "3 bad lines" in report.summary()


def test_score_names_a_missing_common_file(small_raw, keras_model, tmp_path):
    shutil.copy(small_raw / "sample_skeleton_test.csv", tmp_path / "sample_skeleton_test.csv")
    with pytest.raises(FileNotFoundError, match="common_features_test.csv"):
        score_raw(tmp_path, tmp_path / "p.parquet", keras_model, progress=False)


@pytest.mark.parametrize(
    "beam",
    [[], ["--beam-options", "--direct_running_mode=in_memory --direct_num_workers=1"]],
    ids=["local", "beam"],
)
def test_esmm_score_command_uses_the_champion(store, small_raw, tmp_path, beam):
    """`esmm score` (and `esmm score --beam-options`, a Beam pipeline) loads
    models:/esmm@champion from the configured store; both write the same predictions."""
    from typer.testing import CliRunner

    from flows.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"register": {"tracking_uri": store["tracking_uri"]}}))
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
        shutil.copy(small_raw / name, raw / name)
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(
        app, ["score", str(raw), "--out", str(out), "--params", str(params), *beam]
    )
    assert result.exit_code == 0, result.output
    assert "scored 1,500 of 1,500 impressions" in result.output
    scored = pq.read_table(out).to_pandas()
    assert len(scored) == 1500
    if beam:
        local = tmp_path / "local.parquet"
        assert (
            CliRunner()
            .invoke(app, ["score", str(raw), "--out", str(local), "--params", str(params)])
            .exit_code
            == 0
        )
        pd.testing.assert_frame_equal(scored, pq.read_table(local).to_pandas(), rtol=1e-6)


def test_score_reads_gzip_files_like_plain_ones(small_raw, keras_model, tmp_path):
    import gzip

    for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
        (tmp_path / "gz").mkdir(exist_ok=True)
        (tmp_path / "gz" / f"{name}.gz").write_bytes(gzip.compress((small_raw / name).read_bytes()))
        (tmp_path / "plain").mkdir(exist_ok=True)
        shutil.copy(small_raw / name, tmp_path / "plain" / name)
    score_raw(tmp_path / "gz", tmp_path / "gz.parquet", keras_model, progress=False)
    score_raw(tmp_path / "plain", tmp_path / "plain.parquet", keras_model, progress=False)
    gz = pq.read_table(tmp_path / "gz.parquet").to_pandas()
    plain = pq.read_table(tmp_path / "plain.parquet").to_pandas()
    assert len(gz) == 1500
    pd.testing.assert_frame_equal(gz.drop(columns="file"), plain.drop(columns="file"))
