"""The same stages through `dvc repro` in a temporary git repo: what reruns, experiments, and
the same metrics as the Prefect flow (the shared runs of tests/flows/conftest.py)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import repro, run
from tests.flows.conftest import SHARED_RUNS

pytestmark = [pytest.mark.timeout(900), SHARED_RUNS]


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
