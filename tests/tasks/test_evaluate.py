"""Masked metrics, standard errors, GAUC, calibration, plots, and the gate verdict."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from tasks.config import EvaluateConfig
from tasks.evaluate import (
    HEADLINE,
    GateVerdict,
    auc_differences,
    compute_metrics,
    delong_auc,
    delong_difference,
    gate,
    metrics_by_position,
    read_metrics,
    write_headline,
    write_metrics,
    write_plots,
)
from tests.conftest import make_project, run


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


def _champion(version="1", **values) -> dict:
    base = {name: 0.7 for name in HEADLINE}
    return {"version": version, **base, **values}


def test_gate_refuses_a_regression_against_the_champion_beyond_the_tolerance():
    """Floors pass, but CTR AUC dropped 0.02 against the champion (tolerance 0.005)."""
    cfg = EvaluateConfig(min_ctr_auc=0.5, min_ctcvr_auc=0.5, min_cvr_auc_clicked=0.5)
    metrics = {name: 0.7 for name in HEADLINE} | {"ctr_auc": 0.68}
    verdict = gate(metrics, cfg, _champion("4"))
    assert not verdict.passed and len(verdict.reasons) == 1
    assert "ctr_auc" in verdict.reasons[0] and "champion version 4" in verdict.reasons[0]
    assert gate(metrics | {"ctr_auc": 0.696}, cfg, _champion("4")).passed  # within tolerance
    assert gate(metrics, cfg, None).passed  # no champion: floors only


def test_gate_regression_direction_of_logloss_and_undefined_champion_metric():
    """A logloss regresses when it rises; a champion metric that is NaN is not compared."""
    cfg = EvaluateConfig(
        min_ctr_auc=0.5,
        min_ctcvr_auc=0.5,
        min_cvr_auc_clicked=0.5,
        max_regression={"ctr_logloss": 0.01, "cvr_auc_clicked": 0.0},
    )
    metrics = {name: 0.7 for name in HEADLINE} | {"ctr_logloss": 0.65}
    assert gate(metrics, cfg, _champion(ctr_logloss=0.66)).passed  # lower logloss is better
    refused = gate(metrics, cfg, _champion(ctr_logloss=0.63))
    assert not refused.passed and "ctr_logloss" in refused.reasons[0]
    assert gate(metrics, cfg, _champion(cvr_auc_clicked=float("nan"))).passed


def test_max_regression_rejects_unknown_metric_names():
    with pytest.raises(ValidationError, match="max_regression"):
        EvaluateConfig(max_regression={"ctr_accuracy": 0.01})


def test_delong_standard_error_matches_the_bootstrap():
    """DeLong's SE of the AUC agrees with a 400-sample bootstrap within 15%."""
    rng = np.random.default_rng(3)
    score = rng.normal(size=2000)
    labels = (rng.random(2000) < 1 / (1 + np.exp(-(score - 1.5)))).astype(int)
    auc, se = delong_auc(labels, score)
    assert auc == pytest.approx(roc_auc_score(labels, score), abs=1e-12)
    idx = rng.integers(0, len(labels), (400, len(labels)))
    boot = np.std([roc_auc_score(labels[i], score[i]) for i in idx])
    assert se == pytest.approx(boot, rel=0.15)


def test_paired_delong_difference_matches_the_bootstrap_and_beats_unpaired_errors():
    """Two correlated scorers: the paired SE of their AUC difference agrees with a paired
    bootstrap and is below the SE of either AUC on its own."""
    rng = np.random.default_rng(4)
    signal = rng.normal(size=3000)
    labels = (rng.random(3000) < 1 / (1 + np.exp(-(signal - 1.5)))).astype(int)
    a = signal + rng.normal(scale=0.3, size=3000)
    b = signal + rng.normal(scale=0.5, size=3000)
    delta, se = delong_difference(labels, a, b)
    assert delta == pytest.approx(roc_auc_score(labels, a) - roc_auc_score(labels, b), abs=1e-12)
    idx = rng.integers(0, len(labels), (400, len(labels)))
    boot = np.std([roc_auc_score(labels[i], a[i]) - roc_auc_score(labels[i], b[i]) for i in idx])
    assert se == pytest.approx(boot, rel=0.15)
    assert se < 0.8 * delong_auc(labels, a)[1]
    assert np.isnan(delong_difference(np.zeros(5), a[:5], b[:5])[0])


def test_auc_differences_pair_two_models_per_task_with_cvr_on_clicked_rows():
    rng = np.random.default_rng(5)
    n = 4000
    click = (rng.random(n) < 0.3).astype(int)
    conversion = click * (rng.random(n) < 0.4)
    a = _frame(click, conversion, rng.random(n), rng.random(n)).assign(sample_id=np.arange(n))
    b = _frame(click, conversion, rng.random(n), rng.random(n)).assign(sample_id=np.arange(n))
    deltas = auc_differences(a, b)
    clicked = click == 1
    expected = delong_difference(conversion[clicked], a["p_cvr"][clicked], b["p_cvr"][clicked])
    assert (deltas["cvr_auc_clicked_delta"], deltas["cvr_auc_clicked_delta_se"]) == expected
    assert deltas["ctr_auc_delta"] == pytest.approx(
        roc_auc_score(click, a["p_ctr"]) - roc_auc_score(click, b["p_ctr"]), abs=1e-12
    )
    with pytest.raises(ValueError, match="same impressions"):
        auc_differences(a, b.iloc[::-1].reset_index(drop=True))


def test_gauc_weights_users_by_impressions_and_counts_single_class_users():
    """User a ranks perfectly (4 impressions), user b inversely (2); user c has one class."""
    frame = _frame(
        [1, 1, 0, 0, 1, 0, 0, 0],
        [0] * 8,
        [0.9, 0.8, 0.2, 0.1, 0.1, 0.9, 0.5, 0.6],
        [0.5] * 8,
    ).assign(user=["a", "a", "a", "a", "b", "b", "c", "c"])
    metrics = compute_metrics(frame)
    assert metrics["ctr_gauc"] == pytest.approx((4 * 1.0 + 2 * 0.0) / 6)
    assert metrics["ctr_gauc_users"] == 2 and metrics["ctr_gauc_users_skipped"] == 1


def test_calibration_is_mean_predicted_over_observed_rate():
    frame = _frame([1, 0, 0, 0], [1, 0, 0, 0], [0.5] * 4, [0.5] * 4).assign(user=1)
    metrics = compute_metrics(frame)
    assert metrics["ctr_calibration"] == pytest.approx(0.5 / 0.25)
    assert metrics["cvr_calibration_clicked"] == pytest.approx(0.5 / 1.0)


def test_metrics_by_position_pool_rare_positions():
    rng = np.random.default_rng(0)
    n = 600
    frame = _frame(rng.integers(0, 2, n), np.zeros(n, int), rng.random(n), rng.random(n)).assign(
        position=[1] * 300 + [2] * 250 + [3] * 30 + [4] * 20
    )
    by_position = metrics_by_position(frame, min_impressions=100)
    assert list(by_position) == ["1", "2", "other"]
    assert by_position["other"]["impressions"] == 50
    assert sum(p["impressions"] for p in by_position.values()) == n


def test_plots_are_written_for_the_three_tasks(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    click = rng.integers(0, 2, n)
    frame = _frame(click, click * rng.integers(0, 2, n), rng.random(n), rng.random(n))
    written = write_plots(frame, tmp_path, bins=5, champion_predictions=frame)
    assert sorted(p.name for p in written) == sorted(
        f"{kind}_{task}.png" for kind in ("roc", "reliability") for task in ("ctr", "ctcvr", "cvr")
    )
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_metrics_file_works_with_dvc_metrics_show_and_diff(tmp_path, small_raw):
    """headline.json as written by the evaluate step: `dvc metrics show` lists the
    candidate's AUCs, the champion's, the deltas and the verdict, readably (not every
    metric); `dvc metrics diff` shows the change; `dvc metrics show metrics.json` has all."""
    project = make_project(tmp_path / "project", small_raw)
    path = project / "artifacts" / "evaluate" / "metrics.json"
    headline = path.with_name("headline.json")
    path.parent.mkdir(parents=True)
    metrics = {name: 0.7 for name in HEADLINE} | {"impressions": 100}
    write_headline(headline, write_metrics(path, metrics, None, GateVerdict(True)))
    run(["git", "add", "-f", str(path), str(headline)], project)
    run(["git", "commit", "-q", "-m", "metrics"], project)
    refused = GateVerdict(False, ["ctr_auc = 0.6000 regressed by 0.1000 against champion"])
    document = write_metrics(path, metrics | {"ctr_auc": 0.6}, _champion("3"), refused)
    write_headline(headline, document)
    shown = run([sys.executable, "-m", "dvc", "metrics", "show"], project).stdout
    for column in ("ctr_auc", "champion.version", "delta.ctr_auc", "gate_passed"):
        assert column in shown
    assert "impressions" not in shown and "logloss" not in shown
    assert max(len(line) for line in shown.splitlines()) < 200, shown
    diff = run([sys.executable, "-m", "dvc", "metrics", "diff"], project).stdout
    assert "ctr_auc" in diff and "-0.1" in diff
    everything = run(
        [sys.executable, "-m", "dvc", "metrics", "show", "artifacts/evaluate/metrics.json"],
        project,
    ).stdout
    assert "champion.ctr_auc" in everything and "regressed by 0.1000" in everything
    assert read_metrics(path)[1]["version"] == "3" and read_metrics(path)[2] == refused


def test_gate_refuses_a_saturated_or_dead_cvr_tower():
    """p_cvr = the same value on every clicked row (ESMM's CVR tower saturated at 1, then
    recalibrated): the clicked CVR AUC is 0.5, which the floor of 0.5 lets through; the gate
    names the tower instead. So it does for a tower whose units died (24 values within
    0.0001 of the conversion rate, as seen at learning rate 0.01). A healthy model with the
    same labels passes."""
    rng = np.random.default_rng(0)
    n = 20_000
    click = (rng.random(n) < 0.2).astype(int)
    conversion = click * (rng.random(n) < 0.3)
    p_ctr = np.clip(0.2 + 0.1 * rng.standard_normal(n), 0.01, 0.99)
    constant = compute_metrics(_frame(click, conversion, p_ctr, np.full(n, 0.3)))
    assert constant["cvr_auc_clicked"] == 0.5 and constant["cvr_distinct_predictions_clicked"] == 1
    verdict = gate(constant, EvaluateConfig(min_ctr_auc=0.0, min_ctcvr_auc=0.0))
    assert not verdict.passed and len(verdict.reasons) == 1
    assert "p_cvr takes 1 distinct value(s)" in verdict.reasons[0]
    assert "CVR tower" in verdict.reasons[0]
    dead = compute_metrics(
        _frame(click, conversion, p_ctr, rng.choice(0.0046 + 4e-6 * np.arange(24), n))
    )
    assert dead["cvr_distinct_predictions_clicked"] == 24
    verdict = gate(dead, EvaluateConfig(min_ctr_auc=0.0, min_ctcvr_auc=0.0))
    assert not verdict.passed and "p_cvr takes 24 distinct value(s)" in verdict.reasons[0]
    informative = np.clip(0.25 + 0.1 * conversion + 0.1 * rng.standard_normal(n), 0.01, 0.99)
    healthy = compute_metrics(_frame(click, conversion, p_ctr, informative))
    assert gate(healthy, EvaluateConfig(min_ctr_auc=0.0, min_ctcvr_auc=0.0)).passed
