"""Numeric helpers shared by the model code, the pipeline steps and the generator.

One sigmoid, one logit, one bisection solver and one AUC, so that every place computes them
the same way. NumPy only (no TensorFlow): ingestion-side code imports this too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn.metrics import roc_auc_score

_LOGIT_CLIP = (1e-30, 1 - 1e-7)  # float32-safe bounds of p before taking its logit


def sigmoid(x: np.ndarray | float) -> np.ndarray:
    """1 / (1 + exp(-x)), elementwise, in the dtype of `x`."""
    return 1.0 / (1.0 + np.exp(-x))


def logit(p: np.ndarray | float) -> np.ndarray:
    """log(p / (1 - p)), with p clipped into (0, 1) so that 0 and 1 stay finite."""
    p = np.clip(np.asarray(p, dtype=np.float64), *_LOGIT_CLIP)
    return np.log(p) - np.log1p(-p)


def solve_increasing(
    fn: Callable[[float], float],
    target: float,
    lo: float = -30.0,
    hi: float = 30.0,
    iterations: int = 80,
) -> float:
    """The x in [lo, hi] with fn(x) == target, for fn increasing in x (bisection)."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if fn(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` for binary `labels`; NaN when only one class is present (undefined)."""
    labels = np.asarray(labels)
    if len(labels) == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, scores))
