"""The retraining flow end to end under a real (temporary) Prefect server and a real
SQLite MLflow registry: what it registers, a refused gate, new data versions; the same
stages through `dvc repro` in a temporary git repo (what reruns, experiments, the same
metrics as the flow); and the scheduled deployment on a real Prefect server on loopback.
The tests share one flow run and one `dvc repro` (tests/flows/conftest.py), so they live in
one file: pytest-xdist (`--dist loadfile`) gives them one worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import repro, run
from tests.flows.conftest import clone

pytestmark = pytest.mark.timeout(900)


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


# --- the same stages through dvc repro --------------------------------------------------


def test_dvc_repro_runs_every_stage_then_only_what_changed(repro_run):
    """`dvc repro` runs all stages; a second run does nothing; a training parameter change
    reruns training and what follows it, never ingestion or validation."""
    project, first = repro_run.project, repro_run.output
    for stage in ("ingest", "validate", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first
    metrics = repro_run.metrics
    assert {"ctr_auc", "ctcvr_auc", "cvr_auc_clicked", "gate_passed"} <= set(metrics)
    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], project).stdout
    assert "ctr_auc" in shown and "position" not in shown  # the headline, readably
    assert max(len(line) for line in shown.splitlines()) < 160, shown
    # register.promote: never (the default): a passing model is `challenger` only.
    registration = repro_run.registration
    assert registration["gate_passed"] and registration["aliases"] == ["challenger"]

    # Bytecode Python writes beside the stages' code (without PYTHONDONTWRITEBYTECODE) is
    # not a change of that code.
    cache = project / "tasks" / "ingest" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "parse.cpython-311.pyc").write_bytes(b"bytecode")
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


def test_flow_and_dvc_repro_give_the_same_metrics(flow_run, repro_run):
    """Same data and parameters: the Prefect flow and `dvc repro` (separate processes, same
    step functions) write identical metrics."""
    assert flow_run.metrics == repro_run.metrics


# --- the scheduled deployment ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_deployment(client_factory, name: str, timeout: float):
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    while True:
        try:
            with client_factory() as client:
                return client.read_deployment_by_name(name)
        except ObjectNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_esmm_schedule_serves_a_cron_deployment_that_runs_and_registers(tmp_path, flow_run):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.schedule import wait_healthy

    project = clone(flow_run, tmp_path / "project", params={"register": {"experiment": "nightly"}})
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the command must start its own server
    log = open(tmp_path / "schedule.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "schedule", "--port", str(port), "--cron", "0 3 * * *"],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, 240, proc)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            deployment = _wait_for_deployment(
                lambda: get_client(sync_client=True), "esmm-retrain/nightly", 120
            )
            crons = [s.schedule.cron for s in deployment.schedules]
            assert crons == ["0 3 * * *"] and deployment.schedules[0].active
            flow_run = run_deployment("esmm-retrain/nightly", timeout=600, poll_interval=2)
            assert flow_run.state.is_completed(), flow_run.state.message
            assert flow_run.deployment_id == deployment.id
    finally:
        proc.send_signal(signal.SIGTERM)  # as a service manager stops it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    version = client.get_model_version_by_alias("esmm", "challenger")
    assert str(version.version) == "2"  # version 1 is the shared run's
    run = client.get_run(version.run_id)
    assert client.get_experiment(run.info.experiment_id).name == "nightly"
    with pytest.raises(OSError):  # the server went away with the command
        socket.create_connection(("127.0.0.1", port), timeout=2)
