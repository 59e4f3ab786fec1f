"""The pipeline steps, each one plain function of the configuration.

These are the single implementations behind both entry points: the Prefect flow wraps each
in a task (flows/retrain.py) and the CLI runs each as a `dvc.yaml` stage (`esmm <step>`).
Paths come from `tasks.layout.Layout`, relative to the working directory (the repo root).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.config import Params
from tasks.data import data_version, dvc_file_for
from tasks.evaluate import GateVerdict, evaluate_esmm, read_metrics
from tasks.ingest import IngestReport, ingest_ali_ccp
from tasks.layout import Layout
from tasks.register import Registration, register_esmm
from tasks.train import TrainResult, train_esmm
from tasks.validate import ValidationResult, validate_data


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    verdict: GateVerdict
    oracle: dict[str, float] | None  # Bayes-oracle AUCs of the test split, when known


def _layout(params: Params) -> Layout:
    return Layout.from_config(params.paths)


def ingest(params: Params) -> IngestReport:
    """Raw files -> split Parquet tables, vocabularies, quarantine and report."""
    layout = _layout(params)
    return ingest_ali_ccp(layout.raw_dir, layout.ingest_dir, params.ingest)


def validate(params: Params) -> ValidationResult:
    """TFDV statistics and schema checks of every split; raises on anomalies."""
    layout = _layout(params)
    return validate_data(
        layout.ingest_dir, layout.validate_dir, Path(params.validate_.schema_dir), params.validate_
    )


def train(params: Params, verbose: int = 1, resume: bool | None = None) -> TrainResult:
    """Fit ESMM on the train split and save it (resuming a matching checkpoint unless
    `resume` is False or `train.resume` is false)."""
    layout = _layout(params)
    return train_esmm(
        layout.ingest_dir,
        layout.train_dir,
        params.model,
        params.train,
        verbose=verbose,
        resume=resume,
    )


def evaluate(params: Params) -> Evaluation:
    """Masked metrics of the trained model on the test split, and the gate verdict."""
    layout = _layout(params)
    metrics, verdict = evaluate_esmm(
        layout.model_path, layout.split_dir("test"), layout.evaluate_dir, params.evaluate
    )
    return Evaluation(metrics, verdict, read_oracle(layout.oracle_path))


def register(params: Params) -> Registration:
    """Register the evaluated model in MLflow with its data version and aliases."""
    layout = _layout(params)
    metrics, verdict = read_metrics(layout.metrics_path)
    version = data_version(dvc_file_for(layout.raw_dir, layout.raw_dir.parent))
    return register_esmm(layout.model_path, metrics, verdict, version, params, layout.register_dir)


def read_oracle(path: Path) -> dict[str, float] | None:
    """The generator's Bayes-oracle AUCs of the test split, if the raw folder has them."""
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("test")
