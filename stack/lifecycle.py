"""`stack up`, `status` and `down`: the parts started in order, checked, stopped.

`up` is idempotent: it starts what is not running (a dead worker is restarted) and leaves
the rest. Order: PostgreSQL, its databases, the MLflow and Prefect servers, the work pool
and automation, the deployment, the workers; then the settings file. `down` stops them in
reverse and leaves the data (databases, artefacts, DVC remote) for the next `up`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stack import deploy, postgres, processes, services
from stack.settings import (
    StackConfig,
    client_settings,
    load_config,
    load_secrets,
    save_config,
    write_settings,
)
from tasks.config import ScheduleConfig

Say = Callable[[str], None]


@dataclass(frozen=True)
class Part:
    name: str
    up: bool
    detail: str


def _start_services(directory: Path, todo: list[services.Service], project: Path, say: Say) -> None:
    """Start the services together, then wait for each to answer."""
    pids = [processes.start(directory, s.name, s.cmd, s.env, project) for s in todo]
    for service, pid in zip(todo, pids, strict=True):
        if service.health:
            processes.wait_http(service.health, service.timeout, directory, service.name)
        log = processes.log_file(directory, service.name)
        say(f"{service.name:<10} up (pid {pid}, log {log})")


def _service(
    directory: Path, cfg: StackConfig, secret: dict[str, str], name: str
) -> services.Service:
    if name == "mlflow":
        return services.mlflow_server(directory, cfg, secret)
    if name == "prefect":
        return services.prefect_server(directory, cfg, secret)
    index = int(name.removeprefix("worker-"))
    return services.worker(directory, cfg, client_settings(cfg, secret), index)


def start_parts(directory: Path, names: list[str], say: Say = lambda _: None) -> None:
    """Start servers or workers of a configured stack (`mlflow`, `prefect`, `worker-N`) that
    are not running, and wait until they answer."""
    cfg = load_config(directory)
    if cfg is None:
        raise processes.ServiceError(f"no stack in {directory}")
    secret = load_secrets(directory)
    todo = [_service(directory, cfg, secret, name) for name in names]
    _start_services(directory, todo, Path(cfg.project), say)


def _share_data(project: Path, remote: str, say: Say) -> None:
    """Make `remote` a DVC remote of the project (this checkout only) and push the data."""
    _dvc(project, "remote", "add", "--local", "--force", "shared", remote)
    if (project / "data.dvc").is_file() and (project / "data").is_dir():
        _dvc(project, "push", "-q", "-r", "shared", "data.dvc")
        say(f"dvc remote up (data pushed to {remote})")


def _dvc(project: Path, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True
    )
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines() or [str(proc.returncode)]
        raise processes.ServiceError(f"dvc {args[0]} failed: {detail[-1]}")


def _client_env(settings: dict[str, str]) -> None:
    """Point this process's Prefect client at the stack (set before Prefect is imported)."""
    os.environ.update(settings)


def up(directory: Path, cfg: StackConfig, schedule: ScheduleConfig, say: Say) -> Path:
    """Start every part that is not running; returns the settings file."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o711)  # PostgreSQL's own account must be able to enter it
    cfg.dvc_remote = cfg.dvc_remote or str(directory / "dvc-remote")
    cfg.source = cfg.source or cfg.project
    save_config(directory, cfg)
    secret = load_secrets(directory)
    pg_dir = directory / "pg"
    postgres.init_cluster(pg_dir, secret["PG_PASSWORD"])
    postgres.start(pg_dir, cfg.host, cfg.pg_port)
    postgres.create_databases(cfg.host, cfg.pg_port, secret["PG_PASSWORD"])
    say(f"postgres   up ({cfg.host}:{cfg.pg_port}, data {pg_dir / 'data'})")
    start_parts(directory, ["mlflow", "prefect"], say)
    settings = client_settings(cfg, secret)
    _client_env(settings)
    deploy.ensure_work_pool(cfg.pool)
    deploy.ensure_zombie_automation()
    if not cfg.dvc_remote.startswith(("s3://", "gs://", "azure://")):
        Path(cfg.dvc_remote).mkdir(parents=True, exist_ok=True)
    _share_data(Path(cfg.project), cfg.dvc_remote, say)
    name = deploy.register_deployment(schedule, cfg.pool, cfg.source, cfg.dvc_remote)
    say(f"deployment {name} on pool {cfg.pool!r}, cron '{schedule.cron}' ({schedule.timezone})")
    start_parts(directory, [f"worker-{i}" for i in range(1, cfg.workers + 1)], say)
    return write_settings(directory, settings)


def _names(directory: Path, cfg: StackConfig) -> list[str]:
    """Servers first, then every worker configured now or recorded by an earlier `up`."""
    recorded = {p.stem for p in (directory / "run").glob("worker-*.pid")}
    configured = {f"worker-{i}" for i in range(1, cfg.workers + 1)}
    return ["mlflow", "prefect", *sorted(recorded | configured)]


def status(directory: Path) -> list[Part]:
    """Each part: running or not, and where."""
    cfg = load_config(directory)
    if cfg is None:
        return []
    parts = [Part("postgres", postgres.running(directory / "pg"), f"{cfg.host}:{cfg.pg_port}")]
    urls = {"mlflow": cfg.mlflow_url, "prefect": cfg.prefect_api_url}
    for name in _names(directory, cfg):
        proc = processes.process(directory, name)
        where = urls.get(name, f"pool {cfg.pool}")
        parts.append(Part(name, proc is not None, f"{where} (pid {proc.pid})" if proc else where))
    return parts


def down(directory: Path, say: Say) -> None:
    """Stop workers, servers and PostgreSQL (data kept)."""
    cfg = load_config(directory)
    if cfg is None:
        say(f"no stack in {directory}")
        return
    names = _names(directory, cfg)
    # Workers first (a run they hold ends while the servers can still record it).
    for batch in (names[2:], names[:2]):
        for name in processes.stop(directory, batch):
            say(f"{name:<10} stopped")
    if postgres.running(directory / "pg"):
        postgres.stop(directory / "pg")
        say("postgres   stopped")
