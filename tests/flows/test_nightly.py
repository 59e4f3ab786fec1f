"""The nightly loop end to end (flows/nightly.py): a three-day series with a bad second day,
each night `esmm data add` and the real retraining flow (Prefect, DVC stages, TFDV, MLflow)
with `train.warm_start: champion`. The bad day is refused and the champion stays; the next
good day is warm-started from it, promoted, tagged with its lineage, and served."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMALL_PARAMS, make_project

DAYS = {"train": 6000, "test": 1500, "seed": 7}
# On 6,000 impressions a day (about 420 clicks, 50 conversions) the label rates vary by
# chance: the limits sit well above that noise and well below the bad day's doubled CTR.
# Drift is measured from 2,000 rows on (the default 5,000 exceeds a day's train split here).
PARAMS = {
    "validate": {
        **SMALL_PARAMS["validate"],
        "label_drift": {"max_ctr_change": 0.3, "max_cvr_change": 0.6},
        "drift": {"min_examples": 2000},
    },
    "train": {**SMALL_PARAMS["train"], "epochs": 1, "warm_start": "champion"},
}


@pytest.fixture(scope="module")
def nightly(tmp_path_factory, prefect_harness):
    """Three nights of a series whose day 2 has a shifted click rate: (project, nights)."""
    from aliccp.synth.days import synthesize_days
    from flows.nightly import run_nightly

    root = tmp_path_factory.mktemp("nightly")
    series = root / "series"
    synthesize_days(
        series, 3, DAYS["train"], DAYS["test"], DAYS["seed"], bad_day=2, bad_kind="click_shift"
    )
    project = make_project(root / "project", series / "day-01", PARAMS)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        nights = run_nightly(series, log=lambda line: None)
    return project, nights


def test_the_bad_day_is_refused_and_the_next_good_day_recovers(nightly):
    project, (first, bad, good) = nightly
    assert (first.outcome, first.champion_after) == ("promoted", "1")
    assert first.oracle["ctr_auc"] > first.metrics["ctr_auc"] > 0.5
    assert bad.outcome == "refused" and bad.champion_after == "1"
    assert "validate" in bad.reason and bad.registered is None
    report = json.loads((project / "artifacts" / "validate" / "report.json").read_text())
    assert report["passed"]  # the last validation (day 3) passed: compared with day 1
    assert (good.outcome, good.registered, good.champion_after) == ("promoted", "2", "2")
    written = json.loads((project / "artifacts" / "nightly" / "nights.json").read_text())
    assert [n["outcome"] for n in written] == ["promoted", "refused", "promoted"]


def test_the_warm_started_champion_records_its_lineage_and_serves(nightly):
    import mlflow

    from serving.records import table_to_records
    from tasks.inputs import SplitReader
    from tasks.tracking import mlflow_client, mlflow_uris
    from tests.serving.conftest import joined_table

    project, _ = nightly
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow_client(uri)
    assert client.get_model_version("esmm", "2").tags["warm_started_from"] == "1"
    assert client.get_model_version("esmm", "1").tags["warm_started_from"] == "none"
    lineage = json.loads((project / "artifacts" / "train" / "warm_start.json").read_text())
    assert lineage["from_version"] == "1" and lineage["ids"]["new"] > 0  # day 3's new ids
    run = client.get_model_version("esmm", "2").run_id
    logged = {a.path for a in client.list_artifacts(run, "warm_start")}
    assert logged == {"warm_start/warm_start.json", "warm_start/id_ages.parquet"}
    reader = SplitReader(project / "artifacts" / "ingest" / "test")
    records = table_to_records(joined_table(reader, next(reader.tables(20))))
    with mlflow_uris(uri):
        served = mlflow.pyfunc.load_model("models:/esmm@champion").predict(
            [{"features": r} for r in records]
        )
    assert len(served) == 20 and served["p_ctr"].between(0, 1).all()


def test_days_to_run_are_ranges_or_lists_and_bad_text_is_named():
    from flows.nightly import parse_days

    assert parse_days("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="--days '1-a': expected days such as 1-4"):
        parse_days("1-a")
