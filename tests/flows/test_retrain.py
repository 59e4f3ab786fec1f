"""The retraining flow end to end under a real (temporary) Prefect server and a real
SQLite MLflow registry: what it registers, a refused gate, new data versions, and the same
pipeline state as `dvc repro`. The tests share one flow run (tests/flows/conftest.py)."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.conftest import repro, run
from tests.flows.conftest import SHARED_RUNS, clone

pytestmark = [pytest.mark.timeout(900), SHARED_RUNS]


def test_flow_registers_model_with_aliases_metrics_and_data_version(flow_run, monkeypatch):
    """One flow run: a new registered version, `challenger` (+ `champion` on a passed gate),
    the three AUCs logged, and the data.dvc md5 as its data-version tag."""
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from tasks.data import data_version

    project, summary = flow_run.project, flow_run.summary
    monkeypatch.chdir(project)

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("esmm", "challenger")
    assert str(version.version) == summary.model_version == "1"
    assert "esmm version 1 as challenger, champion" in summary.to_text()
    assert summary.gate_passed
    assert str(client.get_model_version_by_alias("esmm", "champion").version) == "1"
    expected_version = data_version(project / "data.dvc")
    assert summary.data_version == expected_version
    assert version.tags["data_version"] == expected_version
    run_data = client.get_run(version.run_id).data
    for name in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked"):
        assert run_data.metrics[name] == pytest.approx(summary.metrics[name])
    assert run_data.tags["data_version"] == expected_version
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert run_data.params["train.epochs"] == str(params["train"]["epochs"])
    # Per-epoch training metrics as steps (learning curves), the data set as the run's input.
    epochs = len(json.loads((project / "artifacts/train/history.json").read_text())["loss"])
    assert [m.step for m in client.get_metric_history(version.run_id, "loss")] == list(
        range(epochs)
    )
    assert len(client.get_metric_history(version.run_id, "val_p_ctr_auc")) == epochs
    (dataset,) = client.get_run(version.run_id).inputs.dataset_inputs
    assert dataset.dataset.digest == expected_version.removesuffix(".dir")

    # One pipeline state: the flow ran the dvc.yaml stages, so DVC finds nothing to do.
    status = run([sys.executable, "-m", "dvc", "status"], project).stdout
    assert "Data and pipelines are up to date" in status, status
    assert "Running stage" not in repro(project)
    # A parameter change through `dvc repro` reruns only the stage that reads it (here the
    # MLflow experiment: register alone, so no retraining in this test); the new version
    # is `challenger` only (register.promote: never) ...
    params["register"]["experiment"] = "esmm-again"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = repro(project)
    assert "Running stage 'register'" in changed and changed.count("Running stage") == 1
    assert client.get_registered_model("esmm").aliases["challenger"] in (2, "2")
    assert str(client.get_model_version_by_alias("esmm", "champion").version) == "1"
    # ... and the flow sees it: no stage reruns; it promotes version 2 on its gate.
    again = retrain(params_path="params.yaml")
    assert again.model_version == "2" and again.previous_champion == "1"
    assert len(client.search_model_versions("name='esmm'")) == 2
    assert str(client.get_model_version_by_alias("esmm", "champion").version) == "2"
    history = client.get_registered_model("esmm").tags
    assert any("retraining flow" in v for k, v in history.items() if k.startswith("champion."))
    status = run([sys.executable, "-m", "dvc", "status"], project).stdout
    assert "Data and pipelines are up to date" in status, status
    # A rollback stays: a later run on unchanged inputs does not promote version 2 again.
    run([sys.executable, "-m", "flows.cli", "rollback", "--reason", "test"], project)
    retrain(params_path="params.yaml")
    assert str(client.get_model_version_by_alias("esmm", "champion").version) == "1"


def test_failed_gate_registers_challenger_then_fails_the_run(flow_run, tmp_path, monkeypatch):
    """A model below a floor is registered as `challenger`, never becomes `champion`, and
    the flow run fails with the failed checks after writing its registration. (The flow's
    trained model, in a new registry: only evaluate and register rerun.)"""
    from mlflow import MlflowClient

    from flows.retrain import retrain
    from tasks.evaluate import GateRefusedError

    params = {"evaluate": {"min_ctr_auc": 0.999}}
    project = clone(flow_run, tmp_path / "project", registry=False, params=params)
    monkeypatch.chdir(project)
    with pytest.raises(GateRefusedError) as refused:
        retrain(params_path="params.yaml")
    assert "ctr_auc" in refused.value.reasons[0]
    assert "evaluate.min_ctr_auc" in str(refused.value)
    assert "esmm version 1 as challenger" in str(refused.value)  # the summary comes first
    registration = json.loads(
        (project / "artifacts" / "register" / "registration.json").read_text()
    )
    assert registration["version"] == "1" and registration["gate_passed"] is False
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert str(client.get_model_version_by_alias("esmm", "challenger").version) == "1"
    assert "champion" not in client.get_registered_model("esmm").aliases


def test_each_new_data_version_retrains_and_corrupt_data_fails_the_run(
    flow_run, tmp_path, monkeypatch
):
    """Two data versions give two model versions (the champion moves to the second only
    with a passed gate); a corrupt third batch fails the run at ingestion, naming the step
    and the reason, and leaves the champion where it was."""
    from mlflow import MlflowClient

    from aliccp.synth import synthesize_ali_ccp
    from flows.retrain import retrain
    from tasks.data import add_raw_data, data_version

    project = clone(flow_run, tmp_path / "project")  # the first data version, model version 1
    monkeypatch.chdir(project)
    first = flow_run.summary
    assert first.model_version == "1"

    synthesize_ali_ccp(tmp_path / "batch2", 4000, 1500, seed=8)
    add_raw_data(project, project / "data", tmp_path / "batch2")
    second = retrain(params_path="params.yaml", return_state=True)  # Failed if refused
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    assert client.get_model_version_by_alias("esmm", "challenger").version in (2, "2")
    second_version = client.get_model_version("esmm", "2").tags["data_version"]
    assert second_version == data_version(project / "data.dvc") != first.data_version
    champion = client.get_model_version_by_alias("esmm", "champion").version
    assert str(champion) == ("2" if second.is_completed() else "1")

    synthesize_ali_ccp(tmp_path / "batch3", 2000, 500, seed=9, defect_rate=0.2)
    add_raw_data(project, project / "data", tmp_path / "batch3")
    state = retrain(params_path="params.yaml", return_state=True)
    assert state.is_failed()
    assert "step ingest failed" in state.message and "max_quarantine_fraction" in state.message
    assert client.get_model_version_by_alias("esmm", "champion").version == champion
    assert len(client.search_model_versions("name='esmm'")) == 2


def test_run_summary_text_names_every_outcome():
    """The summary `esmm retrain` prints: data version, impressions, validation, the three
    AUCs next to the oracle's and the champion's, the verdict, the registered version and
    the MLflow UI."""
    from flows.retrain import RunSummary

    summary = RunSummary(
        data_version="abc.dir",
        impressions={"train": 900, "valid": 100, "test": 300},
        rows_quarantined=2,
        validation="validation passed",
        metrics={"ctr_auc": 0.7, "ctcvr_auc": 0.71, "cvr_auc_clicked": 0.65},
        oracle={"ctr_auc": 0.77, "ctcvr_auc": 0.84, "cvr_auc_clicked": 0.75},
        gate_passed=False,
        gate_reasons=["ctr_auc = 0.7000 is below the floor evaluate.min_ctr_auc = 0.8"],
        model_name="esmm",
        model_version="3",
        aliases=["challenger"],
        tracking_uri="sqlite:////x/mlflow.db",
        champion={"version": "2", "ctr_auc": 0.72, "ctcvr_auc": 0.70, "cvr_auc_clicked": 0.6},
    )
    text = summary.to_text()
    for expected in (
        "abc.dir",
        "train 900, valid 100, test 300",
        "validation passed",
        "ctcvr_auc",
        "0.8400",
        "0.1300",  # the CTCVR gap to the oracle
        "FAILED: ctr_auc",
        "esmm version 3 as challenger",
        "mlflow ui --backend-store-uri sqlite:////x/mlflow.db",
        "champion v2",
        "-0.0200",  # CTR AUC against the champion's
        "against champion version 2; champion unchanged",
    ):
        assert expected in text
    assert "| ctr_auc | 0.7000 | 0.7700 | 0.7200 | -0.0200 |" in summary.to_markdown()
