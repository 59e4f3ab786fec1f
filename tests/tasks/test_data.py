"""Data versions: regenerated data reproduces data.dvc exactly; missing data is restored."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aliccp.synth import synthesize_ali_ccp
from tasks.config import SynthConfig, load_params
from tasks.data import DataVersionError, data_version, ensure_raw_data
from tests.conftest import REPO, SMALL, add_local_remote, make_project, run


def test_default_data_regenerates_to_the_committed_version(tmp_path):
    """`esmm synth` with the params.yaml defaults yields exactly the md5 in data.dvc."""
    synth = load_params(REPO / "params.yaml").synth
    synthesize_ali_ccp(tmp_path / "data", synth.train, synth.test, synth.seed)
    run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], tmp_path)
    run([sys.executable, "-m", "dvc", "add", "-q", "data"], tmp_path)
    assert data_version(tmp_path / "data.dvc") == data_version(REPO / "data.dvc")


def test_missing_data_is_regenerated_and_pushed(tmp_path, small_raw):
    """With data/ gone and no remote copy, the generator restores the recorded version,
    which is then cached and pushed to the default (local) remote."""
    project = make_project(tmp_path / "project", small_raw)
    add_local_remote(project, tmp_path / "remote")
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    restored = ensure_raw_data(project, project / "data", SynthConfig(**SMALL))
    assert restored.version == data_version(project / "data.dvc") and restored.source == "generator"
    assert any((tmp_path / "remote").rglob("*")), "nothing was pushed to the remote"

    # Now `dvc pull` alone can restore it.
    shutil.rmtree(project / "data")
    pulled = ensure_raw_data(project, project / "data", SynthConfig(**{**SMALL, "seed": 999}))
    assert pulled == type(restored)(restored.version, "remote")


def test_regeneration_that_does_not_match_fails(tmp_path, small_raw):
    project = make_project(tmp_path / "project", small_raw)
    shutil.rmtree(project / "data")
    shutil.rmtree(project / ".dvc" / "cache")
    with pytest.raises(DataVersionError, match="does not match"):
        ensure_raw_data(
            project, project / "data", SynthConfig(**{**SMALL, "seed": SMALL["seed"] + 1})
        )


def test_data_version_needs_a_dvc_file(tmp_path):
    with pytest.raises(DataVersionError, match="not found"):
        data_version(tmp_path / "data.dvc")
    (tmp_path / "data.dvc").write_text("outs: []\n")
    with pytest.raises(DataVersionError, match="expected one output"):
        data_version(tmp_path / "data.dvc")


def test_cli_reports_a_missing_raw_file(tmp_path, small_raw):
    """`esmm ingest` with a raw file missing exits 1 naming the file, without a traceback."""
    project = make_project(tmp_path / "project", small_raw)
    (project / "data" / "sample_skeleton_test.csv").unlink()
    proc = subprocess.run(["esmm", "ingest"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "sample_skeleton_test.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_reports_a_mistyped_parameter(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  learning_rat: 0.1\n")
    proc = subprocess.run(["esmm", "train"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "train.learning_rat: unknown key" in proc.stderr


def test_cli_help_lists_every_step():
    proc = subprocess.run(["esmm", "--help"], capture_output=True, text=True, cwd=Path.cwd())
    assert proc.returncode == 0
    for command in (
        "synth",
        "data",
        "schema",
        "ingest",
        "validate",
        "train",
        "evaluate",
        "register",
        "promote",
        "rollback",
        "champions",
        "retrain",
        "schedule",
        "serve",
        "score",
    ):
        assert command in proc.stdout


def test_changed_data_is_never_overwritten(tmp_path, small_raw):
    """A raw folder that differs from data.dvc is an error, and it is left as it is."""
    project = make_project(tmp_path / "project", small_raw)
    extra = project / "data" / "sample_skeleton_train.csv"
    extra.write_text(extra.read_text() + extra.read_text().splitlines()[0] + "\n")
    before = extra.read_bytes()
    with pytest.raises(DataVersionError, match="differs from the version recorded"):
        ensure_raw_data(project, project / "data", SynthConfig(**SMALL))
    assert extra.read_bytes() == before


def test_data_add_versions_a_new_batch(tmp_path, small_raw):
    """`add_raw_data` swaps in the new files, records a new md5 in data.dvc and pushes it."""
    from tasks.data import add_raw_data

    project = make_project(tmp_path / "project", small_raw)
    add_local_remote(project, tmp_path / "remote")
    before = data_version(project / "data.dvc")
    batch = tmp_path / "batch"
    synthesize_ali_ccp(batch, 1000, 300, seed=123)

    added = add_raw_data(project, project / "data", batch)
    assert added.version == data_version(project / "data.dvc") != before
    assert (project / "data" / "sample_skeleton_train.csv").read_bytes() == (
        batch / "sample_skeleton_train.csv"
    ).read_bytes()
    # DVC stores an object as <first two hex digits>/<the rest>.
    digest = added.version
    assert (tmp_path / "remote" / "files" / "md5" / digest[:2] / digest[2:]).is_file(), "not pushed"


def test_data_add_refuses_an_incomplete_batch(tmp_path, small_raw):
    from tasks.data import add_raw_data
    from tasks.ingest import IngestError

    project = make_project(tmp_path / "project", small_raw)
    before = data_version(project / "data.dvc")
    batch = tmp_path / "batch"
    synthesize_ali_ccp(batch, 1000, 300, seed=123)
    (batch / "common_features_test.csv").unlink()
    with pytest.raises(IngestError, match="common_features_test.csv"):
        add_raw_data(project, project / "data", batch)
    assert data_version(project / "data.dvc") == before
    assert (project / "data" / "common_features_test.csv").is_file()


def test_training_window_ingests_the_latest_versions(tmp_path, small_raw, monkeypatch):
    """ingest.window = 2 trains on the current and the previous data version (their keys
    kept apart by a version prefix) and tests on the current one alone; a window longer
    than the git history fails with the count it found."""
    import pyarrow.parquet as pq

    from tasks import steps
    from tasks.data import add_raw_data, version_history

    project = make_project(tmp_path / "project", small_raw)
    first = data_version(project / "data.dvc")
    batch = tmp_path / "batch2"
    synthesize_ali_ccp(batch, 2000, 600, seed=8)
    add_raw_data(project, project / "data", batch)
    run(["git", "commit", "-q", "-am", "data: batch 2"], project)
    assert [v.md5 for v in version_history(project, project / "data.dvc")] == [
        data_version(project / "data.dvc"),
        first,
    ]

    monkeypatch.chdir(project)
    params = load_params("params.yaml")
    latest_only = steps.ingest(params)
    window = steps.ingest(
        params.model_copy(update={"ingest": params.ingest.model_copy(update={"window": 2})})
    )
    train_ids = pq.read_table("artifacts/ingest/train/impressions.parquet")["sample_id"]
    old = [s for s in train_ids.to_pylist() if s.startswith(first[:8] + ":")]
    assert (
        window.split_rows["train"] == len(train_ids) == len(old) + latest_only.split_rows["train"]
    )
    assert window.split_rows["train"] + window.split_rows["valid"] > SMALL["train"] * 0.99 + 1900
    assert window.split_rows["test"] == latest_only.split_rows["test"] <= 600
    common = pq.read_table("artifacts/ingest/train/common.parquet")["common_feature_index"]
    assert any(k.startswith(first[:8] + ":") for k in common.to_pylist())
    with pytest.raises(DataVersionError, match="needs 2 earlier versions"):
        steps.ingest(
            params.model_copy(update={"ingest": params.ingest.model_copy(update={"window": 3})})
        )
