"""Evaluation step: masked ESMM metrics on the test split, plots, and the gate verdict.

CTR and CTCVR are scored over all impressions; CVR = P(conversion | click) is scored over
clicked impressions only, because that is the population its label is defined on. Names
follow `{task}_{measure}` with a `_clicked` suffix for CVR (`cvr_auc_clicked`).

The gate checks absolute floors and, when a champion exists, that no gated metric regressed
against it beyond a tolerance; both models are scored on the same test split in one run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.calibration import calibration_curve
from sklearn.metrics import log_loss, roc_auc_score, roc_curve

from models.features import CLICK_LABEL_KEY, CONVERSION_LABEL_KEY, SAMPLE_ID_KEY
from tasks.config import EvaluateConfig
from tasks.progress import Progress

# metric name -> the EvaluateConfig floor that gates it
GATED_METRICS: dict[str, str] = {
    "ctr_auc": "min_ctr_auc",
    "ctcvr_auc": "min_ctcvr_auc",
    "cvr_auc_clicked": "min_cvr_auc_clicked",
}
TASKS = ("ctr", "ctcvr", "cvr")
_MIN_ROWS_FOR_SPREAD = 100  # test rows (clicked, for p_cvr) before a constant output is judged
# Metrics compared with the champion (shown side by side, with deltas).
HEADLINE = tuple(
    f"{task}_{measure}{'_clicked' if task == 'cvr' else ''}"
    for measure in ("auc", "logloss", "gauc", "calibration")
    for task in TASKS
)
Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)  # one line per failed check


class GateRefusedError(RuntimeError):
    """The gate refused the candidate; the message lists every failed check."""

    def __init__(self, reasons: list[str], detail: str = ""):
        self.reasons = list(reasons)
        lines = ["the gate refused the model:"] + [f"  - {r}" for r in reasons]
        super().__init__("\n".join(([detail, ""] if detail else []) + lines))


@dataclass(frozen=True)
class Champion:
    """The registered champion to compare against: its version and local `.keras` file."""

    version: str
    model_path: Path


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict  # the candidate's metrics (flat)
    champion: dict | None  # {"version": ..., headline metrics} of the champion, if any
    verdict: GateVerdict


def _task(predictions: pd.DataFrame, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores, row mask) of one task: CVR only on clicked rows."""
    click = predictions[CLICK_LABEL_KEY].to_numpy().astype(np.int64)
    ctcvr = click * predictions[CONVERSION_LABEL_KEY].to_numpy().astype(np.int64)
    mask = click == 1 if task == "cvr" else np.ones(len(click), bool)
    labels = click if task == "ctr" else ctcvr
    return labels[mask], predictions[f"p_{task}"].to_numpy(np.float64)[mask], mask


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, or NaN when only one class is present (AUC is undefined there)."""
    return float(roc_auc_score(labels, scores)) if 0 < labels.sum() < len(labels) else float("nan")


def _placements(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """DeLong's structural components (Sun & Xu 2014, midranks: O(n log n)): per positive,
    the share of negatives ranked below it; per negative, the share of positives above it.
    None when only one class is present."""
    labels = np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        return None
    overall = rankdata(np.concatenate([pos, neg]))
    return (overall[:m] - rankdata(pos)) / n, 1.0 - (overall[m:] - rankdata(neg)) / m


def _mean_var(v: np.ndarray) -> float:
    return v.var(ddof=1) / len(v) if len(v) > 1 else 0.0


def delong_auc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """AUC and its DeLong standard error. NaN for both when only one class is present."""
    placed = _placements(labels, scores)
    if placed is None:
        return float("nan"), float("nan")
    v_pos, v_neg = placed
    return float(v_pos.mean()), float(math.sqrt(_mean_var(v_pos) + _mean_var(v_neg)))


def delong_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray
) -> tuple[float, float]:
    """AUC(a) - AUC(b) on the same labels, and the DeLong standard error of that difference.

    Paired: both models score the same impressions, so the correlation of their errors is
    taken into account, and the difference is far more precise than either AUC alone."""
    a, b = _placements(labels, scores_a), _placements(labels, scores_b)
    if a is None or b is None:
        return float("nan"), float("nan")
    delta = float(a[0].mean() - b[0].mean())
    var = _mean_var(a[0] - b[0]) + _mean_var(a[1] - b[1])
    return delta, float(math.sqrt(var))


def _logloss(labels: np.ndarray, scores: np.ndarray) -> float:
    return (
        float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1]))
        if len(labels)
        else float("nan")
    )


def group_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[float, int, int]:
    """GAUC: per-group AUC weighted by the group's impressions.

    Returns (gauc, groups scored, groups skipped because they hold a single class).
    """
    frame = pd.DataFrame({"g": groups, "y": labels, "s": scores})
    frame["r"] = frame.groupby("g")["s"].rank(method="average")
    per = frame.groupby("g").agg(n=("y", "size"), pos=("y", "sum"))
    per["rank_pos"] = frame[frame["y"] == 1].groupby("g")["r"].sum()
    both = (per["pos"] > 0) & (per["pos"] < per["n"])
    scored = per[both]
    if scored.empty:
        return float("nan"), 0, int(len(per))
    neg = scored["n"] - scored["pos"]
    auc = (scored["rank_pos"] - scored["pos"] * (scored["pos"] + 1) / 2) / (scored["pos"] * neg)
    gauc = float((auc * scored["n"]).sum() / scored["n"].sum())
    return gauc, int(len(scored)), int(len(per) - len(scored))


def compute_metrics(predictions: pd.DataFrame) -> dict[str, float]:
    """ESMM metrics from a frame with click, conversion, p_ctr, p_cvr, p_ctcvr columns
    (and `user` for GAUC): per task AUC with DeLong SE and 95% interval, logloss, GAUC,
    calibration (mean predicted / observed rate), and the counts."""
    metrics: dict[str, float] = {}
    users = predictions["user"].to_numpy() if "user" in predictions else None
    for task in TASKS:
        sfx = "_clicked" if task == "cvr" else ""
        labels, scores, mask = _task(predictions, task)
        auc, se = delong_auc(labels, scores)
        observed = float(labels.mean()) if len(labels) else float("nan")
        predicted = float(scores.mean()) if len(scores) else float("nan")
        metrics |= {
            f"{task}_auc{sfx}": auc,
            f"{task}_auc_se{sfx}": se,
            f"{task}_auc_ci_low{sfx}": max(0.0, auc - Z95 * se),
            f"{task}_auc_ci_high{sfx}": min(1.0, auc + Z95 * se),
            f"{task}_logloss{sfx}": _logloss(labels, scores),
            f"{task}_mean_predicted{sfx}": predicted,
            f"{task}_observed_rate{sfx}": observed,
            f"{task}_calibration{sfx}": predicted / observed if observed > 0 else float("nan"),
            f"{task}_distinct_predictions{sfx}": int(len(np.unique(scores))),
        }
        if users is not None:
            gauc, scored, skipped = group_auc(labels, scores, users[mask])
            metrics |= {
                f"{task}_gauc{sfx}": gauc,
                f"{task}_gauc_users{sfx}": scored,
                f"{task}_gauc_users_skipped{sfx}": skipped,
            }
    metrics |= {
        "impressions": int(len(predictions)),
        "clicks": int(predictions[CLICK_LABEL_KEY].sum()),
        "conversions": int(_task(predictions, "ctcvr")[0].sum()),
    }
    return metrics


def auc_differences(predictions: pd.DataFrame, other: pd.DataFrame) -> dict[str, float]:
    """Per task, AUC of `predictions` minus AUC of `other` scored on the same impressions,
    with the paired DeLong standard error (`ctr_auc_delta`, `ctr_auc_delta_se`, ...,
    `cvr_auc_clicked_delta`: CVR on clicked rows, as in `compute_metrics`)."""
    if not np.array_equal(predictions[SAMPLE_ID_KEY].to_numpy(), other[SAMPLE_ID_KEY].to_numpy()):
        raise ValueError("auc_differences needs both models' predictions of the same impressions")
    out: dict[str, float] = {}
    for task in TASKS:
        name = "cvr_auc_clicked" if task == "cvr" else f"{task}_auc"
        labels, scores, mask = _task(predictions, task)
        other_scores = other[f"p_{task}"].to_numpy(np.float64)[mask]
        out[f"{name}_delta"], out[f"{name}_delta_se"] = delong_difference(
            labels, scores, other_scores
        )
    return out


def metrics_by_position(predictions: pd.DataFrame, min_impressions: int) -> dict[str, dict]:
    """CTR and CTCVR metrics per position id (field 301); positions with fewer than
    `min_impressions` impressions are pooled under "other"."""
    counts = predictions["position"].value_counts()
    small = counts.index[counts < min_impressions]
    keys = predictions["position"].astype(str).where(~predictions["position"].isin(small), "other")
    out: dict[str, dict] = {}
    for key, part in predictions.groupby(keys, sort=False):
        ctr_labels, ctr_scores, _ = _task(part, "ctr")
        ctcvr_labels, ctcvr_scores, _ = _task(part, "ctcvr")
        out[str(key)] = {
            "impressions": int(len(part)),
            "ctr_auc": _auc(ctr_labels, ctr_scores),
            "ctcvr_auc": _auc(ctcvr_labels, ctcvr_scores),
            "ctr_calibration": float(ctr_scores.mean() / ctr_labels.mean())
            if ctr_labels.sum()
            else float("nan"),
        }
    order = sorted(out, key=lambda k: (k == "other", int(k) if k != "other" else 0))
    return {k: out[k] for k in order}


def gate(
    metrics: dict[str, float],
    cfg: EvaluateConfig,
    champion: dict[str, float] | None = None,
) -> GateVerdict:
    """Absolute floors, a tower that is not constant, then no regression beyond
    `cfg.max_regression` against the champion (skipped when there is none). An undefined
    (NaN) candidate metric fails its check.

    A tower whose predictions take fewer distinct values than 1% of the test rows (given at
    least `_MIN_ROWS_FOR_SPREAD`) has collapsed: ESMM's CVR tower, which no label supervises
    directly, can end at p_cvr = 1 everywhere, where the loss's gradient vanishes, or, its
    units dead, at one rate for every input; its clicked CVR AUC is then about 0.5, which a
    floor of 0.5 would let through."""
    reasons = []
    for name, floor_key in GATED_METRICS.items():
        floor = getattr(cfg, floor_key)
        value = metrics[name]
        if not value >= floor:  # also catches NaN
            reasons.append(
                f"{name} = {value:.4f} is below the floor evaluate.{floor_key} = {floor}"
            )
    for task, rows_key in (("ctr", "impressions"), ("cvr", "clicks")):
        sfx = "_clicked" if task == "cvr" else ""
        rows, distinct = metrics.get(rows_key, 0), metrics.get(f"{task}_distinct_predictions{sfx}")
        if distinct is not None and rows >= _MIN_ROWS_FOR_SPREAD and distinct < 0.01 * rows:
            reasons.append(
                f"p_{task} takes {distinct} distinct value(s) on {rows:,} test rows: the "
                f"{task.upper()} tower's output collapsed to a constant; retrain with a lower "
                "train.learning_rate or another train.seed"
            )
    for name, tolerance in (cfg.max_regression if champion else {}).items():
        value, best = metrics[name], champion[name]
        if math.isnan(best):
            continue  # nothing to compare with: the champion's metric is undefined
        lower_is_better = "logloss" in name
        regression = value - best if lower_is_better else best - value
        if not regression <= tolerance:  # also catches a NaN candidate
            reasons.append(
                f"{name} = {value:.4f} regressed by {regression:.4f} against champion version "
                f"{champion['version']} ({best:.4f}); evaluate.max_regression.{name} = {tolerance}"
            )
    return GateVerdict(not reasons, reasons)


def _curves(predictions: pd.DataFrame, bins: int) -> dict[str, dict]:
    out = {}
    for task in TASKS:
        labels, scores, _ = _task(predictions, task)
        if not 0 < labels.sum() < len(labels):
            continue
        fpr, tpr, _ = roc_curve(labels, scores)
        observed, predicted = calibration_curve(labels, scores, n_bins=bins, strategy="quantile")
        out[task] = {"fpr": fpr, "tpr": tpr, "observed": observed, "predicted": predicted}
    return out


def write_plots(
    predictions: pd.DataFrame,
    plots_dir: Path,
    bins: int,
    champion_predictions: pd.DataFrame | None = None,
) -> list[Path]:
    """ROC curves and reliability diagrams of the three tasks as PNGs (the champion's
    curves drawn too when given)."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    curves = {"candidate": _curves(predictions, bins)}
    if champion_predictions is not None:
        curves["champion"] = _curves(champion_predictions, bins)
    title = {"ctr": "CTR (all impressions)", "ctcvr": "CTCVR (all impressions)"}
    title["cvr"] = "CVR (clicked impressions)"
    written = []
    for task in TASKS:
        for kind in ("roc", "reliability"):
            fig = Figure(figsize=(4.5, 4.5))
            ax = fig.subplots()
            for who, by_task in curves.items():
                c = by_task.get(task)
                if c is None:
                    continue
                if kind == "roc":
                    ax.plot(c["fpr"], c["tpr"], label=who)
                else:
                    ax.plot(c["predicted"], c["observed"], marker="o", label=who)
            if kind == "roc":
                ax.plot([0, 1], [0, 1], ls=":", color="grey")
                ax.set(xlabel="false positive rate", ylabel="true positive rate")
            else:
                drawn = [by_task[task] for by_task in curves.values() if task in by_task]
                top = max([max(c["predicted"].max(), c["observed"].max()) for c in drawn] or [1.0])
                ax.plot([0, top], [0, top], ls=":", color="grey")
                ax.set(xlabel="mean predicted", ylabel="observed rate")
            ax.set_title(f"{kind}: {title[task]}")
            ax.legend(loc="best")
            fig.tight_layout()
            path = plots_dir / f"{kind}_{task}.png"
            fig.savefig(path, dpi=80)
            written.append(path)
    return written


def _predict(model_path: Path, test_dir: Path) -> pd.DataFrame:
    import keras

    import models.esmm  # noqa: F401  (registers the custom layers for loading)
    from tasks.inputs import predict_split

    return predict_split(keras.models.load_model(model_path), test_dir)


def evaluate_esmm(
    model_path: Path,
    test_dir: Path,
    out_dir: Path,
    cfg: EvaluateConfig,
    champion: Champion | None = None,
) -> EvaluationResult:
    """Score the candidate (and the champion, if any) on the test split; write
    `metrics.json` (candidate metrics, champion metrics, deltas, verdict), `headline.json`
    (the part `dvc metrics show` prints), `by_position.json` and `.csv`,
    `predictions.parquet` and `plots/*.png`."""
    against = f" and champion version {champion.version}" if champion is not None else ""
    print(f"evaluate: scoring the model{against} on {test_dir}", flush=True)
    started = Progress("evaluate: scored", 0, "impressions")
    predictions = _predict(model_path, test_dir)
    # The total is known once one model has scored the split: each model scores all of it.
    started.total = len(predictions) * (2 if champion is not None else 1)
    started.update(len(predictions), force=True)
    metrics = compute_metrics(predictions)
    champion_metrics = champion_predictions = None
    if champion is not None:
        try:
            champion_predictions = _predict(champion.model_path, test_dir)
            started.update(started.total, force=True)
        except Exception as err:  # an incompatible champion must be named, not a traceback
            raise RuntimeError(
                f"could not score champion version {champion.version} "
                f"({champion.model_path}) on {test_dir}: {err}"
            ) from err
        scored = compute_metrics(champion_predictions)
        champion_metrics = {"version": champion.version} | {k: scored[k] for k in HEADLINE}
    verdict = gate(metrics, cfg, champion_metrics)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_parquet(out_dir / "predictions.parquet", index=False)
    write_plots(predictions, out_dir / "plots", cfg.reliability_bins, champion_predictions)
    by_position = metrics_by_position(predictions, cfg.position_min_impressions)
    (out_dir / "by_position.json").write_text(_dumps(by_position))
    write_position_table(out_dir / "by_position.csv", by_position)
    document = write_metrics(out_dir / "metrics.json", metrics, champion_metrics, verdict)
    write_headline(out_dir / "headline.json", document)
    return EvaluationResult(metrics, champion_metrics, verdict)


def write_position_table(path: Path, by_position: dict[str, dict]) -> None:
    """The per-position figures as a CSV table, one row per position (a DVC plot)."""
    columns = ["impressions", "ctr_auc", "ctcvr_auc", "ctr_calibration"]
    rows = ["position," + ",".join(columns)]
    for position, row in by_position.items():
        cells = ["" if _nan(row[c]) else f"{row[c]:.6g}" for c in columns]
        rows.append(f"{position}," + ",".join(cells))
    Path(path).write_text("\n".join(rows) + "\n")


def _nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def write_headline(path: Path, document: dict) -> dict:
    """The DVC metrics file (`dvc metrics show/diff`): the three headline AUCs, the verdict
    and, against a champion, its version and the deltas; `metrics.json` has everything."""
    aucs = ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked")
    headline = {k: document[k] for k in aucs} | {"gate_passed": document["gate_passed"]}
    if "champion" in document:
        # the champion's version and the deltas (its AUCs are in metrics.json): one row of a
        # dozen columns at most
        headline["champion"] = {"version": document["champion"]["version"]}
        headline["delta"] = {k: document["delta"][k] for k in aucs}
    Path(path).write_text(_dumps(headline))
    return headline


def write_metrics(path: Path, metrics: dict, champion: dict | None, verdict: GateVerdict) -> dict:
    """The DVC metrics file: the candidate's metrics at the top level, the champion's and the
    deltas under `champion` / `delta`, and the verdict (`gate_summary` holds the reasons as
    one string, since DVC shows strings but not lists)."""
    document: dict = dict(metrics)
    if champion is not None:
        document["champion"] = {"version": int(champion["version"])} | {
            k: champion[k] for k in HEADLINE
        }
        document["delta"] = {k: metrics[k] - champion[k] for k in HEADLINE}
    document |= {
        "gate_passed": verdict.passed,
        "gate_failed_checks": len(verdict.reasons),
        "gate_summary": "; ".join(verdict.reasons) or "all checks passed",
        "gate_reasons": verdict.reasons,
    }
    Path(path).write_text(_dumps(document))
    return document


def _dumps(document: dict) -> str:
    """JSON with NaN written as null (JSON has no NaN; DVC then leaves the value out)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and math.isnan(value):
            return None
        return value

    return json.dumps(clean(document), indent=2, sort_keys=True)


def read_metrics(path: Path) -> tuple[dict, dict | None, GateVerdict]:
    """Candidate metrics, champion metrics (or None) and verdict as written by `evaluate_esmm`."""
    document = json.loads(Path(path).read_text())
    verdict = GateVerdict(document.pop("gate_passed"), document.pop("gate_reasons"))
    for key in ("gate_failed_checks", "gate_summary", "delta"):
        document.pop(key, None)
    champion = document.pop("champion", None)
    if champion is not None:
        champion["version"] = str(champion["version"])
    nan = float("nan")
    metrics = {k: nan if v is None else v for k, v in document.items()}
    if champion is not None:
        champion = {k: nan if v is None else v for k, v in champion.items()}
    return metrics, champion, verdict


def format_metrics(
    metrics: dict[str, float],
    oracle: dict[str, float] | None,
    champion: dict[str, float] | None = None,
) -> str:
    """The three AUCs (with 95% intervals) next to the oracle's and the champion's."""
    rows = [
        f"{'metric':<18}{'model':>8}{'95% CI':>18}{'oracle':>8}{'gap':>8}"
        + (f"{'champion v' + str(champion['version']):>14}{'delta':>9}" if champion else "")
    ]
    for name in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked"):
        value = metrics[name]
        low = metrics.get(name.replace("_auc", "_auc_ci_low"))
        high = metrics.get(name.replace("_auc", "_auc_ci_high"))
        ci = f"[{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
        best = (oracle or {}).get(name)
        gap = f"{best - value:>8.4f}" if best is not None else f"{'':>8}"
        shown = "n/a" if best is None else f"{best:.4f}"
        row = f"{name:<18}{value:>8.4f}{ci:>18}{shown:>8}{gap}"
        if champion:
            row += f"{champion[name]:>14.4f}{value - champion[name]:>+9.4f}"
        rows.append(row)
    return "\n".join(rows)
