"""The nightly benchmark's summary and table (benchmarks/nightly.py), on a made-up record."""

from __future__ import annotations

import pytest

from benchmarks.nightly import summarise, table


def _night(night, b, c, b_s, c_s):
    return {
        "night": night,
        "oracle": {"ctr_auc": 0.77, "ctcvr_auc": 0.85},
        "a_stale": {"ctr_auc": 0.70, "ctcvr_auc": 0.77},
        "b_window": {"ctr_auc": b, "ctcvr_auc": 0.79},
        "c_warm": {"ctr_auc": c, "ctcvr_auc": 0.785},
        "seconds": {"b_ingest": 10.0, "b_train": b_s, "c_ingest": 2.0, "c_train": c_s},
    }


def test_the_summary_skips_night_one_and_checks_the_target():
    nights = [_night(1, 0.70, 0.70, 50, 50), _night(2, 0.72, 0.719, 150, 40)]
    out = summarise(nights)
    assert out["c_minus_b_ctr_auc"] == pytest.approx(-0.001)
    assert out["c_minus_b_ctcvr_auc"] == pytest.approx(-0.005)
    assert out["c_over_b_train_time"] == pytest.approx(40 / 150)
    assert out["a_stale_ctr_auc_gap_to_oracle"] == pytest.approx(0.07)
    assert out["target_met"]
    assert not summarise([_night(2, 0.72, 0.715, 150, 40)])["target_met"]  # 0.005 behind
    assert not summarise([_night(2, 0.72, 0.72, 90, 40)])["target_met"]  # too slow


def test_the_table_has_a_row_per_night():
    text = table({"nights": [_night(1, 0.7, 0.7, 50, 50), _night(2, 0.72, 0.719, 150, 40)]})
    rows = text.splitlines()
    assert len(rows) == 4 and rows[3].startswith("| 2 | 0.7700 / 0.8500")
