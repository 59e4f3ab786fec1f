"""User errors end in one line naming the file, setting or step and what to run, with exit
code 1 and no traceback, and before any slow import; unexpected errors keep their traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from tests.conftest import REPO, make_project

HEAVY = ("tensorflow", "keras", "apache_beam", "tensorflow_data_validation", "mlflow")


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An empty working directory with the project's params.yaml."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fails(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.output
    for text in expected:
        assert text in result.output, result.output
    return result.output


def test_steps_before_their_inputs_name_what_to_run_without_loading_tensorflow(workdir):
    """validate/train/evaluate/register with nothing to read: one line each, in a fresh
    process that never imports TensorFlow, Beam, TFDV or MLflow."""
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flows.cli import app\n"
        "for step in ('validate', 'train', 'evaluate', 'register', 'ingest'):\n"
        "    result = CliRunner().invoke(app, [step])\n"
        "    print(result.exit_code, result.output.strip())\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "1 error: no ingested data at artifacts/ingest: run esmm ingest (or dvc repro validate)",
        "1 error: no ingested data at artifacts/ingest: run esmm ingest (or dvc repro train)",
        "1 error: no trained model at artifacts/train/model.keras: run esmm train "
        "(or dvc repro evaluate)",
        "1 error: no trained model at artifacts/train/model.keras: run esmm train "
        "(or dvc repro register)",
        "1 error: no raw data at data: run esmm data pull (or esmm data add FOLDER) "
        "(or dvc repro ingest)",
        "[]",
    ]


def test_broken_yaml_names_the_file_and_line(workdir):
    (workdir / "params.yaml").write_text("train:\n  epochs: 2\n  bad: [1, 2\nmodel: {}\n")
    _fails(["train"], "params.yaml:4: not valid YAML", "fix that line")


def test_an_unknown_early_stopping_metric_fails_at_config_load_listing_the_names(workdir):
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"]["early_stopping"]["monitor"] = "val_ctr_auc"  # p_ctr, not ctr
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    _fails(
        ["train"],
        "train.early_stopping.monitor: 'val_ctr_auc' is not a metric training logs",
        "val_p_ctr_auc",
        "val_loss",
    )


def test_serve_without_a_registered_model_leaves_no_database(workdir):
    _fails(["serve"], f"no model registry at {workdir / 'mlflow.db'}", "esmm retrain")
    assert not (workdir / "mlflow.db").exists()


def test_serve_and_export_refuse_contradictory_or_unknown_options(workdir):
    _fails(["serve", "--model-uri", "models:/esmm/1", "--follow", "champion"], "not both")
    _fails(["export", "--out", "x", "--format", "onnx"], "unknown --format 'onnx'")
    (workdir / "x").mkdir()
    _fails(["export", "--out", "x"], "x exists: give a new folder")
    _fails(["export", "--out", "y"], f"no model registry at {workdir / 'mlflow.db'}")
    assert not (workdir / "mlflow.db").exists()


def test_schedule_refuses_a_bad_cron_before_starting_anything(workdir):
    _fails(["schedule", "--cron", "every night"], "schedule.cron (or --cron) 'every night'")
    assert not (workdir / "artifacts").exists()  # no server was started (its log lives there)


def test_score_on_a_missing_folder_fails_before_loading_mlflow(workdir):
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from flows.cli import app\n"
        "result = CliRunner().invoke(app, ['score', 'nowhere'])\n"
        "print(result.exit_code, result.output.strip())\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "1 error: no folder nowhere: give a folder of sample_skeleton_*.csv[.gz] files",
        "[]",
    ]


class _NeverCalled:
    def predict(self, *args, **kwargs):  # pragma: no cover - nothing is scorable
        raise AssertionError("no line should reach the model")


def test_score_where_nothing_could_be_scored_exits_non_zero(workdir, monkeypatch):
    """Random bytes: every line is bad, so the (real) scorer never calls the model; the
    command writes its bad-lines list and fails, naming the threshold."""
    import serving.pyfunc

    raw = workdir / "garbage"
    raw.mkdir()
    noise = bytes(range(256)) * 40
    (raw / "sample_skeleton_test.csv").write_bytes(noise)
    (raw / "common_features_test.csv").write_bytes(noise[::-1])
    monkeypatch.setattr(serving.pyfunc, "load_keras_model", lambda uri: _NeverCalled())
    _fails(
        ["score", str(raw), "--model-uri", "models:/esmm/1", "--out", "p.parquet"],
        "no impression could be scored",
        "p.bad_lines.csv",
    )


def test_score_with_too_many_bad_lines_names_the_threshold():
    from flows.preflight import PreflightError, check_scored

    check_scored(995, 1000, 0.01, Path("b.csv"))  # 0.5% bad: under 1%
    with pytest.raises(PreflightError, match=r"\(10.00%\) could not be scored, above --max-bad"):
        check_scored(900, 1000, 0.01, Path("b.csv"))


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("esmm ")


def test_unexpected_errors_keep_their_traceback(workdir, monkeypatch):
    """A bug is not a user error: the exception propagates (typer prints its traceback)."""
    import tasks.steps

    def broken(params):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(tasks.steps, "ingest", broken)
    (workdir / "data").mkdir()
    result = CliRunner().invoke(app, ["ingest"])
    assert isinstance(result.exception, ZeroDivisionError)


def test_data_add_refuses_garbage_and_leaves_the_data_version(tmp_path, small_raw, monkeypatch):
    """A folder with the four file names but not their format: refused with the reason,
    before anything is copied; data.dvc and data/ are unchanged."""
    project = make_project(tmp_path / "project", small_raw)
    monkeypatch.chdir(project)
    recorded = (project / "data.dvc").read_text()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for path in small_raw.iterdir():
        if path.name.startswith(("sample_skeleton", "common_features")):
            name = path.name.removesuffix(".gz")
            (garbage / name).write_text("<html>not found</html>\n" * 50)
    (garbage / "oracle.json").write_text(json.dumps({}))
    _fails(
        ["data", "add", str(garbage)],
        "not an Ali-CCP skeleton file",
        "nothing was added and the data version is unchanged",
    )
    assert (project / "data.dvc").read_text() == recorded
    # A file named .gz that is not gzip: refused too.
    for path in garbage.glob("*.csv"):
        path.rename(path.with_name(path.name + ".gz"))
    _fails(["data", "add", str(garbage)], "cannot be read")
    assert (project / "data.dvc").read_text() == recorded
    assert sorted(p.name for p in (project / "data").iterdir()) == sorted(
        p.name for p in small_raw.iterdir()
    )
