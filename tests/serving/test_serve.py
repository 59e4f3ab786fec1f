"""The served model: request records -> model inputs, a real `mlflow models serve` on
loopback answering like the model in process (and 4xx for malformed requests), and batch
scoring of raw files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests
import yaml

from aliccp.format import R_COLUMNS, R_ENTRY, R_UNKNOWN_KEY
from models.config import ModelConfig
from models.features import ALL_FIELDS, OUTPUT_KEYS, SAMPLE_ID_KEY, ids_key, wts_key
from serving.serve import (
    InvalidRecordError,
    log_serving_model,
    records_to_inputs,
    score_raw,
    table_to_records,
)
from tasks.config import IngestConfig
from tasks.ingest import ingest_ali_ccp, load_vocabularies
from tasks.inputs import SplitReader, predict_split
from tests.conftest import REPO

MODEL_NAME = "esmm"
UNKNOWN_IDS = (10**12, 10**12 + 7)  # in no vocabulary


@pytest.fixture(scope="module")
def ingested(small_raw, tmp_path_factory) -> Path:
    """small_raw ingested (min_count 2, so rare ids are out of vocabulary)."""
    out = tmp_path_factory.mktemp("ingest")
    ingest_ali_ccp(small_raw, out, IngestConfig(min_count=2, workers=1))
    return out


@pytest.fixture(scope="module")
def keras_model_path(ingested, tmp_path_factory) -> Path:
    """A small ESMM over the ingested vocabularies, embeddings scaled up so ids matter."""
    from models.esmm import EmbeddingBag, build_esmm

    config = ModelConfig(embedding_dim=4, ctr_tower={"units": [8]}, cvr_tower={"units": [8]})
    model = build_esmm(config, load_vocabularies(ingested / "vocab.parquet"), seed=5)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, EmbeddingBag):
            layer.embeddings.assign(rng.normal(size=layer.embeddings.shape).astype("float32"))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def keras_model(keras_model_path):
    import keras

    import models.esmm  # noqa: F401  (custom layers)

    return keras.models.load_model(keras_model_path, compile=False)


@pytest.fixture(scope="module")
def test_records(ingested) -> list[dict]:
    """Request records of the first 40 test impressions (user and impression fields)."""
    reader = SplitReader(ingested / "test")
    table = next(reader.tables(40))
    return table_to_records(_joined(reader, table))


@pytest.fixture(scope="module")
def store(keras_model_path, tmp_path_factory):
    """A SQLite MLflow store with the served model registered as esmm@champion."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        experiment = mlflow.create_experiment("serve", artifact_location=str(root / "mlruns"))
        with mlflow.start_run(experiment_id=experiment):
            info = log_serving_model(keras_model_path, registered_model_name=MODEL_NAME)
        MlflowClient(tracking_uri).set_registered_model_alias(
            MODEL_NAME, "champion", info.registered_model_version
        )
        yield {"root": root, "tracking_uri": tracking_uri, "info": info}
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def server(store):
    """`esmm serve` (a real `mlflow models serve --env-manager local`) on 127.0.0.1."""
    root = store["root"]
    (root / "params.yaml").write_text(
        yaml.safe_dump({"register": {"tracking_uri": store["tracking_uri"]}})
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PATH": "/usr/bin:/bin",  # the environment not activated: `esmm serve` must cope
    }
    log = open(root / "server.log", "w")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--port",
            str(port),
            "--params",
            "params.yaml",
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the server's workers share the group: one kill ends all
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"esmm serve exited {proc.returncode}:\n{(root / 'server.log').read_text()}"
                )
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no /ping answer in 240 s:\n{(root / 'server.log').read_text()}"
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _joined(reader: SplitReader, table):
    """An impression batch with its user-side lists, as one table of all fields."""
    import pyarrow as pa

    common, rows = reader.contexts(table)
    contexts = common.take(rows)  # one user-side row per impression
    columns = {}
    for name in table.column_names:
        columns[name] = table[name]
    for name in contexts.column_names:
        if name.startswith(("ids_", "wts_")):
            columns[name] = contexts[name]
    return pa.table(columns)


def _invoke(url: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60
    )


def _in_process(keras_model, records: list[dict]) -> pd.DataFrame:
    outputs = keras_model.predict_on_batch(records_to_inputs(records))
    return pd.DataFrame({k: np.asarray(outputs[k], np.float64) for k in OUTPUT_KEYS})


# --- records -> inputs (in process) -----------------------------------------------------------


def test_records_give_the_same_inputs_as_training(ingested):
    """Records made from an ingested batch become exactly the inputs training feeds, with
    the user-side rows repeated per impression instead of shared per context."""
    from models.features import COMMON_FIELDS

    reader = SplitReader(ingested / "test")
    table = next(reader.tables(64))
    expected = reader.features(table)
    rows = expected.pop("context_row")
    for f in COMMON_FIELDS:  # one row per context -> one row per impression
        for key in (ids_key(f), wts_key(f)):
            expected[key] = expected[key][rows]
    got = records_to_inputs(table_to_records(_joined(reader, table)))
    assert got.pop("context_row").tolist() == [-1] * table.num_rows  # each its own context
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_an_omitted_field_equals_an_empty_one():
    """Absent fields may be omitted or given as []: the inputs are identical."""
    omitted = records_to_inputs([{"205": [[3, 1.0]]}])
    empty = records_to_inputs([{"205": [[3, 1.0]], "101": [], "109_14": []}])
    for key in omitted:
        np.testing.assert_array_equal(omitted[key], empty[key], err_msg=key)
    assert omitted[ids_key("101")].tolist() == [[0]]  # padding only


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "the request holds no records"),
        ([{"999": [[1, 1.0]]}], "record 0, field '999': unknown field"),
        ([{}, {"101": [["17", 1.0]]}], "record 1, field '101', entry 0: id must be an integer"),
        ([{"101": [[17.5, 1.0]]}], "record 0, field '101', entry 0: id must be an integer"),
        ([{"101": [[-1, 1.0]]}], "id must be in [0, 2**63), got -1"),
        ([{"101": [[True, 1.0]]}], "id must be an integer, got bool"),
        (
            [{"109_14": [[1, 2.0], [2, float("nan")]]}],
            "field '109_14', entry 1: weight must be finite",
        ),
        ([{"101": [[1, "1.0"]]}], "weight must be a number, got str"),
        ([{"101": [[1]]}], "must be an [id, weight] pair, got 1 value(s)"),
        ([{"101": [1, 1.0]}], "entry 0: must be an [id, weight] pair, got int 1"),
        ([{"101": "17:1.0"}], "field '101': must be a list of [id, weight] pairs"),
        (["101"], "record 0: must be an object"),
    ],
)
def test_malformed_records_are_named(records, message):
    with pytest.raises(InvalidRecordError) as err:
        records_to_inputs(records)
    assert message in str(err.value)


# --- the served model ------------------------------------------------------------------------


def test_logged_model_is_code_with_the_keras_file_and_a_signature(store):
    """Models-from-code (no pickle), the .keras file under the artifacts, pinned requirements."""
    from mlflow.artifacts import download_artifacts

    local = Path(download_artifacts(store["info"].model_uri, dst_path=str(store["root"] / "dl")))
    assert [p.name for p in local.glob("**/*.keras")] == ["model.keras"]
    assert not list(local.glob("**/*.pkl"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert (
        mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    )
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["name"] == "features"
    assert sorted(inputs[0]["properties"]) == sorted(ALL_FIELDS)
    outputs = [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])]
    assert outputs == list(OUTPUT_KEYS)
    requirements = (local / "requirements.txt").read_text().split()
    assert "tensorflow==2.16.2" in requirements and "keras==3.15.1" in requirements
    assert (local / "code" / "models" / "esmm.py").is_file()


@pytest.mark.slow  # a fresh interpreter importing TensorFlow: 10-30 s on 2 cores
def test_logged_model_loads_its_own_shipped_code(store, tmp_path):
    """In a fresh process outside the repository, the model runs the code logged with it."""
    script = (
        "import mlflow, sys\n"
        f"mlflow.set_tracking_uri({store['tracking_uri']!r})\n"
        "model = mlflow.pyfunc.load_model('models:/esmm@champion')\n"
        "import serving.serve\n"
        "print(serving.serve.__file__)\n"
        "print(model.predict([{'features': {'101': [[5, 1.0]]}}]).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    module_file, shape = proc.stdout.strip().splitlines()[-2:]
    assert Path(module_file).parts[-3:] == ("code", "serving", "serve.py")
    assert str(REPO) not in module_file
    assert shape == "(1, 3)"


def test_server_answers_with_the_in_process_numbers(server, store, keras_model, test_records):
    """A batch and a single record, served over HTTP, match the Keras model and the pyfunc
    model loaded in process."""
    import mlflow

    expected = _in_process(keras_model, test_records)
    for form in ("dataframe_records", "inputs"):
        response = _invoke(server, {form: [{"features": r} for r in test_records]})
        assert response.status_code == 200, response.text
        served = pd.DataFrame(response.json()["predictions"])[list(OUTPUT_KEYS)]
        np.testing.assert_allclose(served.to_numpy(), expected.to_numpy(), rtol=1e-6, atol=1e-7)
    assert expected["p_ctr"].std() > 1e-3  # the records really differ

    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    local = pyfunc.predict([{"features": r} for r in test_records])
    np.testing.assert_allclose(local.to_numpy(), expected.to_numpy(), rtol=1e-6, atol=1e-7)

    single = _invoke(server, {"dataframe_records": [{"features": test_records[3]}]})
    assert single.status_code == 200, single.text
    row = single.json()["predictions"][0]
    np.testing.assert_allclose(
        [row[k] for k in OUTPUT_KEYS], expected.iloc[3].to_numpy(), rtol=1e-6, atol=1e-7
    )


def test_esmm_serve_binds_loopback_by_default(server, store):
    """Started without --host, `esmm serve` listens on 127.0.0.1 only."""
    log = (store["root"] / "server.log").read_text()
    assert f"Uvicorn running on {server} " in log
    assert "0.0.0.0" not in log


def test_unknown_ids_go_to_the_oov_bucket(server, keras_model, test_records, ingested):
    """Two different unknown item ids score the same; a known one does not."""
    base = test_records[0]
    known = int(load_vocabularies(ingested / "vocab.parquet")["205"][0])
    records = [{**base, "205": [[i, 1.0]]} for i in (*UNKNOWN_IDS, known)]
    response = _invoke(server, {"dataframe_records": [{"features": r} for r in records]})
    assert response.status_code == 200, response.text
    p = pd.DataFrame(response.json()["predictions"])["p_ctr"].to_numpy()
    assert p[0] == p[1]
    assert abs(p[0] - p[2]) > 1e-6
    np.testing.assert_allclose(p, _in_process(keras_model, records)["p_ctr"], rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"dataframe_records": [{"features": {"101": [[1, 1.0]], "999": [[5, 1.0]]}}]}, "999"),
        (
            {"dataframe_records": [{"features": {"101": [["abc", 1.0]]}}]},
            "record 0, field '101', entry 0: id must be an integer, got str 'abc'",
        ),
        (
            '{"dataframe_records": [{"features": {"109_14": [[1, NaN]]}}]}',
            "field '109_14', entry 0: weight must be finite, got nan",
        ),
        (
            {"dataframe_records": [{"features": {}}, {"features": {"205": [[1, 1.0, 2.0]]}}]},
            "record 1, field '205', entry 0: must be an [id, weight] pair, got 3 value(s)",
        ),
        (
            {"dataframe_records": [{"features": {"205": 7}}]},
            "field '205': must be a list of [id, weight] pairs, got int 7",
        ),
        ({"dataframe_records": [{"feature": {"205": [[1, 1.0]]}}]}, "missing inputs ['features']"),
        ({"inputs": [{"features": 5}]}, "Expected data to be dictionary, got int"),
        ({"inputs": []}, "'[]'"),
        ({"dataframe_records": []}, "missing inputs ['features']"),
        (
            {"dataframe_split": {"columns": ["features"], "data": []}},
            "the request holds no records",
        ),
        ("{not json", "valid JSON"),
    ],
    ids=[
        "unknown-field",
        "string-id",
        "nan-weight",
        "pair-of-three",
        "field-not-a-list",
        "no-features-key",
        "record-not-an-object",
        "empty-inputs",
        "empty-records",
        "empty-dataframe",
        "not-json",
    ],
)
def test_malformed_requests_get_a_400_naming_the_problem(server, body, message):
    response = _invoke(server, body)
    assert response.status_code == 400, response.text
    assert message in response.json()["message"]


# --- batch scoring --------------------------------------------------------------------------


def test_score_matches_the_ingested_predictions(small_raw, ingested, keras_model, tmp_path):
    """Scoring the raw folder gives, impression for impression, the predictions made from
    the ingested test split."""
    report = score_raw(
        small_raw, tmp_path / "predictions.parquet", keras_model, batch_size=500, progress=False
    )
    assert report.rows_read == report.rows_scored + report.rows_not_scored
    scored = pq.read_table(tmp_path / "predictions.parquet").to_pandas()
    assert len(scored) == report.rows_scored
    test = scored[scored["file"] == "sample_skeleton_test.csv"].set_index(SAMPLE_ID_KEY)
    expected = predict_split(keras_model, ingested / "test", batch_size=700).set_index(
        SAMPLE_ID_KEY
    )
    assert len(test) == len(expected)
    test = test.loc[expected.index]
    np.testing.assert_allclose(
        test[list(OUTPUT_KEYS)], expected[list(OUTPUT_KEYS)], rtol=1e-5, atol=1e-7
    )
    assert (test["click"].to_numpy() == expected["click"].to_numpy()).all()


def test_score_reports_bad_lines(small_raw, keras_model, tmp_path):
    """Bad lines are counted by reason and listed with their line numbers, not dropped."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(small_raw / "common_features_test.csv", raw / "common_features_x.csv")
    good = (small_raw / "sample_skeleton_test.csv").read_text().splitlines()[:20]
    fields = good[0].split(",")
    unknown_key = ",".join([fields[0] + "u", fields[1], fields[2], "f" * 32, *fields[4:]])
    nan_weight = good[1].rsplit("\x03", 1)[0] + "\x03nan"
    lines = [*good, good[2][:15], unknown_key, nan_weight]
    (raw / "sample_skeleton_x.csv").write_text("\n".join(lines) + "\n")

    report = score_raw(raw, tmp_path / "out" / "p.parquet", keras_model, progress=False)
    assert (report.rows_read, report.rows_scored, report.rows_not_scored) == (23, 20, 3)
    assert report.bad_lines == {R_COLUMNS: 1, R_UNKNOWN_KEY: 1, R_ENTRY: 1}
    bad = pd.read_csv(report.bad_lines_path)
    assert bad["line"].tolist() == [21, 22, 23]
    assert "3 bad lines" in report.summary()


def test_score_names_a_missing_common_file(small_raw, keras_model, tmp_path):
    shutil.copy(small_raw / "sample_skeleton_test.csv", tmp_path / "sample_skeleton_test.csv")
    with pytest.raises(FileNotFoundError, match="common_features_test.csv"):
        score_raw(tmp_path, tmp_path / "p.parquet", keras_model, progress=False)


def test_esmm_score_command_uses_the_champion(store, small_raw, tmp_path):
    """`esmm score` loads models:/esmm@champion from the configured store."""
    from typer.testing import CliRunner

    from flows.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"register": {"tracking_uri": store["tracking_uri"]}}))
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
        shutil.copy(small_raw / name, raw / name)
    out = tmp_path / "p.parquet"
    result = CliRunner().invoke(
        app, ["score", str(raw), "--out", str(out), "--params", str(params)]
    )
    assert result.exit_code == 0, result.output
    assert "scored 1,500 of 1,500 impressions" in result.output
    assert pq.read_table(out).num_rows == 1500


def test_score_reads_gzip_files_like_plain_ones(small_raw, keras_model, tmp_path):
    import gzip

    for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
        (tmp_path / "gz").mkdir(exist_ok=True)
        (tmp_path / "gz" / f"{name}.gz").write_bytes(gzip.compress((small_raw / name).read_bytes()))
        (tmp_path / "plain").mkdir(exist_ok=True)
        shutil.copy(small_raw / name, tmp_path / "plain" / name)
    score_raw(tmp_path / "gz", tmp_path / "gz.parquet", keras_model, progress=False)
    score_raw(tmp_path / "plain", tmp_path / "plain.parquet", keras_model, progress=False)
    gz = pq.read_table(tmp_path / "gz.parquet").to_pandas()
    plain = pq.read_table(tmp_path / "plain.parquet").to_pandas()
    assert len(gz) == 1500
    pd.testing.assert_frame_equal(gz.drop(columns="file"), plain.drop(columns="file"))
