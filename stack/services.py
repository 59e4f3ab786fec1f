"""The stack's servers and workers: their commands, environments and health URLs.

- MLflow: `mlflow server` on PostgreSQL (`mlflow` database), artefacts proxied by the
  server into `<stack dir>/mlartifacts` (clients never need its disk), logins by MLflow's
  basic-auth app (users in the `mlflow_auth` database).
- Prefect: `prefect server start` on PostgreSQL (`prefect` database, asyncpg), every API
  call but the health probe needing the basic-auth string.
- Workers: `prefect worker start` on the process work pool, one flow run at a time each,
  in the project directory, with the client settings in their environment.

Passwords reach the processes through their environment or 0600 files, never through
command lines (which every local user can read).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from stack import postgres
from stack.settings import StackConfig, write_private

# Client variables a server must not inherit from the shell that starts it.
_CLIENT_VARS = ("PREFECT_API_URL", "PREFECT_API_KEY", "MLFLOW_TRACKING_URI", "ESMM_SETTINGS")


@dataclass(frozen=True)
class Service:
    name: str
    cmd: list[str]
    env: dict[str, str]
    health: str  # URL that answers 200 without credentials once it is up
    timeout: float = 180


def base_env() -> dict[str, str]:
    """This environment, offline and quiet, with this interpreter's scripts on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARS}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env |= {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    return env


def _auth_ini(directory: Path, cfg: StackConfig) -> Path:
    """MLflow's basic-auth configuration (0600): users live in the `mlflow_auth` database."""
    path = directory / "mlflow-auth.ini"
    users_db = postgres.url(cfg.host, cfg.pg_port, "mlflow_auth")
    write_private(
        path,
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {users_db}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request's password check is a deliberately slow hash (about a second on two
        # busy cores); logging one model makes dozens of requests. Cache good logins for a
        # minute (one server worker: a password change through the API applies at once).
        "auth_cache_ttl_seconds = 60\n",
    )
    return path


def mlflow_server(directory: Path, cfg: StackConfig, secret: dict[str, str]) -> Service:
    artefacts = directory / "mlartifacts"
    artefacts.mkdir(parents=True, exist_ok=True)
    env = base_env() | {
        "MLFLOW_BACKEND_STORE_URI": postgres.url(cfg.host, cfg.pg_port, "mlflow"),
        "PGPASSWORD": secret["PG_PASSWORD"],
        "MLFLOW_AUTH_CONFIG_PATH": str(_auth_ini(directory, cfg)),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret["MLFLOW_ADMIN_PASSWORD"],  # first start only
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret["FLASK_SECRET_KEY"],
        # No GenAI job runners (two extra process pools): the pipeline never submits jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--app-name",
        "basic-auth",
        "--serve-artifacts",
        "--artifacts-destination",
        str(artefacts),
        "--host",
        cfg.host,
        "--port",
        str(cfg.mlflow_port),
        "--workers",
        "1",
    ]
    return Service("mlflow", cmd, env, f"{cfg.mlflow_url}/health")


def prefect_server(directory: Path, cfg: StackConfig, secret: dict[str, str]) -> Service:
    env = base_env() | {
        "PREFECT_HOME": str(directory / "prefect-server"),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres.url(
            cfg.host, cfg.pg_port, "prefect", secret["PG_PASSWORD"], driver="asyncpg"
        ),
        "PREFECT_SERVER_API_AUTH_STRING": secret["PREFECT_AUTH"],
        "PREFECT_API_AUTH_STRING": secret["PREFECT_AUTH"],
        # A crashed run's deployment concurrency slot is released after this lease.
        "PREFECT_SERVER_CONCURRENCY_INITIAL_DEPLOYMENT_LEASE_DURATION": "60",
    }
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "server",
        "start",
        "--host",
        cfg.host,
        "--port",
        str(cfg.prefect_port),
    ]
    return Service("prefect", cmd, env, f"{cfg.prefect_api_url}/health")


def worker(directory: Path, cfg: StackConfig, settings: dict[str, str], index: int) -> Service:
    env = (
        base_env()
        | settings
        | {
            "PREFECT_HOME": str(directory / "prefect-client"),
            # Flow runs beat every 30 s (Prefect's minimum); the stack's automation marks a run
            # whose beats stop (its worker died) Crashed.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        }
    )
    name = f"worker-{index}"
    cmd = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        cfg.pool,
        "--type",
        "process",
        "--name",
        f"esmm-{name}",
        "--limit",
        "1",
    ]
    return Service(name, cmd, env, "")
