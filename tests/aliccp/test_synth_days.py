"""The drifting day series (aliccp/synth/days.py): deterministic, ordinary raw folders with
ground truth and oracle per day, churn of items, a bad day, and the CLI entry point."""

from __future__ import annotations

import json

import pytest

from aliccp.synth.days import DAYS_FILE, read_days, synthesize_days

ARGS = {"days": 3, "n_train": 3000, "n_test": 600, "seed": 11}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    out = tmp_path_factory.mktemp("days") / "series"
    return out, synthesize_days(out, **ARGS, churn=0.1, drift=0.2, bad_day=2)


def _ids(day_dir, field="205"):
    """The item ids (field 205) written in a day's train skeleton."""
    ids = set()
    for line in (day_dir / "sample_skeleton_train.csv").read_text().splitlines():
        features = line.split(",", 5)[5].split("\x01")
        pairs = (f.split("\x02") for f in features)  # field \x02 id \x03 value
        ids |= {rest.split("\x03")[0] for name, rest in pairs if name == field}
    return ids


def test_each_day_is_a_raw_folder_with_its_truth_and_oracle(series):
    out, records = series
    assert [r.folder for r in read_days(out)] == ["day-01", "day-02", "day-03"]
    for r in records:
        folder = out / r.folder
        oracle = json.loads((folder / "oracle.json").read_text())
        assert set(oracle) == {"train", "test"} and oracle["test"]["impressions"] == 600
        for split in ("train", "test"):
            assert (folder / f"ground_truth_{split}.csv").is_file()
            assert (folder / f"sample_skeleton_{split}.csv").is_file()
    first, second, third = records
    assert first.items_born == 0 and third.items_born == third.items_retired > 0
    # New items appear and retired ones go: day 3 shows items day 1 never did, and back.
    day1, day3 = _ids(out / "day-01"), _ids(out / "day-03")
    assert day3 - day1 and day1 - day3


def test_the_bad_day_doubles_the_click_rate_and_the_next_day_is_normal(series):
    _, records = series
    ctr = [r.oracle["train"]["clicks"] / r.oracle["train"]["impressions"] for r in records]
    assert records[1].bad == "click_shift" and records[0].bad is None is records[2].bad
    assert ctr[1] > 1.5 * ctr[0] and abs(ctr[2] / ctr[0] - 1) < 0.25


def test_the_series_is_deterministic(series, tmp_path):
    out, _ = series
    again = tmp_path / "again"
    synthesize_days(again, **ARGS, churn=0.1, drift=0.2, bad_day=2)
    for name in ("day-03/sample_skeleton_train.csv", "day-02/common_features_test.csv", DAYS_FILE):
        assert (again / name).read_bytes() == (out / name).read_bytes()


def test_a_defects_day_is_written_with_its_manifest(tmp_path):
    records = synthesize_days(tmp_path, 2, 2000, 400, 3, bad_day=2, bad_kind="defects")
    assert (tmp_path / "day-02" / "defects.csv").is_file()
    assert not (tmp_path / "day-01" / "defects.csv").exists() and records[1].bad == "defects"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0}, "days must be a positive integer"),
        ({"bad_day": 5}, "bad_day must be a day of the series"),
        ({"bad_kind": "flood"}, "bad_kind must be one of click_shift, defects"),
        ({"churn": 1.0}, r"churn must be in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        synthesize_days(tmp_path, **{**ARGS, **kwargs})


def test_the_cli_writes_a_series_and_refuses_a_bad_day_outside_it(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    args = ["synth", "--days", "2", "--train", "1500", "--test", "300", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "day-02" in result.output and (tmp_path / DAYS_FILE).is_file()
    result = runner.invoke(app, [*args, "--bad-day", "3"])
    assert result.exit_code == 1 and "bad_day must be a day of the series" in result.output
