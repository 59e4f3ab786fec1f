"""Shared pipeline runs of the flow tests: one retraining-flow run and one `dvc repro` of the
same small project, made once per test session (each is a minute of real work: five stage
processes, TensorFlow, TFDV, MLflow). A test that changes a project works on its own copy
of the flow's project as it was right after the run (`clone`). Their users are all in
test_retrain.py, so that under pytest-xdist (`--dist loadfile`) one worker makes them."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_project, merge_params, repro


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test server (a real temporary Prefect API), once for the session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass(frozen=True)
class FlowRun:
    project: Path  # the project the run went through (test_retrain's first test goes on in it)
    pristine: Path  # a copy of it taken right after the run, for `clone`
    summary: object  # flows.retrain.RunSummary
    metrics: dict  # artifacts/evaluate/metrics.json of the run


@dataclass(frozen=True)
class ReproRun:
    project: Path
    output: str  # what `dvc repro` printed
    metrics: dict
    registration: dict  # artifacts/register/registration.json


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory, small_raw, prefect_harness) -> FlowRun:
    """`retrain()` once in a fresh small project (SMALL_PARAMS)."""
    from flows.retrain import retrain

    root = tmp_path_factory.mktemp("flow-run")
    project = make_project(root / "project", small_raw)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        summary = retrain(params_path="params.yaml")
    pristine = root / "pristine"
    shutil.copytree(project, pristine, symlinks=True)
    return FlowRun(project, pristine, summary, _read(project, "evaluate/metrics.json"))


@pytest.fixture(scope="session")
def repro_run(tmp_path_factory, small_raw) -> ReproRun:
    """`dvc repro` once in a fresh small project, the same as the flow's."""
    project = make_project(tmp_path_factory.mktemp("repro-run") / "project", small_raw)
    output = repro(project)
    return ReproRun(
        project,
        output,
        _read(project, "evaluate/metrics.json"),
        _read(project, "register/registration.json"),
    )


def clone(run: FlowRun, dest: Path, *, registry: bool = True, params: dict | None = None) -> Path:
    """A copy of the flow's project right after its run: the DVC cache, dvc.lock, git and
    outputs, so a later run reruns only what changed.

    Args:
        registry: keep the MLflow store (version 1, the champion; its artefacts stay in
            the original project's folder, where MLflow recorded them). False: an empty one.
        params: values merged into params.yaml, e.g. {"evaluate": {"min_ctr_auc": 0.9}}.
    """
    shutil.copytree(run.pristine, dest, symlinks=True)
    if not registry:
        (dest / "mlflow.db").unlink()
        shutil.rmtree(dest / "mlruns", ignore_errors=True)
    if params:
        merge_params(dest, params)
    return dest


def _read(project: Path, name: str) -> dict:
    return json.loads((project / "artifacts" / name).read_text())
