"""The served model: logged as code with its `.keras` file, loading its shipped code, and a
real `mlflow models serve` on loopback answering like the model in process (and 4xx for
malformed requests)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from models.features import ALL_FIELDS, OUTPUT_KEYS
from serving.records import records_to_inputs
from tasks.ingest import load_vocabularies
from tests.conftest import REPO
from tests.serving.conftest import MODEL_NAME

UNKNOWN_IDS = (10**12, 10**12 + 7)  # in no vocabulary


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


def _invoke(url: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60
    )


def _in_process(keras_model, records: list[dict]) -> pd.DataFrame:
    outputs = keras_model.predict_on_batch(records_to_inputs(records))
    return pd.DataFrame({k: np.asarray(outputs[k], np.float64) for k in OUTPUT_KEYS})


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
        "import serving.records\n"
        "print(serving.records.__file__)\n"
        "print(model.predict([{'features': {'101': [[5, 1.0]]}}]).shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    module_file, shape = proc.stdout.strip().splitlines()[-2:]
    assert Path(module_file).parts[-3:] == ("code", "serving", "records.py")
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
