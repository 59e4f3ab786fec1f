"""Shared fixtures: tiny Ali-CCP-format data and throwaway project repositories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Stages run `esmm` from the project's environment, offline and quietly.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
for key, value in {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}.items():
    os.environ.setdefault(key, value)

SMALL = {"train": 4000, "test": 1500, "seed": 7}
# Small but complete: every stage runs for real, just on little data with a small model.
SMALL_PARAMS = {
    "synth": {**SMALL, "profile": "default"},
    "ingest": {"valid_fraction": 0.15, "min_count": 1},
    # One in-process Beam worker: on tiny data, starting worker processes costs more than it
    # saves (multi-process statistics have their own equality test).
    "validate": {"beam_options": ["--direct_running_mode=in_memory", "--direct_num_workers=1"]},
    "model": {"embedding_dim": 4, "ctr_tower": {"units": [16]}, "cvr_tower": {"units": [16]}},
    "train": {"batch_size": 128, "epochs": 3, "learning_rate": 0.01, "seed": 1},
    # Floors that a model which learned something clears on 4k impressions (it reaches about
    # 0.59 / 0.65); CVR on ~125 test clicks is too noisy to gate here. The gate logic has its
    # own tests.
    "evaluate": {"min_ctr_auc": 0.53, "min_ctcvr_auc": 0.53, "min_cvr_auc_clicked": 0.0},
}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory) -> Path:
    """A small raw Ali-CCP folder written by the generator (read-only for tests)."""
    from aliccp.synth import synthesize_ali_ccp

    out = tmp_path_factory.mktemp("raw") / "data"
    synthesize_ali_ccp(out, SMALL["train"], SMALL["test"], SMALL["seed"])
    return out


def make_project(root: Path, raw: Path, overrides: dict | None = None) -> Path:
    """A git + DVC repository laid out like this one, with `raw` added as data.dvc."""
    root.mkdir(parents=True, exist_ok=True)
    for item in ("dvc.yaml", "tasks", "models", "flows", "aliccp", "serving", "schema"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    merge_params(root, {**SMALL_PARAMS, **(overrides or {})})
    shutil.copytree(raw, root / "data")
    run(["git", "init", "-q"], root)
    run([sys.executable, "-m", "dvc", "init", "-q"], root)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    run([sys.executable, "-m", "dvc", "add", "-q", "data"], root)
    with open(root / ".gitignore", "a") as fh:  # after dvc add's own `/data` entry
        fh.write("/artifacts/\nmlflow.db\nmlruns/\n__pycache__/\n")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "project"], root)
    return root


def merge_params(project: Path, overrides: dict) -> None:
    """Merge `overrides` (section -> values, nested) into the project's params.yaml."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        params[section] = _merge(params.get(section) or {}, values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def repro(project: Path) -> str:
    """`dvc repro` in `project`; its output."""
    return run([sys.executable, "-m", "dvc", "repro"], project).stdout


def add_local_remote(project: Path, remote: Path) -> None:
    """Make a folder the project's default DVC remote."""
    run([sys.executable, "-m", "dvc", "remote", "add", "-q", "-d", "local", str(remote)], project)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


@pytest.fixture(autouse=True)
def _no_stale_dvc_log_handlers():
    """DVC's in-process CLI binds its log handlers to the streams of the test that first ran
    it; pytest closes those, and DVC then fails to log in a later test of this process."""
    yield
    import logging

    for name in ("dvc", "dvc_objects", "dvc_data"):  # the loggers dvc.logger.setup() equips
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)


@pytest.fixture(autouse=True)
def _mlflow_uris_left_as_found():
    """No test leaves MLflow's process-wide URIs changed (the MLFLOW_*_URI variables child
    processes inherit, and MLflow's module state): a later test, or a server it starts,
    would read another test's store."""
    before = _mlflow_uris()
    yield
    after = _mlflow_uris()
    if "module" in after:  # first imported in this test: unset before it
        before.setdefault("module", (None, None))
    else:  # the test dropped MLflow from sys.modules: only the variables remain to compare
        before.pop("module", None)
    assert after == before, f"this test left MLflow's URIs changed: {before} -> {after}"


def _mlflow_uris() -> dict:
    state = {"env": tuple(os.environ.get(f"MLFLOW_{n}_URI") for n in ("TRACKING", "REGISTRY"))}
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        state["module"] = tracking_utils._tracking_uri, registry_utils._registry_uri
    return state


# Test files whose shared fixtures take minutes (a team stack, pipeline runs).
LONG_FIRST = (
    "tests/stack/test_stack.py",
    "tests/flows/test_retrain.py",
    "tests/flows/test_nightly.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long files first: under pytest-xdist (`make test`: `--dist loadfile
    --no-loadscope-reorder`) they start at once and the short files fill in around them."""

    def rank(item: pytest.Item) -> int:
        path = item.nodeid
        return next((i for i, p in enumerate(LONG_FIRST) if path.startswith(p)), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the order within each rank is kept
