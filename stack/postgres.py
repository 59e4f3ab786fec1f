"""PostgreSQL 15 for the stack: a cluster in `<stack dir>/pg`, on loopback, password login.

PostgreSQL refuses to run as root, so under root the cluster belongs to, and runs as, a
system account (`esmm-postgres`, created when missing); any other user runs it as
themselves. Only TCP on the given host is opened (no Unix socket), and every connection
needs the generated password (scram-sha-256).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

PG_BIN = Path(os.environ.get("ESMM_PG_BIN", "/usr/lib/postgresql/15/bin"))
SYSTEM_USER = "esmm-postgres"
DB_USER = "esmm"
DATABASES = ("mlflow", "mlflow_auth", "prefect")


class PostgresError(RuntimeError):
    """The cluster could not be created, started or reached; the message says why."""


def _os_user() -> str | None:
    """The account that runs the cluster: None for the current (non-root) user."""
    return SYSTEM_USER if os.geteuid() == 0 else None


def _as_user(cmd: list[str]) -> list[str]:
    user = _os_user()
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(_as_user(cmd), capture_output=True, text=True, env=env)
    if proc.returncode:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise PostgresError(f"{what} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


def ensure_os_user() -> None:
    """Create the system account that owns the cluster (root only), if it is missing."""
    user = _os_user()
    if user is None:
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            check=True,
        )


def _chown(path: Path) -> None:
    user = _os_user()
    if user:
        shutil.chown(path, user, user)


def _check_reachable(pg_dir: Path) -> None:
    """The cluster's account must be able to enter every folder above its directory."""
    user = _os_user()
    if user and subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(pg_dir)]).returncode:
        raise PostgresError(
            f"user {user} cannot reach {pg_dir} (a parent folder is private): "
            "put the stack elsewhere with `esmm stack up --dir DIR`"
        )


def init_cluster(pg_dir: Path, password: str) -> None:
    """initdb into `pg_dir/data` (once): superuser `esmm`, password auth, loopback only."""
    data = pg_dir / "data"
    if (data / "PG_VERSION").is_file():
        return
    ensure_os_user()
    pg_dir.mkdir(parents=True, exist_ok=True)
    pg_dir.chmod(0o700)
    _chown(pg_dir)
    _check_reachable(pg_dir)
    pwfile = pg_dir / "pwfile"
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    _chown(pwfile)
    try:
        _run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                DB_USER,
                "-A",
                "scram-sha-256",
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
            "initdb",
        )
    finally:
        pwfile.unlink(missing_ok=True)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write("unix_socket_directories = ''\n")


def running(pg_dir: Path) -> bool:
    data = pg_dir / "data"
    if not (data / "postmaster.pid").exists():
        return False
    cmd = _as_user([str(PG_BIN / "pg_ctl"), "-D", str(data), "status"])
    return subprocess.run(cmd, capture_output=True).returncode == 0


def start(pg_dir: Path, host: str, port: int) -> None:
    """Start the cluster on host:port and wait until it accepts connections."""
    if running(pg_dir):
        return
    options = f"-c listen_addresses={host} -p {port}"
    _run(
        [
            str(PG_BIN / "pg_ctl"),
            "-D",
            str(pg_dir / "data"),
            "-l",
            str(pg_dir / "postgres.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        f"starting PostgreSQL on {host}:{port} (log: {pg_dir / 'postgres.log'})",
    )


def stop(pg_dir: Path) -> None:
    if running(pg_dir):
        _run(
            [str(PG_BIN / "pg_ctl"), "-D", str(pg_dir / "data"), "-m", "fast", "-w", "stop"],
            "stopping PostgreSQL",
        )


def create_databases(host: str, port: int, password: str) -> None:
    """Create the MLflow, MLflow-users and Prefect databases that do not exist yet."""
    import psycopg2  # only `stack up` needs a database driver

    conn = psycopg2.connect(
        host=host, port=port, user=DB_USER, password=password, dbname="postgres"
    )
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cur.fetchall()}
            for name in DATABASES:
                if name not in existing:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def url(host: str, port: int, database: str, password: str = "", driver: str = "psycopg2") -> str:
    """A SQLAlchemy URL (SQLAlchemy 2.1's default driver would be psycopg 3, not installed);
    without `password`, libpq takes it from PGPASSWORD."""
    login = f"{DB_USER}:{password}" if password else DB_USER
    return f"postgresql+{driver}://{login}@{host}:{port}/{database}"
