"""The same stages through `dvc repro` in a temporary git repo: what reruns, experiments, and
the same metrics as the Prefect flow. (Apart from tests/flows/test_retrain.py so that the two
files' flow runs go to different test workers.)"""

from __future__ import annotations

import json
import os
import sys

import pytest

from tests.conftest import make_project, repro, run

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_dvc_repro_runs_every_stage_then_only_what_changed(tmp_path, small_raw):
    """`dvc repro` runs all stages; a second run does nothing; a training parameter change
    reruns training and what follows it, never ingestion or validation."""
    # No floors and no regression check: this test is about what reruns, not the gate.
    no_gate = {
        "min_ctr_auc": 0.0,
        "min_ctcvr_auc": 0.0,
        "min_cvr_auc_clicked": 0.0,
        "max_regression": {"ctr_auc": 1.0, "ctcvr_auc": 1.0, "cvr_auc_clicked": 1.0},
    }
    project = make_project(tmp_path / "project", small_raw, {"evaluate": no_gate})
    first = repro(project)
    for stage in ("ingest", "validate", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((project / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert {"ctr_auc", "ctcvr_auc", "cvr_auc_clicked", "gate_passed"} <= set(metrics)
    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], project).stdout
    assert "ctr_auc" in shown and "position" not in shown  # the headline, readably
    assert max(len(line) for line in shown.splitlines()) < 160, shown
    # register.promote: never (the default): a passing model is `challenger` only.
    registration = json.loads(
        (project / "artifacts" / "register" / "registration.json").read_text()
    )
    assert registration["gate_passed"] and registration["aliases"] == ["challenger"]

    assert "Running stage" not in repro(project)
    # `esmm promote` makes it the champion the experiment below is compared with.
    run([sys.executable, "-m", "flows.cli", "promote", "1", "--reason", "first model"], project)

    # An experiment with one parameter changed reruns training and what follows it only.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "first repro"], project)
    third = run(
        [sys.executable, "-m", "dvc", "exp", "run", "-S", "train.learning_rate=0.002"], project
    ).stdout
    for stage in ("train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in third
    for stage in ("ingest", "validate"):
        assert f"Running stage '{stage}'" not in third
    registration = json.loads(
        (project / "artifacts" / "register" / "registration.json").read_text()
    )
    assert registration["version"] == "2"
    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], project).stdout
    assert "champion.version" in shown and "delta.ctr_auc" in shown  # scored against v1
    run([sys.executable, "-m", "dvc", "plots", "show"], project)
    plots = (project / "dvc_plots" / "index.html").read_text()
    assert "roc_ctr.png" in plots and "by_position.csv" in plots
    shown = run([sys.executable, "-m", "dvc", "exp", "show", "--json"], project).stdout
    assert "0.002" in shown and "ctr_auc" in shown


def test_flow_and_dvc_repro_give_the_same_metrics(
    tmp_path, small_raw, prefect_harness, monkeypatch
):
    """Same data and parameters: the Prefect flow and `dvc repro` (separate processes, same
    step functions) write identical metrics."""
    from flows.retrain import retrain

    by_flow = make_project(tmp_path / "flow", small_raw)
    monkeypatch.chdir(by_flow)
    retrain(params_path="params.yaml")
    by_dvc = make_project(tmp_path / "dvc", small_raw)
    repro(by_dvc)
    flow_metrics, dvc_metrics = (
        json.loads((p / "artifacts" / "evaluate" / "metrics.json").read_text())
        for p in (by_flow, by_dvc)
    )
    assert flow_metrics == dvc_metrics
