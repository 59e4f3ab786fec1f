"""Registration step: log the run to MLflow and register the model with aliases.

Every trained model becomes a new version of one registered model, tagged with the data
version it was trained on and the gate verdict. The new version gets the alias
`challenger`; it also gets `champion` when the gate passed.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.config import Params, RegisterConfig
from tasks.evaluate import GateVerdict

CHALLENGER = "challenger"
CHAMPION = "champion"

# What the logged model needs to be loaded again; pinned like requirements.lock.
MODEL_REQUIREMENTS = ["tensorflow==2.16.2", "keras==3.15.1", "numpy==1.26.4"]


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    aliases: list[str]
    run_id: str
    data_version: str
    tracking_uri: str

    @property
    def uri(self) -> str:
        return f"models:/{self.model_name}/{self.version}"


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"train": {"epochs": 2}} -> {"train.epochs": 2}."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def resolve_tracking_uri(uri: str, root: Path | None = None) -> str:
    """Make a relative `sqlite:///file.db` URI absolute (against `root`, default the cwd).

    MLflow caches one store per URI string, so a relative path would keep pointing at the
    first directory it was resolved in.
    """
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str((root or Path.cwd()) / uri[len(prefix) :])
    return uri


def git_commit(cwd: Path | None = None) -> str:
    """The checked-out commit, or "unknown" outside a git repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def register_esmm(
    model_path: Path,
    metrics: dict[str, float],
    verdict: GateVerdict,
    data_version: str,
    params: Params,
    out_dir: Path,
) -> Registration:
    """Log params, metrics and the model to MLflow; register it and set its aliases.

    Args:
        model_path: the trained `.keras` model.
        metrics: evaluation metrics of that model.
        verdict: the gate verdict; `champion` moves only when it passed.
        data_version: the DVC md5 of the raw data the model was trained on.
        params: the full configuration, logged as run parameters.
        out_dir: where `registration.json` is written.

    Returns:
        The registered version and its aliases.
    """
    import keras
    import mlflow
    from mlflow import MlflowClient

    import models.esmm  # noqa: F401  (registers the custom layers for loading)

    cfg: RegisterConfig = params.register_
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(cfg.experiment)
    tags = {
        "data_version": data_version,
        "git_commit": git_commit(),
        "gate_passed": str(verdict.passed).lower(),
        "gate_reasons": "; ".join(verdict.reasons) or "all checks passed",
    }
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params(flatten(params.model_dump(by_alias=True, mode="json")))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        info = mlflow.keras.log_model(
            keras.models.load_model(model_path),
            name="model",
            registered_model_name=cfg.model_name,
            pip_requirements=MODEL_REQUIREMENTS,
        )
    version = str(info.registered_model_version)
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.model_name, version, key, value)
    aliases = [CHALLENGER] + ([CHAMPION] if verdict.passed else [])
    for alias in aliases:
        client.set_registered_model_alias(cfg.model_name, alias, version)
    registration = Registration(
        cfg.model_name, version, aliases, run.info.run_id, data_version, tracking_uri
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "registration.json").write_text(json.dumps(asdict(registration), indent=2))
    return registration
