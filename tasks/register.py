"""Registration step: one trained model becomes a new version of one registered model.

`register_esmm` logs the run to MLflow (parameters, metrics, per-epoch curves, artefacts,
the raw data as its input data set, the serving model), registers the model tagged with the
data version, git commit, parameters and schema digests, its metrics and the gate verdict,
gives it the alias `challenger`, and promotes it to `champion` through `tasks.champion` when
the gate passed and `register.promote` is `gate`. Where MLflow lives is `tasks.tracking`'s.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.champion import CHALLENGER, CHAMPION, promote
from tasks.config import Params, RegisterConfig
from tasks.evaluate import HEADLINE, GateVerdict
from tasks.tracking import mlflow_client, mlflow_uris, resolve_tracking_uri, wait_for_server


@dataclass(frozen=True)
class Registration:
    model_name: str
    version: str
    aliases: list[str]
    run_id: str
    data_version: str
    tracking_uri: str
    gate_passed: bool = True
    gate_reasons: tuple[str, ...] = ()
    previous_champion: str | None = None  # the champion before this run (if it moved)

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


def git_commit(cwd: Path | None = None) -> str:
    """The checked-out commit, or "unknown" outside a git repository."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def params_digest(params: Params) -> str:
    """sha256 of the canonical JSON of the full configuration."""
    canonical = json.dumps(
        params.model_dump(by_alias=True, mode="json"), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def schema_digest(schema_dir: Path) -> str:
    """sha256 over the names and contents of `schema_dir/*.pbtxt` ("none" without any)."""
    files = sorted(Path(schema_dir).glob("*.pbtxt"))
    if not files:
        return "none"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _log_model(model_path: Path, cfg: RegisterConfig):
    """Log the trained model to the active run as the serving model; returns its `ModelInfo`.

    The serving model (serving/pyfunc.py) is a models-from-code pyfunc taking raw records; it
    carries the `.keras` file, which the evaluate step re-scores for the champion.
    """
    from serving.pyfunc import log_serving_model

    return log_serving_model(model_path, name="model")


def _metric_tags(metrics: dict, champion: dict | None) -> dict[str, str]:
    tags = {f"metric.{k}": f"{metrics[k]:.6g}" for k in HEADLINE if k in metrics}
    if champion:
        tags["compared_with_champion"] = str(champion["version"])
        tags |= {f"champion.{k}": f"{champion[k]:.6g}" for k in HEADLINE if k in champion}
    return tags


def register_esmm(
    model_path: Path,
    metrics: dict[str, float],
    verdict: GateVerdict,
    data_version: str,
    params: Params,
    out_dir: Path,
    champion_metrics: dict | None = None,
    artifacts: list[tuple[str, Path]] | None = None,
    history: dict | None = None,
    raw_dir: Path | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Registration:
    """Log params, metrics, artefacts and the model to MLflow; register it as a new version
    with `challenger`, and promote it to `champion` (through `promote`) when the gate passed
    and `register.promote` is `gate`.

    Args:
        model_path: the trained `.keras` model.
        metrics: evaluation metrics of that model (nested dicts are flattened).
        verdict: the gate verdict; `champion` moves only when it passed.
        data_version: the DVC md5 of the raw data the model was trained on.
        params: the full configuration, logged as run parameters.
        out_dir: where `registration.json` is written.
        champion_metrics: the champion's metrics on the same test split, if there was one.
        artifacts: (artefact folder, file or folder) pairs to log; missing ones are skipped.
        history: training's `history.json` (per-epoch metrics, logged as steps 0, 1, ...).
        raw_dir: the raw data folder, recorded as the run's input data set (`log_input`).
        extra_tags: more lineage tags for the run and the version (e.g. `warm_started_from`).

    Returns:
        The registered version, its aliases and the verdict.
    """
    import mlflow

    cfg: RegisterConfig = params.register_
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    wait_for_server(tracking_uri)
    with mlflow_uris(tracking_uri):
        mlflow.set_experiment(cfg.experiment)
        tags = _version_tags(params, verdict, data_version) | (extra_tags or {})
        run_id, model_uri = _log_run(
            model_path,
            cfg,
            params,
            tags,
            flatten(metrics) | flatten({"champion": champion_metrics or {}}),
            history=history or {},
            artifacts=artifacts or [],
            raw_dir=raw_dir,
            data_version=data_version,
        )
        registered = mlflow.register_model(
            model_uri, cfg.model_name, tags=tags | _metric_tags(metrics, champion_metrics)
        )
        version = str(registered.version)
        client = mlflow_client(tracking_uri)
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        aliases, previous = [CHALLENGER], None
        if verdict.passed and cfg.promote == "gate":
            event = promote(
                tracking_uri, cfg.model_name, version, reason=f"gate passed in run {run_id}"
            )
            aliases.append(CHAMPION)
            previous = event.previous
        registration = Registration(
            cfg.model_name,
            version,
            aliases,
            run_id,
            data_version,
            tracking_uri,
            verdict.passed,
            tuple(verdict.reasons),
            previous,
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "registration.json").write_text(json.dumps(asdict(registration), indent=2))
    return registration


def _version_tags(params: Params, verdict: GateVerdict, data_version: str) -> dict[str, str]:
    """The run's and the registered version's lineage and gate tags."""
    return {
        "data_version": data_version,
        "git_commit": git_commit(),
        "params_digest": params_digest(params),
        "schema_digest": schema_digest(Path(params.validate_.schema_dir)),
        "gate_passed": str(verdict.passed).lower(),
        "gate_reasons": "; ".join(verdict.reasons) or "all checks passed",
    }


def _log_run(
    model_path: Path,
    cfg: RegisterConfig,
    params: Params,
    tags: dict[str, str],
    numeric: dict[str, object],
    *,
    history: dict,
    artifacts: list[tuple[str, Path]],
    raw_dir: Path | None,
    data_version: str,
) -> tuple[str, str]:
    """Log one run to the current experiment (MLflow's global URIs are set by the caller):
    `tags`, every parameter, the numeric values of `numeric`, the per-epoch curves, the
    artefacts that exist, the raw data as its input data set and the serving model.

    Returns:
        The run's id and the logged model's URI.
    """
    import mlflow

    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params(flatten(params.model_dump(by_alias=True, mode="json")))
        mlflow.log_metrics(
            {
                k: float(v)
                for k, v in numeric.items()
                if isinstance(v, int | float) and not isinstance(v, bool)
            }
        )
        _log_history(history)
        for folder, path in artifacts:
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), folder)
            elif Path(path).is_file():
                mlflow.log_artifact(str(path), folder)
        with _without_mlflow_notices():
            if raw_dir is not None:
                _log_dataset(Path(raw_dir), data_version)
            info = _log_model(model_path, cfg)
    return run.info.run_id, info.model_uri


# MLflow's advice to add type hints to a pyfunc's predict (ours takes raw records of any
# shape), and its note that a local folder matches two of its data set source types.
_MLFLOW_NOTICES = re.compile(r"Add type hints to the `predict`|can be interpreted in multiple ways")


@contextmanager
def _without_mlflow_notices() -> Iterator[None]:
    """Drop `_MLFLOW_NOTICES` warnings. Filters cannot: MLflow wraps the type-hint check in
    its own `catch_warnings` with a "once" filter ahead of any of ours, so the notices are
    dropped where warnings are shown."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if not _MLFLOW_NOTICES.search(str(message)):
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _log_history(history: dict) -> None:
    """Per-epoch training metrics as MLflow steps (`history.json` holds one list per name),
    so the MLflow UI draws learning curves as autologging would."""
    import mlflow

    for name, values in history.items():
        if not isinstance(values, list):
            continue  # best_epoch, recalibration, replicas: not per-epoch
        for step, value in enumerate(values):
            if isinstance(value, int | float) and not isinstance(value, bool):
                mlflow.log_metric(name, float(value), step=step)


def _log_dataset(raw_dir: Path, data_version: str) -> None:
    """The raw data folder as the run's training input, with the DVC md5 as its digest."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(str(raw_dir.resolve()))
    digest = data_version.removesuffix(".dir")
    dataset = MetaDataset(source, name=f"{raw_dir.name}@{digest[:8]}", digest=digest)
    mlflow.log_input(dataset, context="training", tags={"data_version": data_version})
