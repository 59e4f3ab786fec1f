"""The registry: promotion, rollback, the champion history and racing promotions against a
real SQLite MLflow registry; and a label-shuffled model refused by the gate end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tasks.champion import (
    CHAMPION,
    LOCK_SUFFIX,
    PromotionError,
    champion_history,
    champion_version,
    fetch_champion,
    promote,
    rollback,
)
from tasks.register import params_digest, schema_digest
from tasks.tracking import mlflow_uris
from tests.conftest import REPO, SMALL_PARAMS

pytestmark = pytest.mark.timeout(600)
MODEL = "esmm"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite database (creating one takes seconds: copy it)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("registry") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _registry(tmp_path: Path, gates: list[bool], empty_db: Path) -> str:
    """A SQLite registry with one version per gate verdict (1, 2, ...)."""
    from mlflow import MlflowClient

    shutil.copy(empty_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model(MODEL)
    for passed in gates:
        client.create_model_version(
            MODEL,
            source=str(tmp_path),
            tags={
                "gate_passed": str(passed).lower(),
                "gate_reasons": "all checks passed" if passed else "ctr_auc = 0.5 is below 0.55",
            },
        )
    return uri


def test_promote_requires_a_passed_gate_or_a_logged_override(tmp_path, empty_db):
    from mlflow import MlflowClient

    uri = _registry(tmp_path, [True, False], empty_db)
    first = promote(uri, MODEL, "1")
    assert first.previous is None and champion_version(uri, MODEL) == "1"

    with pytest.raises(PromotionError, match="did not pass the gate.*ctr_auc"):
        promote(uri, MODEL, "2")
    with pytest.raises(PromotionError, match="needs a reason"):
        promote(uri, MODEL, "2", override=True)
    assert champion_version(uri, MODEL) == "1"

    forced = promote(uri, MODEL, "2", reason="hotfix approved by on-call", override=True)
    assert forced.override and forced.previous == "1" and champion_version(uri, MODEL) == "2"
    tags = MlflowClient(uri, uri).get_model_version(MODEL, "2").tags
    assert tags["promotion_override"] == "true" and tags["promoted_from"] == "1"
    assert tags["promotion_reason"] == "hotfix approved by on-call"
    with pytest.raises(PromotionError, match="does not exist"):
        promote(uri, MODEL, "9")


def test_rollback_walks_back_through_the_champion_history(tmp_path, empty_db):
    """1 -> 2 -> 3, then rollback to 2, to 1, then nothing earlier; the history is read
    back from the registry alone."""
    uri = _registry(tmp_path, [True, True, True], empty_db)
    for version in ("1", "2", "3"):
        promote(uri, MODEL, version)
    assert rollback(uri, MODEL, reason="bad CTR in production").version == "2"
    assert champion_version(uri, MODEL) == "2"
    assert rollback(uri, MODEL).version == "1"
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(uri, MODEL)
    history = champion_history(uri, MODEL)
    assert [(e.seq, e.action, e.previous, e.version) for e in history] == [
        (1, "promote", None, "1"),
        (2, "promote", "1", "2"),
        (3, "promote", "2", "3"),
        (4, "rollback", "3", "2"),
        (5, "rollback", "2", "1"),
    ]
    assert history[3].reason == "bad CTR in production"
    # a promotion after rollbacks continues the chain
    assert promote(uri, MODEL, "3").previous == "1"
    assert rollback(uri, MODEL).version == "1"


_RACER = """
import sys, time
from pathlib import Path
from tasks.champion import PromotionError, promote
uri, version, ready, go = sys.argv[1:5]
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.005)
done = 0
for _ in range(4):
    try:
        promote(uri, "esmm", version, reason=f"racer {version}")
        done += 1
    except PromotionError as err:
        assert "champion already" in str(err), err
print(done)
"""


@pytest.mark.slow  # two fresh Python processes importing MLflow: 15-40 s on 2 busy cores
def test_racing_promotions_leave_one_champion_and_a_consistent_history(tmp_path, empty_db):
    """Two processes promote their own version four times each, released together: every
    successful promotion is in the history exactly once, each event's `previous` is the
    version before it, the last event names the champion, and the lock is released."""
    from mlflow import MlflowClient

    uri = _registry(tmp_path, [True, True], empty_db)
    go = tmp_path / "go"
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = []
    for version in ("1", "2"):
        ready = tmp_path / f"ready-{version}"
        cmd = [sys.executable, "-c", _RACER, uri, version, str(ready), str(go)]
        procs.append((ready, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)))
    deadline = time.monotonic() + 120
    while not all(ready.exists() for ready, _ in procs) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    outputs = [proc.communicate(timeout=300) for _, proc in procs]
    assert all(proc.returncode == 0 for _, proc in procs), outputs
    promotions = sum(int(out.strip()) for out, _ in outputs)

    history = champion_history(uri, MODEL)
    assert len(history) == promotions >= 1
    assert [e.seq for e in history] == list(range(1, promotions + 1))
    for before, after in zip(history, history[1:], strict=False):
        assert after.previous == before.version != after.version
    client = MlflowClient(uri, uri)
    assert str(client.get_registered_model(MODEL).aliases[CHAMPION]) == history[-1].version
    assert [m.name for m in client.search_registered_models()] == [MODEL]  # no lock left
    assert rollback(uri, MODEL).version == history[-2].version


def test_a_stale_lock_is_broken(tmp_path, empty_db, monkeypatch):
    """A lock left by a crashed process does not block promotions for ever."""
    from mlflow import MlflowClient

    import tasks.champion as register

    uri = _registry(tmp_path, [True], empty_db)
    MlflowClient(uri, uri).create_registered_model(MODEL + LOCK_SUFFIX)
    monkeypatch.setattr(register, "LOCK_STALE_SECONDS", 0.5)
    time.sleep(0.6)
    assert promote(uri, MODEL, "1").version == "1"


def test_cli_promote_rollback_and_champions(tmp_path, empty_db):
    from flows.cli import app

    uri = _registry(tmp_path, [True, False], empty_db)
    params = tmp_path / "params.yaml"
    params.write_text(f"register:\n  tracking_uri: {uri}\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["promote", "1", "-p", str(params)])
    assert ok.exit_code == 0, ok.output
    refused = runner.invoke(app, ["promote", "2", "-p", str(params)])
    assert refused.exit_code == 1 and "did not pass the gate" in refused.stderr
    forced = runner.invoke(
        app, ["promote", "2", "--force", "--reason", "manual check", "-p", str(params)]
    )
    assert forced.exit_code == 0 and "OVERRIDDEN" in forced.output
    back = runner.invoke(app, ["rollback", "-p", str(params)])
    assert back.exit_code == 0 and "2 -> 1" in back.output
    shown = runner.invoke(app, ["champions", "-p", str(params)])
    assert shown.exit_code == 0
    assert "manual check (OVERRIDE)" in shown.output and "rollback" in shown.output


def test_digests_follow_content(tmp_path):
    from tasks.config import Params

    assert params_digest(Params()) == params_digest(Params())
    assert params_digest(Params()) != params_digest(Params(train={"epochs": 3}))
    shutil.copytree(REPO / "schema", tmp_path / "schema")
    before = schema_digest(tmp_path / "schema")
    with open(tmp_path / "schema" / "common.pbtxt", "a") as fh:
        fh.write("\n")
    assert schema_digest(tmp_path / "schema") != before
    assert schema_digest(tmp_path / "empty") == "none"


def test_fetch_champion_finds_the_keras_file_anywhere_in_the_artifacts(tmp_path):
    """However the model was logged, the champion's `.keras` file is found."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.config import RegisterConfig

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = RegisterConfig(tracking_uri=uri)
    assert fetch_champion(cfg, tmp_path / "none") is None  # no registry yet
    nested = tmp_path / "logged" / "artifacts" / "deep"
    nested.mkdir(parents=True)
    (nested / "model.keras").write_bytes(b"keras zip")
    with mlflow_uris(uri):
        mlflow.set_experiment("fetch")  # not an experiment id left active by an earlier test
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(tmp_path / "logged"), "model")
    client = MlflowClient(uri, uri)
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id)
    assert fetch_champion(cfg, tmp_path / "dl") is None  # registered, but no champion
    client.set_registered_model_alias(MODEL, CHAMPION, "1")
    # Another registry left as MLflow's process-wide default must not be read instead.
    with mlflow_uris(f"sqlite:///{tmp_path / 'other.db'}"):
        champion = fetch_champion(cfg, tmp_path / "dl")
    assert champion.version == "1" and champion.model_path.read_bytes() == b"keras zip"


def _shuffle_labels(split_dir: Path, seed: int) -> None:
    """Permute the (click, conversion) pairs of a split: features no longer predict them."""
    path = split_dir / "impressions.parquet"
    table = pq.read_table(path)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    for name in ("click", "conversion"):
        column = table[name].take(order)
        table = table.set_column(table.schema.get_field_index(name), name, column)
    pq.write_table(table, path)


@pytest.mark.slow  # two trainings and two model registrations: about a minute
# Over 80 lines: one scenario whose steps build on each other (a champion, a refused
# challenger, then register.promote: never), each step asserted where it happens.
def test_label_shuffled_model_is_refused_and_the_champion_stays(tmp_path, small_raw):
    """A model trained on label-shuffled data, scored against the champion on the same test
    split in the same run, is refused; it is registered as `challenger` only."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.config import Params
    from tasks.evaluate import evaluate_esmm, read_metrics
    from tasks.ingest import ingest_ali_ccp
    from tasks.register import register_esmm
    from tasks.train import train_esmm

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = Params.model_validate(
        SMALL_PARAMS
        | {
            "register": {"tracking_uri": uri, "promote": "gate"},
            "validate": {"schema_dir": str(REPO / "schema")},
        }
    )
    ingest_ali_ccp(small_raw, tmp_path / "ingest", params.ingest)
    test_split = tmp_path / "ingest" / "test"
    mlflow_tracking_uri_before = mlflow.get_tracking_uri()

    def train_evaluate_register(ingest_dir: Path, name: str):
        model = train_esmm(ingest_dir, tmp_path / name, params.model, params.train, verbose=0)
        champion = fetch_champion(params.register_, tmp_path / f"{name}-champion")
        result = evaluate_esmm(
            model.model_path, test_split, tmp_path / f"{name}-eval", params.evaluate, champion
        )
        registration = register_esmm(
            model.model_path,
            result.metrics,
            result.verdict,
            "data-v1",
            params,
            tmp_path / f"{name}-register",
            champion_metrics=result.champion,
            artifacts=[("evaluation/plots", tmp_path / f"{name}-eval" / "plots")],
        )
        return result, registration

    good, good_registration = train_evaluate_register(tmp_path / "ingest", "good")
    assert good.verdict.passed and good.champion is None
    assert good_registration.aliases == ["challenger", "champion"]

    shutil.copytree(tmp_path / "ingest", tmp_path / "shuffled")
    for split in ("train", "valid"):
        _shuffle_labels(tmp_path / "shuffled" / split, seed=5)
    bad, bad_registration = train_evaluate_register(tmp_path / "shuffled", "bad")

    assert not bad.verdict.passed
    assert any("regressed" in r and "champion version 1" in r for r in bad.verdict.reasons)
    # the champion was scored on the same split in this run: same numbers as its own run
    assert bad.champion["ctr_auc"] == pytest.approx(good.metrics["ctr_auc"], abs=1e-9)
    assert bad_registration.aliases == ["challenger"] and not bad_registration.gate_passed
    client = MlflowClient(uri, uri)
    aliases = client.get_registered_model(MODEL).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "2"}
    refused = client.get_model_version(MODEL, "2")
    assert refused.tags["gate_passed"] == "false" and "regressed" in refused.tags["gate_reasons"]
    assert refused.tags["compared_with_champion"] == "1"
    for key in ("data_version", "git_commit", "params_digest", "schema_digest", "metric.ctr_auc"):
        assert refused.tags[key]
    run = client.get_run(refused.run_id)
    assert run.data.tags["gate_passed"] == "false"
    assert "champion.ctr_auc" in run.data.metrics and "ctr_auc_se" in run.data.metrics
    logged = {a.path for a in client.list_artifacts(refused.run_id, "evaluation/plots")}
    assert "evaluation/plots/roc_ctr.png" in logged
    _, champion_metrics, verdict = read_metrics(tmp_path / "bad-eval" / "metrics.json")
    assert champion_metrics["version"] == "1" and not verdict.passed

    # register.promote: never (the default: dvc repro, dvc exp run): a model that passed the
    # gate gets `challenger` only; `champion` stays where it was.
    never = params.model_copy(
        update={"register_": params.register_.model_copy(update={"promote": "never"})}
    )
    registration = register_esmm(
        tmp_path / "good" / "model.keras",
        good.metrics,
        good.verdict,
        "data-v1",
        never,
        tmp_path / "never-register",
    )
    assert registration.gate_passed and registration.aliases == ["challenger"]
    aliases = client.get_registered_model(MODEL).aliases
    assert {k: str(v) for k, v in aliases.items()} == {"champion": "1", "challenger": "3"}
    # Registering left MLflow's process-wide URIs as they were: nothing points later steps,
    # tests or child processes at this store.
    assert uri not in (os.environ.get("MLFLOW_TRACKING_URI"), os.environ.get("MLFLOW_REGISTRY_URI"))
    assert mlflow_tracking_uri_before == mlflow.get_tracking_uri()
