"""`esmm stack up | status | down`, and how every `esmm` command reports a server it cannot use.

The commands only wire options to `stack.lifecycle`. `server_errors` turns a failure to
reach the team's MLflow or Prefect server (or the PostgreSQL behind them) into one line
naming that server, instead of a traceback.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from stack.settings import (
    DATABASE_ENV,
    DVC_REMOTE_ENV,
    SOURCE_ENV,
    TRACKING_URI_ENV,
    WORK_POOL_ENV,
    StackConfig,
    stack_dir,
)
from tasks.config import ScheduleConfig

stack_app = typer.Typer(
    help="The team deployment on this machine: PostgreSQL, MLflow and Prefect servers, "
    "a work pool with workers, a shared DVC remote.",
    no_args_is_help=True,
)
DIR = typer.Option(None, "--dir", help="Stack directory (default: ESMM_STACK_DIR or .stack).")


@stack_app.command("up")
def up(
    directory: Path = DIR,
    workers: int = typer.Option(2, "--workers", min=1, help="Process workers on the pool."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; anything but loopback exposes the stack."
    ),
    pg_port: int = typer.Option(5433, "--pg-port"),
    mlflow_port: int = typer.Option(5000, "--mlflow-port"),
    prefect_port: int = typer.Option(4200, "--prefect-port"),
    source: str = typer.Option(
        "", "--source", help="Git repository the deployment clones (default: this one)."
    ),
    dvc_remote: str = typer.Option(
        "", "--dvc-remote", help="Shared DVC remote: a folder every worker mounts, or s3://..."
    ),
    params: Path = typer.Option(Path("params.yaml"), "--params", "-p"),
) -> None:
    """Start (or complete) the stack and write its settings file (mode 0600)."""
    from stack.lifecycle import up as stack_up
    from stack.postgres import PostgresError
    from stack.processes import ServiceError
    from tasks.config import load_params

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(
            f"warning: binding to {host} exposes PostgreSQL, both servers and their UIs to "
            "that network; basic auth is clear text without TLS (see docs/team.md)",
            fg=typer.colors.YELLOW,
            err=True,
        )
    cfg = StackConfig(
        host,
        pg_port,
        mlflow_port,
        prefect_port,
        workers,
        "esmm",
        source,
        dvc_remote,
        str(Path.cwd()),
    )
    try:
        path = stack_up(stack_dir(directory), cfg, load_params(params).schedule, typer.echo)
    except (PostgresError, ServiceError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    typer.echo(f"settings   {path} (mode 0600; `esmm` commands here read it)")
    typer.echo(f"MLflow UI  {cfg.mlflow_url}   Prefect UI  {cfg.prefect_api_url[:-4]}")


@stack_app.command("status")
def status(directory: Path = DIR) -> None:
    """Which parts run, and where; exits 1 unless all do."""
    from stack.lifecycle import status as stack_status

    parts = stack_status(stack_dir(directory))
    if not parts:
        typer.echo(f"no stack in {stack_dir(directory)} (esmm stack up starts one)")
    for part in parts:
        typer.echo(f"{part.name:<10} {'up  ' if part.up else 'DOWN'}  {part.detail}")
    if not parts or not all(p.up for p in parts):
        raise typer.Exit(1)


@stack_app.command("down")
def down(directory: Path = DIR) -> None:
    """Stop the workers, the servers and PostgreSQL (their data stays for the next `up`)."""
    from stack.lifecycle import down as stack_down

    stack_down(stack_dir(directory), typer.echo)


def _database_note() -> str:
    """', and PostgreSQL at host:port refuses connections' when the stack's database is down."""
    where = os.environ.get(DATABASE_ENV, "")
    if ":" not in where:
        return ""
    host, port = where.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        return ""
    except OSError:
        return f"; PostgreSQL at {where} refuses connections"


def describe_server_error(err: BaseException) -> str | None:
    """One line naming the server behind `err`, or None if `err` is not about a server."""
    seen: BaseException | None = err
    while seen is not None:
        kind = f"{type(seen).__module__}.{type(seen).__name__}"
        text = (str(seen).strip().splitlines() or [""])[0][:200]
        if isinstance(seen, ConnectionError) and text.startswith("MLflow tracking server"):
            return text + _database_note()
        if kind.startswith(("mlflow.", "requests.")) and (
            "API request" in text or "Connection" in text or "Max retries" in text
        ):
            uri = os.environ.get(TRACKING_URI_ENV, "the MLflow tracking server")
            return f"MLflow tracking server {uri} unavailable{_database_note()} ({text})"
        if kind.startswith(("httpx.", "prefect.")) and (
            "Connect" in type(seen).__name__ or "HTTPStatus" in type(seen).__name__
        ):
            url = os.environ.get("PREFECT_API_URL", "the Prefect server")
            return f"Prefect server {url} unavailable{_database_note()} ({text})"
        seen = seen.__cause__ or seen.__context__
    return None


@contextmanager
def server_errors() -> Iterator[None]:
    """Report an unreachable server in one line (exit 1); other errors pass through."""
    try:
        yield
    except Exception as err:
        line = describe_server_error(err)
        if line is None:
            raise
        typer.secho(f"error: {line}", fg=typer.colors.RED, err=True)
        raise SystemExit(1) from None


def deploy_to_pool(cfg: ScheduleConfig, params: Path) -> str | None:
    """Team mode (the settings name a work pool): register the scheduled deployment with the
    pool, for its workers to run; returns its name. None outside team mode."""
    pool = os.environ.get(WORK_POOL_ENV)
    if not pool:
        return None
    from stack.deploy import register_deployment

    source = os.environ.get(SOURCE_ENV) or str(Path.cwd())
    return register_deployment(cfg, pool, source, os.environ.get(DVC_REMOTE_ENV, ""), str(params))
