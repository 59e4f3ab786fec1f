"""The scheduled deployment on a real Prefect server on loopback: `esmm schedule` starts the
server, creates the cron deployment and serves it; a run triggered through the server
completes and registers a model version. (In a copy of the shared flow run's project with
a new MLflow experiment, so the triggered run's work is the register stage alone.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.flows.conftest import SHARED_RUNS, clone

pytestmark = [pytest.mark.timeout(900), SHARED_RUNS]


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
