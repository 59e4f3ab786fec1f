"""The team stack on real servers on loopback (see conftest.py: started once per session).

In file order: the deployment run a worker executed and what the registry holds; the model
through the server (artefact download, `esmm serve`); logins; secrets; `esmm schedule` in
team mode; the faults (a worker killed mid-run, the MLflow server restarted before
registration, two runs at once, PostgreSQL stopped); `esmm stack down` last.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import mlflow.artifacts
import psutil
import pyarrow.parquet as pq
import pytest

from stack import lifecycle, postgres, processes
from stack.settings import read_env_file
from tests.conftest import make_project

pytestmark = pytest.mark.timeout(1500)

DEPLOYMENT = "esmm-retrain/nightly"
_CLIENT_VARS = (
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "ESMM_TRACKING_URI",
    "MLFLOW_TRACKING_URI",
    "ESMM_SETTINGS",
    "ESMM_WORK_POOL",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    root: Path  # the stack directory
    project: Path  # the repository the deployment clones
    ports: dict[str, int]
    up_seconds: float
    up_output: str

    @property
    def settings(self) -> dict[str, str]:
        return read_env_file(self.root / "settings.env")

    @property
    def env(self) -> dict[str, str]:
        """For `esmm` subprocesses: the settings file, nothing else of the stack."""
        env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARS}
        return env | {"ESMM_SETTINGS": str(self.root / "settings.env")}

    def esmm(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            cwd=self.project,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    @contextmanager
    def client(self) -> Iterator[None]:
        """This process as a client of the stack (Prefect and MLflow), for a block only:
        other tests in the session must keep their local stores."""
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        s = self.settings
        keep = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        with (
            mock.patch.dict(os.environ, {k: s[k] for k in keep}),
            temporary_settings(
                updates={
                    PREFECT_API_URL: s["PREFECT_API_URL"],
                    PREFECT_API_AUTH_STRING: s["PREFECT_API_AUTH_STRING"],
                }
            ),
        ):
            yield

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(self.settings["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="session")
def stack(tmp_path_factory, small_raw) -> Iterator[Stack]:
    """`esmm stack up` once; `esmm stack down` at the end (if a test did not already)."""
    # PostgreSQL's own account must reach the stack directory: not under pytest's 0700 tmp.
    root = Path(tempfile.mkdtemp(prefix="esmm-stack-", dir="/tmp"))
    root.chmod(0o711)
    project = make_project(tmp_path_factory.mktemp("team") / "project", small_raw)
    ports = {name: free_port() for name in ("pg", "mlflow", "prefect")}
    args = [
        "stack",
        "up",
        "--dir",
        str(root),
        "--workers",
        "2",
        "--pg-port",
        str(ports["pg"]),
        "--mlflow-port",
        str(ports["mlflow"]),
        "--prefect-port",
        str(ports["prefect"]),
    ]
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARS}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.monotonic() - start
    stack = Stack(root, project, ports, elapsed, proc.stdout + proc.stderr)
    try:
        assert proc.returncode == 0, stack.up_output
        yield stack
    finally:
        stack.esmm("stack", "down", "--dir", str(root))
        shutil.rmtree(root, ignore_errors=True)


@dataclass(frozen=True)
class DeploymentRun:
    flow_run: object  # prefect FlowRun
    seconds: float


@pytest.fixture(scope="session")
def deployment_run(stack) -> DeploymentRun:
    """One run of the deployment, triggered through the server and executed by a worker."""
    from prefect.deployments import run_deployment

    with stack.client():
        start = time.monotonic()
        flow_run = run_deployment(DEPLOYMENT, timeout=900, poll_interval=2)
    return DeploymentRun(flow_run, time.monotonic() - start)


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _status(url: str, auth: tuple[str, str] | None = None, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    request.add_header("Content-Type", "application/json")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return 0  # nothing listening (yet)


def _flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _task_states(flow_run_id) -> dict[str, str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return {r.name.rsplit("-", 1)[0]: r.state.type.value for r in runs if r.state}


def _champion(stack) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(stack.mlflow().get_model_version_by_alias("esmm", "champion").version)
    except MlflowException:
        return None


def _versions(stack) -> list:
    return stack.mlflow().search_model_versions("name = 'esmm'")


# --- one deployment run, executed by a worker ------------------------------------------


def test_stack_up_starts_every_part_and_writes_settings(stack):
    print(f"\nstack up: {stack.up_seconds:.0f} s")
    status = stack.esmm("stack", "status", "--dir", str(stack.root))
    assert status.returncode == 0, status.stdout + status.stderr
    for part in ("postgres", "mlflow", "prefect", "worker-1", "worker-2"):
        assert f"{part:<10} up" in status.stdout
    settings = stack.settings
    assert settings["PREFECT_API_URL"] == f"http://127.0.0.1:{stack.ports['prefect']}/api"
    assert settings["ESMM_TRACKING_URI"] == f"http://127.0.0.1:{stack.ports['mlflow']}"


def test_a_worker_executes_the_deployment_run(stack, deployment_run):
    print(f"\ndeployment run: {deployment_run.seconds:.0f} s")
    flow_run = deployment_run.flow_run
    assert flow_run.state.is_completed(), flow_run.state.message
    assert flow_run.work_pool_name == "esmm"
    # The run's process is a child of one of the stack's worker processes, not of this one.
    pid = int(str(flow_run.infrastructure_pid).rsplit(":", 1)[-1])
    assert pid != os.getpid()
    workers = [processes.process(stack.root, f"worker-{i}") for i in (1, 2)]
    assert flow_run.state_name == "Completed" and any(w is not None for w in workers)
    log = "".join(processes.log_file(stack.root, f"worker-{i}").read_text() for i in (1, 2))
    assert "pulled from the DVC remote" in log  # the clone got its data from the shared remote


def test_the_tracking_server_holds_the_champion_with_tags_metrics_and_artefacts(
    stack, deployment_run
):
    with stack.client():
        client = stack.mlflow()
        version = client.get_model_version_by_alias("esmm", "champion")
        assert {"champion", "challenger"} <= set(version.aliases)
        assert version.tags["gate_passed"] == "true"
        assert len(version.tags["data_version"]) > 32
        assert version.tags["git_commit"] != "unknown"  # the clone's commit
        run = client.get_run(version.run_id)
        assert 0.5 < run.data.metrics["ctr_auc"] < 1
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
        assert {"evaluation", "validation"} <= {
            a.path for a in client.list_artifacts(run.info.run_id)
        }
        model_uri = client.get_model_version_download_uri("esmm", version.version)
        model_files = {
            a.path
            for a in mlflow.artifacts.list_artifacts(
                artifact_uri=model_uri, tracking_uri=stack.settings["MLFLOW_TRACKING_URI"]
            )
        }
        assert any(f.rsplit("/", 1)[-1] == "MLmodel" for f in model_files), model_files


def test_mlflow_artifacts_download_through_the_server_returns_the_model(
    stack, deployment_run, tmp_path
):
    env = stack.env | {
        k: stack.settings[k]
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "artifacts",
            "download",
            "-u",
            "models:/esmm@champion",
            "-d",
            str(tmp_path / "model"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert list((tmp_path / "model").glob("**/*.keras"))
    assert (tmp_path / "model" / "MLmodel").is_file()


def test_esmm_serve_serves_the_champion_from_the_servers_registry(stack, deployment_run, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "serve", "--port", str(port)],
            cwd=stack.project,
            env=stack.env,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: server.poll() is not None or _status(f"{url}/ping") == 200, 300, "esmm serve")
        assert server.poll() is None, f"esmm serve exited:\n{log.read_text()[-3000:]}"
        record = {"features": {"101": [[17, 1.0]], "205": [[4031, 1.0]]}}
        body = json.dumps({"dataframe_records": [record]}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            prediction = json.loads(response.read())["predictions"][0]
        assert 0 < prediction["p_ctcvr"] <= prediction["p_ctr"] < 1
    finally:
        _stop_group(server)


def _stop_group(proc: subprocess.Popen) -> None:
    for p in processes.tree(psutil.Process(proc.pid)) if proc.poll() is None else []:
        p.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()


# --- security ---------------------------------------------------------------------------


def test_both_servers_answer_401_without_credentials(stack):
    s = stack.settings
    mlflow_api = f"{s['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    prefect_api = f"{s['PREFECT_API_URL']}/flows/filter"
    assert _status(mlflow_api) == 401
    assert _status(mlflow_api, ("admin", "wrong")) == 401
    assert _status(mlflow_api, ("admin", s["MLFLOW_TRACKING_PASSWORD"])) == 200
    assert _status(prefect_api, data=b"{}") == 401
    assert _status(prefect_api, ("esmm", "wrong"), data=b"{}") == 401
    user, password = s["PREFECT_API_AUTH_STRING"].split(":", 1)
    assert _status(prefect_api, (user, password), data=b"{}") == 200


def test_secrets_are_private_and_never_logged(stack):
    for name in ("settings.env", "secrets.env", "mlflow-auth.ini"):
        assert (stack.root / name).stat().st_mode & 0o777 == 0o600, name
    secrets = read_env_file(stack.root / "secrets.env")
    logs = stack.up_output + "".join(
        p.read_text(errors="replace") for p in (stack.root / "logs").glob("*.log")
    )
    for value in (
        secrets["PG_PASSWORD"],
        secrets["MLFLOW_ADMIN_PASSWORD"],
        secrets["PREFECT_AUTH"].split(":", 1)[1],
    ):
        assert value not in logs
    # Nothing of the stack reaches git: this repository ignores .stack/.
    repo = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(["git", "check-ignore", "-q", ".stack/settings.env"], cwd=repo)
    assert ignored.returncode == 0


# --- the same commands, team mode ------------------------------------------------------


def test_esmm_schedule_registers_the_cron_deployment_with_the_work_pool(stack):
    proc = stack.esmm("schedule", "--cron", "0 3 * * *")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "registered esmm-retrain/nightly" in proc.stdout
    from prefect.client.orchestration import get_client

    with stack.client(), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.work_pool_name == "esmm"
    assert deployment.global_concurrency_limit.limit == 1
    steps = [next(iter(step)) for step in deployment.pull_steps]
    assert steps == [
        "prefect.deployments.steps.git_clone",
        "prefect.deployments.steps.run_shell_script",
    ]


def test_promote_rollback_and_champions_against_the_stack(stack, deployment_run):
    history = stack.esmm("champions")
    assert history.returncode == 0, history.stderr
    assert "promote" in history.stdout
    refused = stack.esmm("rollback")  # only one champion so far
    assert refused.returncode == 1
    assert "no previous champion" in refused.stderr


def test_esmm_score_scores_with_the_servers_champion(stack, deployment_run, small_raw, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
        shutil.copy(small_raw / name, raw / name)
    out = tmp_path / "predictions.parquet"
    proc = stack.esmm("score", str(raw), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "scored 1,500 of 1,500 impressions" in proc.stdout
    assert pq.read_table(out).num_rows == 1500


def test_esmm_retrain_runs_here_and_reports_to_the_servers(stack, deployment_run):
    """`esmm retrain` in the team's repository: the flow runs in this command's process, the
    stack's Prefect server records the run, and its MLflow server registers the model."""
    from prefect.client.orchestration import get_client

    with stack.client(), get_client(sync_client=True) as client:
        runs_before = {r.id for r in client.read_flow_runs()}
        versions_before = {v.version for v in _versions(stack)}
    proc = stack.esmm("retrain", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"MLflow UI         http://127.0.0.1:{stack.ports['mlflow']}" in proc.stdout
    with stack.client(), get_client(sync_client=True) as client:
        (run,) = [r for r in client.read_flow_runs() if r.id not in runs_before]
        assert run.deployment_id is None and run.state.is_completed()  # not a worker's run
        new = {v.version for v in _versions(stack)} - versions_before
    assert len(new) == 1, new


# --- faults -----------------------------------------------------------------------------


def _kill_worker_of(stack, flow_run_id) -> None:
    """Kill (SIGKILL) the worker running the flow run, with the run: as when its machine dies."""
    running = _flow_run(flow_run_id)
    pid = int(str(running.infrastructure_pid).rsplit(":", 1)[-1])
    for index in (1, 2):
        worker = processes.process(stack.root, f"worker-{index}")
        family = processes.tree(worker) if worker else []
        if pid in {p.pid for p in family}:
            for p in family:
                p.kill()
            return
    raise AssertionError(f"no worker of the stack runs pid {pid}")


@dataclass
class Faults:
    first: object  # the run whose worker was killed (FlowRun, final)
    second: object  # the run triggered with it (FlowRun, final)
    second_states: set[str]  # every state name the second run was seen in
    champion_before: str | None
    champion_at_crash: str | None
    versions_before: set[str]
    mlflow_restart: tuple[float, int, int]  # (time, old pid, new pid)


@pytest.fixture(scope="session")
def faults(stack, deployment_run) -> Faults:
    """Two deployment runs triggered at once. The one that starts first loses its worker
    mid-run; the other waits for the concurrency slot, runs on the other worker, and the
    MLflow server is restarted between its training and its registration. Then the dead
    worker is started again, as `esmm stack up` would."""
    from prefect.deployments import run_deployment

    with stack.client():
        champion, before = _champion(stack), {v.version for v in _versions(stack)}
        ids = [run_deployment(DEPLOYMENT, timeout=0).id for _ in range(2)]
        seen: dict = {i: set() for i in ids}
        observed: dict = {}

        def running() -> list:
            runs = {i: _flow_run(i) for i in ids}
            for i, run in runs.items():
                seen[i].add(run.state_name)
            return [i for i, run in runs.items() if run.state.type.value == "RUNNING"]

        first = _wait(running, 600, "a run to start")[0]
        second = next(i for i in ids if i != first)
        _wait(lambda: running() and "ingest" in _task_states(first), 600, "the first run's flow")
        _kill_worker_of(stack, first)

        def progress() -> bool:
            running()
            if "crash" not in observed and _flow_run(first).state.type.value in TERMINAL:
                observed["crash"] = _champion(stack)
            if "restart" not in observed and _task_states(second).get("train") == "COMPLETED":
                old = processes.process(stack.root, "mlflow").pid
                processes.stop(stack.root, ["mlflow"])
                at = time.time()
                time.sleep(2)
                lifecycle.start_parts(stack.root, ["mlflow"])
                observed["restart"] = (at, old, processes.process(stack.root, "mlflow").pid)
            return all(_flow_run(i).state.type.value in TERMINAL for i in ids)

        _wait(progress, 1500, "both runs to end", interval=2)
        result = Faults(
            _flow_run(first),
            _flow_run(second),
            seen[second],
            champion,
            observed.get("crash"),
            before,
            observed.get("restart"),
        )
    lifecycle.start_parts(stack.root, ["worker-1", "worker-2"])
    return result


def test_a_worker_killed_mid_run_crashes_the_run_and_keeps_the_champion(stack, faults):
    assert faults.first.state.type.value == "CRASHED", faults.first.state
    assert faults.champion_at_crash == faults.champion_before
    assert all(processes.process(stack.root, f"worker-{i}") for i in (1, 2))  # restarted


def test_two_runs_at_once_the_second_waits_and_one_champion_results(stack, faults):
    second = faults.second
    assert second.state.is_completed(), second.state  # the next run succeeds
    assert "AwaitingConcurrencySlot" in faults.second_states, faults.second_states
    with stack.client():
        client = stack.mlflow()
        new = sorted({v.version for v in _versions(stack)} - faults.versions_before, key=int)
        assert len(new) == 1, new  # the crashed run registered nothing
        champion = client.get_model_version_by_alias("esmm", "champion")
        assert str(champion.version) == new[0]
        holders = [
            v
            for v in _versions(stack)
            if "champion" in client.get_model_version("esmm", v.version).aliases
        ]
        assert [v.version for v in holders] == [champion.version]
    history = stack.esmm("champions")
    assert history.stdout.strip().splitlines()[-1].split()[5] == champion.version


def test_registration_survives_a_tracking_server_restart(stack, faults):
    assert faults.mlflow_restart is not None, "the second run never finished training"
    restarted_at, old_pid, new_pid = faults.mlflow_restart
    assert new_pid != old_pid
    with stack.client():
        client = stack.mlflow()
        new = [v for v in _versions(stack) if v.version not in faults.versions_before]
        assert len(new) == 1  # registered once, nothing half-registered beside it
        version = client.get_model_version("esmm", new[0].version)
        assert version.creation_timestamp / 1000 > restarted_at
        assert {"challenger", "champion"} <= set(version.aliases)
        assert {"gate_passed", "data_version", "git_commit", "metric.ctr_auc"} <= set(version.tags)
        assert client.get_run(version.run_id).data.metrics["ctr_auc"] > 0.5


def test_postgres_stopped_commands_fail_with_one_line_naming_the_server(stack):
    pg_dir = stack.root / "pg"
    postgres.stop(pg_dir)
    try:
        champions = stack.esmm("champions", timeout=300)
        schedule = stack.esmm("schedule", timeout=300)
    finally:
        postgres.start(pg_dir, "127.0.0.1", stack.ports["pg"])
    for proc, server in ((champions, "MLflow tracking server"), (schedule, "Prefect server")):
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"error: {server} http://127.0.0.1:"), lines[0]
        assert f"PostgreSQL at 127.0.0.1:{stack.ports['pg']} refuses connections" in lines[0]


def test_stack_down_leaves_no_process_and_no_open_port(stack):
    procs = [
        p
        for name in ("mlflow", "prefect", "worker-1", "worker-2")
        if (top := processes.process(stack.root, name))
        for p in processes.tree(top)
    ]
    assert procs
    proc = stack.esmm("stack", "down", "--dir", str(stack.root))
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not postgres.running(stack.root / "pg")
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    for port in stack.ports.values():
        assert f"127.0.0.1:{port} " not in listening
    status = stack.esmm("stack", "status", "--dir", str(stack.root))
    assert status.returncode == 1 and "up  " not in status.stdout
