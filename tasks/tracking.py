"""The MLflow tracking server or store every registry call talks to.

Which URI (`resolve_tracking_uri`: a team stack's server named by ESMM_TRACKING_URI, else
`register.tracking_uri`, a relative SQLite path made absolute), MLflow's process-wide URIs set
for one block only (`mlflow_uris`), waiting for a restarting server (`wait_for_server`), and a
client bound to one URI (`mlflow_client`). MLflow itself is imported only when a call needs it.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A team's tracking server (`esmm stack up` writes it to the settings file) overrides
# `register.tracking_uri`; MLflow's own MLFLOW_TRACKING_URI cannot serve, as every
# `mlflow.set_tracking_uri` call in a process rewrites it.
TRACKING_URI_ENV = "ESMM_TRACKING_URI"
SERVER_WAIT_SECONDS = 180  # how long registry calls wait for a restarting tracking server


def resolve_tracking_uri(uri: str, root: Path | None = None) -> str:
    """The tracking URI to use: ESMM_TRACKING_URI when set, else `uri`, a relative
    `sqlite:///file.db` made absolute (against `root`, default the cwd).

    MLflow caches one store per URI string, so a relative path would keep pointing at the
    first directory it was resolved in.
    """
    uri = os.environ.get(TRACKING_URI_ENV) or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((root or Path.cwd()) / uri[len(prefix) :])
    return uri


@contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs (what its fluent API, `mlflow.start_run`
    and `models:/` URIs use) set to `uri` for the block, then restored exactly.

    `mlflow.set_tracking_uri` also exports MLFLOW_TRACKING_URI to every later child process,
    so a step run in a long-lived process (the flow, a test session, a notebook) would leave
    its store behind for whatever comes next. MLflow has no public way to unset the URIs;
    the module attributes below are the ones `set_*_uri` write (mlflow 3, pinned).
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    saved_env = {name: os.environ.get(name) for name in names}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def wait_for_server(tracking_uri: str, timeout: float = SERVER_WAIT_SECONDS) -> None:
    """For an http(s) tracking URI, wait until the server's `/health` answers (a server
    restarting between training and registration); a no-op for local stores.

    Raises:
        ConnectionError: no answer within `timeout` seconds, naming the server.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise ConnectionError(
                f"MLflow tracking server {tracking_uri}: no answer in {timeout:.0f} s"
            )
        time.sleep(1)


def mlflow_client(tracking_uri: str):
    """An `MlflowClient` for `tracking_uri` as both tracking and registry URI, once its
    server (if any) answers."""
    from mlflow import MlflowClient

    wait_for_server(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
