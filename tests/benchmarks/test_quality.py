"""benchmarks.quality's summary across training seeds."""

import math

import pytest

from benchmarks.quality import seed_summary


def _seed(ctr: float, cvr: float, delta_cvr: float) -> list[dict]:
    return [
        {"run": "esmm", "ctr_auc": ctr, "ctcvr_auc": 0.75, "cvr_auc_clicked": cvr},
        {
            "run": "esmm - esmm_first_id",
            "ctr_auc_delta": 0.004,
            "ctcvr_auc_delta": 0.006,
            "cvr_auc_clicked_delta": delta_cvr,
        },
    ]


def test_seed_summary_means_standard_errors_and_seeds_ahead():
    runs, deltas = seed_summary(
        [_seed(0.70, 0.65, 0.003), _seed(0.71, 0.66, -0.001), _seed(0.72, 0.64, -0.005)]
    )
    assert runs["run"] == "esmm (mean over 3 seeds)" and runs["seeds"] == 3
    assert runs["ctr_auc"] == pytest.approx(0.71)
    # sd (ddof 1) of 0.70, 0.71, 0.72 is 0.01; over sqrt(3) seeds
    assert runs["ctr_auc_se_across_seeds"] == pytest.approx(round(0.01 / math.sqrt(3), 4))
    assert runs["ctcvr_auc_se_across_seeds"] == 0.0
    assert "ctr_auc_seeds_ahead" not in runs  # only differences count seeds ahead
    assert deltas["run"] == "esmm - esmm_first_id (mean over 3 seeds)"
    assert deltas["cvr_auc_clicked_delta"] == pytest.approx(-0.001)
    assert deltas["cvr_auc_clicked_delta_seeds_ahead"] == 1
    assert deltas["ctr_auc_delta_seeds_ahead"] == 3
    assert "ctr_auc" not in deltas
