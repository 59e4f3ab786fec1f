"""Evaluation step: masked ESMM metrics on the test split and the gate verdict.

CTR and CTCVR are scored over all impressions; CVR = P(conversion | click) is scored over
clicked impressions only, because that is the population its label is defined on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import log_loss, roc_auc_score

from models.features import CLICK_LABEL_KEY, CONVERSION_LABEL_KEY
from tasks.config import EvaluateConfig

# metric name -> the EvaluateConfig floor that gates it
GATED_METRICS: dict[str, str] = {
    "ctr_auc": "min_ctr_auc",
    "ctcvr_auc": "min_ctcvr_auc",
    "cvr_auc_clicked": "min_cvr_auc_clicked",
}


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per failed check


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present (AUC is undefined there)."""
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def _logloss(labels: np.ndarray, scores: np.ndarray) -> float:
    return (
        float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1]))
        if len(labels)
        else float("nan")
    )


def compute_metrics(predictions: pd.DataFrame) -> dict[str, float]:
    """ESMM metrics from a frame with click, conversion, p_ctr, p_cvr, p_ctcvr columns."""
    click = predictions[CLICK_LABEL_KEY].to_numpy()
    ctcvr = click * predictions[CONVERSION_LABEL_KEY].to_numpy()
    clicked = click == 1
    return {
        "ctr_auc": _auc(click, predictions["p_ctr"].to_numpy()),
        "ctcvr_auc": _auc(ctcvr, predictions["p_ctcvr"].to_numpy()),
        "cvr_auc_clicked": _auc(ctcvr[clicked], predictions["p_cvr"].to_numpy()[clicked]),
        "ctr_logloss": _logloss(click, predictions["p_ctr"].to_numpy()),
        "ctcvr_logloss": _logloss(ctcvr, predictions["p_ctcvr"].to_numpy()),
        "cvr_logloss_clicked": _logloss(ctcvr[clicked], predictions["p_cvr"].to_numpy()[clicked]),
        "impressions": int(len(click)),
        "clicks": int(clicked.sum()),
        "conversions": int(ctcvr.sum()),
    }


def gate(metrics: dict[str, float], cfg: EvaluateConfig) -> GateVerdict:
    """Absolute floors from params.yaml; an undefined (NaN) metric fails its check."""
    reasons = []
    for name, floor_key in GATED_METRICS.items():
        floor = getattr(cfg, floor_key)
        value = metrics[name]
        if not value >= floor:  # also catches NaN
            reasons.append(
                f"{name} = {value:.4f} is below the floor evaluate.{floor_key} = {floor}"
            )
    return GateVerdict(not reasons, reasons)


def evaluate_esmm(
    model_path: Path, test_dir: Path, out_dir: Path, cfg: EvaluateConfig
) -> tuple[dict, GateVerdict]:
    """Score the test split, write `metrics.json` (with the verdict) and `predictions.parquet`."""
    import keras

    import models.esmm  # noqa: F401  (registers the custom layers for loading)
    from tasks.train import predict_split

    model = keras.models.load_model(model_path)
    predictions = predict_split(model, test_dir)
    metrics = compute_metrics(predictions)
    verdict = gate(metrics, cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(out_dir / "predictions.parquet", index=False)
    document = {**metrics, "gate_passed": verdict.passed, "gate_reasons": verdict.reasons}
    (out_dir / "metrics.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    return metrics, verdict


def read_metrics(path: Path) -> tuple[dict, GateVerdict]:
    """Metrics and verdict as written by `evaluate_esmm`."""
    document = json.loads(Path(path).read_text())
    verdict = GateVerdict(document.pop("gate_passed"), document.pop("gate_reasons"))
    return document, verdict


def format_metrics(metrics: dict[str, float], oracle: dict[str, float] | None) -> str:
    """The three AUCs side by side with the oracle's, as a small table."""
    rows = [f"{'metric':<18}{'model':>8}{'oracle':>8}{'gap':>8}"]
    for name in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked"):
        value = metrics[name]
        best = (oracle or {}).get(name)
        gap = f"{best - value:>8.4f}" if best is not None else f"{'':>8}"
        shown = "n/a" if best is None else f"{best:.4f}"
        rows.append(f"{name:<18}{value:>8.4f}{shown:>8}{gap}")
    return "\n".join(rows)
