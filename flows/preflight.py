"""Checks the CLI runs before a command's slow imports (TensorFlow, Beam, TFDV, MLflow) or
before it starts anything: each refusal is a `PreflightError` whose message names what is
missing and what to run, which the CLI prints as one line with exit code 1.
"""

from __future__ import annotations

from pathlib import Path

from tasks.layout import Layout

SQLITE = "sqlite:///"


class PreflightError(RuntimeError):
    """A command cannot start: the message says what is missing and what to run."""


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def require_inputs(layout: Layout, step: str) -> None:
    """Refuse `step` (a `dvc.yaml` stage name) when the outputs it reads are absent.

    Raises:
        PreflightError: e.g. `no ingested data at artifacts/ingest: run esmm ingest (or dvc
            repro validate)`.
    """
    ingested = layout.vocab_path.is_file() and all(
        layout.split_dir(split).is_dir() for split in ("train", "valid", "test")
    )
    no_ingest = (ingested, f"no ingested data at {_shown(layout.ingest_dir)}", "esmm ingest")
    no_model = (
        layout.model_path.is_file(),
        f"no trained model at {_shown(layout.model_path)}",
        "esmm train",
    )
    needs = {
        "ingest": [
            (
                layout.raw_dir.is_dir(),
                f"no raw data at {_shown(layout.raw_dir)}",
                "esmm data pull (or esmm data add FOLDER)",
            )
        ],
        "validate": [no_ingest],
        "train": [no_ingest],
        "evaluate": [no_model, no_ingest],
        "register": [
            no_model,
            (
                layout.metrics_path.is_file(),
                f"no evaluation at {_shown(layout.metrics_path)}",
                "esmm evaluate",
            ),
        ],
    }[step]
    for present, what, fix in needs:
        if not present:
            raise PreflightError(f"{what}: run {fix} (or dvc repro {step})")


def require_registry(tracking_uri: str, model_name: str) -> None:
    """Refuse at once when a SQLite registry file does not exist (without importing MLflow,
    whose first connection would create an empty one).

    Raises:
        PreflightError: naming the file and how to register a model.
    """
    if tracking_uri.startswith(SQLITE) and not Path(tracking_uri[len(SQLITE) :]).is_file():
        raise PreflightError(
            f"no model registry at {tracking_uri[len(SQLITE) :]} (register.tracking_uri, or "
            "ESMM_TRACKING_URI for a tracking server), so "
            f"no champion of {model_name!r}: run esmm retrain (or dvc repro, then esmm "
            "promote VERSION), or pass --model-uri"
        )


def require_alias(tracking_uri: str, model_name: str, alias: str = "champion") -> None:
    """Refuse when the registry has no `alias` (e.g. `champion`) of `model_name`.

    Raises:
        PreflightError: naming the registry and how to set the alias.
    """
    from mlflow.exceptions import MlflowException  # MLflow: seconds, only when needed

    from tasks.tracking import mlflow_client

    try:
        mlflow_client(tracking_uri).get_model_version_by_alias(model_name, alias)
    except MlflowException as err:
        how = (
            "run esmm retrain (or dvc repro, then esmm promote VERSION), or pass --model-uri"
            if alias == "champion"
            else "set it (esmm promote moves champion; MLflow's set_registered_model_alias any)"
        )
        raise PreflightError(
            f"no {alias} of {model_name!r} in the registry at {tracking_uri}: {how}"
        ) from err


def check_scored(scored: int, read: int, limit: float, bad_lines: Path) -> None:
    """Refuse a batch scoring where nothing, or more than `limit` of the impressions, could
    be scored (the same kind of threshold as ingestion's `max_quarantine_fraction`).

    Raises:
        PreflightError: with the counts, the threshold and where the reasons are listed.
    """
    if not scored:
        raise PreflightError(
            f"no impression could be scored ({read:,} lines read); reasons in {bad_lines}"
        )
    share = (read - scored) / read
    if share > limit:
        raise PreflightError(
            f"{read - scored:,} of {read:,} impressions ({share:.2%}) could not be scored, "
            f"above --max-bad-fraction {limit:.2%} (default ingest.max_quarantine_fraction); "
            f"reasons in {bad_lines}"
        )
