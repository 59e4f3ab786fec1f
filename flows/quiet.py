"""Quiet output: the environment every process we start inherits, and the warning filters of
this one, so that a run shows what the user can act on and not third-party start-up noise.

Set in the environment (not only as `warnings` filters here) because most of the noise comes
from child processes: DVC's stage commands, Beam's worker processes, MLflow's server. Each
entry names the noise it silences; nothing here hides an error or a warning about our data.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# Variable -> value, each only set when the user has not set it already.
QUIET_ENVIRONMENT: dict[str, str] = {
    # TensorFlow's C++ start-up log (CUDA probing on a CPU machine, oneDNN notices).
    "TF_CPP_MIN_LOG_LEVEL": "3",
    # Google client libraries' Python-version FutureWarnings, printed by every Beam worker
    # process at import (the CLI's own filter never reaches those processes). Python's -W
    # syntax matches a module name exactly, not as a pattern, so the category is the key.
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    # Offline runs: no telemetry, no notice about it.
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    # Prefect's temporary server: its start-up banner and database set-up at INFO.
    "PREFECT_LOGGING_LOGGERS_PREFECT_SERVER_LEVEL": "WARNING",
    # MLflow's SQLite store logs each table creation and migration at INFO on first use.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # MLflow's per-file download bar (fetching the champion: dozens of lines when not a tty).
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}

# Third-party loggers whose INFO/WARNING lines say nothing the user can act on.
_QUIET_LOGGERS = {
    "alembic": logging.WARNING,  # MLflow's database migrations on a new mlflow.db
    "alembic.runtime.migration": logging.WARNING,
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables"
    "apache_beam": logging.ERROR,  # worker start-up, runner choice, "Missing pipeline option"
    "absl": logging.ERROR,
    "tensorflow": logging.ERROR,
}

# Warning messages (regular expressions) filtered in this process.
_QUIET_MESSAGES = (
    r"`shuffle=True` was passed",  # Keras, about tf.data inputs; our pipeline shuffles
    r".*[Tt]ype hint",  # MLflow's "add type hints to the predict method" for pyfunc models
    r"Any type hint is inferred",
    r".*IPython",  # TFDV's notice that its display helpers need IPython
)

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def quiet_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: a copy of os.environ) with `QUIET_ENVIRONMENT` filled in."""
    out = dict(os.environ if env is None else env)
    for key, value in QUIET_ENVIRONMENT.items():
        out.setdefault(key, value)
    return out


def quiet_this_process() -> None:
    """Quiet this process and, through os.environ, every process it starts."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for message in _QUIET_MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
