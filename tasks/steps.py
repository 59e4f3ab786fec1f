"""The pipeline steps, each one plain function of the configuration.

These are the single implementations behind both entry points: each is a `dvc.yaml` stage
(`esmm <step>`), which `dvc repro` runs and the Prefect flow runs through DVC, one task per
stage (flows/retrain.py), so both share one pipeline state.
Paths come from `tasks.layout.Layout`, relative to the working directory (the repo root).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks import champion as registry
from tasks.champion import ChampionEvent, champion_history, fetch_champion
from tasks.config import Params
from tasks.data import DataVersionError, data_version, dvc_file_for, training_window
from tasks.evaluate import GateVerdict, evaluate_esmm, read_metrics
from tasks.ingest import IngestReport, ingest_ali_ccp
from tasks.layout import Layout
from tasks.register import Registration, register_esmm
from tasks.tracking import resolve_tracking_uri
from tasks.train import TrainResult, train_esmm
from tasks.validate import ValidationResult, validate_data
from tasks.warm_start import lineage_tags, prepare_warm_start


class StepFailed(RuntimeError):
    """A stage failed inside the retraining flow; the message names the step and the reason."""


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    verdict: GateVerdict
    oracle: dict[str, float] | None  # Bayes-oracle AUCs of the test split, when known
    champion: dict[str, float] | None = None  # the champion's metrics on the same split


def _layout(params: Params) -> Layout:
    return Layout.from_config(params.paths)


def ingest(params: Params) -> IngestReport:
    """Raw files -> split Parquet tables, vocabularies, quarantine and report."""
    layout = _layout(params)
    history = []
    if params.ingest.window > 1:
        history = training_window(
            layout.raw_dir.parent, layout.raw_dir, params.ingest.window, layout.history_dir
        )
    return ingest_ali_ccp(layout.raw_dir, layout.ingest_dir, params.ingest, history)


def validate(params: Params) -> ValidationResult:
    """TFDV statistics, schema, drift and skew checks of every split; raises on anomalies.

    This data version's training statistics join the history that the next version's drift
    is measured against; without a `.dvc` file for the raw data there is no drift check.
    """
    layout = _layout(params)
    try:
        version = data_version(dvc_file_for(layout.raw_dir, layout.raw_dir.parent))
    except DataVersionError:
        version = None
    return validate_data(
        layout.ingest_dir,
        layout.validate_dir,
        Path(params.validate_.schema_dir),
        params.validate_,
        data_version=version,
        history_dir=layout.validate_history_dir,
    )


def train(params: Params, verbose: int = 1, resume: bool | None = None) -> TrainResult:
    """Fit ESMM on the train split and save it (resuming a matching checkpoint unless
    `resume` is False or `train.resume` is false), from the champion's weights with
    `train.warm_start: champion`."""
    layout = _layout(params)
    return train_esmm(
        layout.ingest_dir,
        layout.train_dir,
        params.model,
        params.train,
        verbose=verbose,
        resume=resume,
        warm_start=prepare_warm_start(params, verbose),
    )


def evaluate(params: Params) -> Evaluation:
    """Metrics of the trained model and of the registered champion on the test split, plots,
    and the gate verdict (floors, and no regression against the champion)."""
    layout = _layout(params)
    with tempfile.TemporaryDirectory(prefix="esmm-champion-") as tmp:
        champion = fetch_champion(params.register_, Path(tmp))
        result = evaluate_esmm(
            layout.model_path,
            layout.split_dir("test"),
            layout.evaluate_dir,
            params.evaluate,
            champion,
        )
    return Evaluation(
        result.metrics, result.verdict, read_oracle(layout.oracle_path), result.champion
    )


def register(params: Params) -> Registration:
    """Register the evaluated model in MLflow with its data version (also as its input data
    set), digests, metrics, per-epoch training curves, plots and verdict as `challenger`;
    promote it to `champion` when the gate passed and `register.promote` is `gate`."""
    layout = _layout(params)
    metrics, champion, verdict = read_metrics(layout.metrics_path)
    version = data_version(dvc_file_for(layout.raw_dir, layout.raw_dir.parent))
    artifacts = [
        ("evaluation", layout.metrics_path),
        ("evaluation", layout.by_position_path),
        ("evaluation/plots", layout.plots_dir),
        ("validation", layout.validate_report_html),
        ("validation", layout.validate_report_text),
        ("warm_start", layout.train_dir / "warm_start.json"),
        ("warm_start", layout.train_dir / "id_ages.parquet"),
    ]
    history = json.loads(layout.history_path.read_text()) if layout.history_path.is_file() else {}
    return register_esmm(
        layout.model_path,
        metrics,
        verdict,
        version,
        params,
        layout.register_dir,
        champion_metrics=champion,
        artifacts=artifacts,
        history=history,
        raw_dir=layout.raw_dir,
        extra_tags=lineage_tags(layout.train_dir),
    )


def promote(
    params: Params, version: str, reason: str = "", override: bool = False
) -> ChampionEvent:
    """Move `champion` to a registered version (its gate passed, or an explicit override)."""
    cfg = params.register_
    return registry.promote(
        resolve_tracking_uri(cfg.tracking_uri), cfg.model_name, version, reason, override
    )


def rollback(params: Params, reason: str = "") -> ChampionEvent:
    """Move `champion` back to the previous champion."""
    cfg = params.register_
    return registry.rollback(resolve_tracking_uri(cfg.tracking_uri), cfg.model_name, reason)


def champions(params: Params) -> list[ChampionEvent]:
    """The history of `champion`, oldest first, from the registry."""
    cfg = params.register_
    return champion_history(resolve_tracking_uri(cfg.tracking_uri), cfg.model_name)


def read_oracle(path: Path) -> dict[str, float] | None:
    """The generator's Bayes-oracle AUCs of the test split, if the raw folder has them."""
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("test")
