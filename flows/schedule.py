"""Scheduled retraining: the retraining flow served as a Prefect deployment on a cron schedule.

`esmm schedule` serves the deployment from this process (a Prefect runner polls the server
for due runs and executes them here, in the repository). Schedules need a real Prefect
server: with `PREFECT_API_URL` unset, one is started on loopback for as long as the command
runs; with it set, the deployment goes to that server instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.config import ScheduleConfig


class ServerError(RuntimeError):
    """The local Prefect server did not come up."""


def api_url(host: str, port: int) -> str:
    return f"http://{host}:{port}/api"


def wait_healthy(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `<url>/health` until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServerError(
                f"prefect server exited with code {process.returncode} while starting"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise ServerError(f"no healthy Prefect server at {url} after {timeout:.0f} s")


@contextmanager
def local_server(host: str, port: int, log_path: Path, timeout: float = 180) -> Iterator[str]:
    """A real `prefect server start` on host:port for the duration of the block; yields its API URL.

    Its output goes to `log_path`; the server's database lives under `PREFECT_HOME`.
    """
    url = api_url(host, port)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                host,
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        try:
            wait_healthy(url, timeout, process)
        except ServerError as err:
            raise ServerError(f"{err}; see {log_path}") from None
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def check_schedule(cfg: ScheduleConfig) -> None:
    """Refuse a cron expression or time zone Prefect would refuse, before anything starts.

    Raises:
        ValueError: naming the setting, the value and the expected form.
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cfg.cron, timezone=cfg.timezone)
    except ValidationError as err:
        problem = err.errors()[0]
        setting = "timezone" if "timezone" in problem["loc"] else "cron"
        value = cfg.timezone if setting == "timezone" else cfg.cron
        expected = (
            "an IANA time zone such as UTC or Europe/Berlin"
            if setting == "timezone"
            else 'five fields "minute hour day month weekday", e.g. "0 2 * * *" for 02:00 daily'
        )
        flag = " (or --cron)" if setting == "cron" else ""
        raise ValueError(
            f"schedule.{setting}{flag} {value!r} is not valid: use {expected}"
        ) from None


def deployment_name(cfg: ScheduleConfig) -> str:
    """The full name `run_deployment` and `prefect deployment run` take."""
    from flows.retrain import retrain

    return f"{retrain.name}/{cfg.deployment}"


def serve_retraining(cfg: ScheduleConfig, params_path: str = "params.yaml") -> None:
    """Create (or update) the scheduled deployment and execute its runs until interrupted."""
    from prefect import serve
    from prefect.schedules import Cron

    from flows.retrain import retrain

    deployment = retrain.to_deployment(
        name=cfg.deployment,
        schedule=Cron(cfg.cron, timezone=cfg.timezone),
        parameters={"params_path": params_path},
        description="Nightly ESMM retraining: ingest, validate, train, evaluate, gate, register",
        tags=["esmm", "retraining"],
    )
    serve(deployment, limit=1)  # one retraining at a time: runs share artifacts/
