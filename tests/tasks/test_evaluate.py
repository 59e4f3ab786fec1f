"""Masked metrics and the gate verdict."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tasks.config import EvaluateConfig
from tasks.evaluate import compute_metrics, gate


def _frame(click, conversion, p_ctr, p_cvr) -> pd.DataFrame:
    p_ctr, p_cvr = np.asarray(p_ctr, float), np.asarray(p_cvr, float)
    return pd.DataFrame(
        {
            "click": click,
            "conversion": conversion,
            "p_ctr": p_ctr,
            "p_cvr": p_cvr,
            "p_ctcvr": p_ctr * p_cvr,
        }
    )


def test_cvr_auc_uses_clicked_rows_only():
    """p_cvr that ranks clicked rows perfectly scores 1.0, whatever it says on unclicked rows."""
    click = [1, 1, 1, 1, 0, 0, 0, 0]
    conversion = [1, 1, 0, 0, 0, 0, 0, 0]
    # Unclicked rows get the highest p_cvr: an unmasked AUC would be poor.
    p_cvr = [0.6, 0.7, 0.2, 0.1, 0.9, 0.95, 0.99, 0.8]
    metrics = compute_metrics(_frame(click, conversion, [0.5] * 8, p_cvr))
    assert metrics["cvr_auc_clicked"] == 1.0
    assert metrics["clicks"] == 4 and metrics["conversions"] == 2


def test_ctcvr_label_is_click_times_conversion():
    """A conversion flag on an unclicked row is not a CTCVR positive."""
    click = [1, 0, 0, 1]
    conversion = [1, 1, 0, 0]  # row 1 is the invalid click=0, conversion=1 case
    metrics = compute_metrics(_frame(click, conversion, [0.9, 0.1, 0.1, 0.9], [0.9, 0.9, 0.1, 0.1]))
    assert metrics["conversions"] == 1
    # Row 0 is the only positive and has the highest p_ctcvr.
    assert metrics["ctcvr_auc"] == 1.0


def test_auc_undefined_with_one_class_is_nan_and_fails_the_gate():
    metrics = compute_metrics(_frame([1, 1], [0, 0], [0.4, 0.6], [0.3, 0.2]))
    assert math.isnan(metrics["ctr_auc"])
    verdict = gate(
        metrics, EvaluateConfig(min_ctr_auc=0.0, min_ctcvr_auc=0.0, min_cvr_auc_clicked=0.0)
    )
    assert not verdict.passed and any("ctr_auc" in r for r in verdict.reasons)


@pytest.mark.parametrize(
    "floor_key, metric", [("min_ctr_auc", "ctr_auc"), ("min_cvr_auc_clicked", "cvr_auc_clicked")]
)
def test_gate_names_the_failed_floor(floor_key, metric):
    metrics = {"ctr_auc": 0.7, "ctcvr_auc": 0.7, "cvr_auc_clicked": 0.7}
    verdict = gate(metrics, EvaluateConfig(**{floor_key: 0.8}))
    assert not verdict.passed
    assert (
        len(verdict.reasons) == 1
        and metric in verdict.reasons[0]
        and floor_key in verdict.reasons[0]
    )
    assert gate(metrics, EvaluateConfig(**{floor_key: 0.6})).passed
