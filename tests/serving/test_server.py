"""The scoring server (`esmm serve`, serving/app.py) on loopback: both request forms answer
like the model in process, candidates computed with the user side once; limits and
malformed requests get 4xx naming the problem; `--follow champion` switches on a promotion
and a rollback under load without a failed or mixed request; fuzzing never gets a 5xx or
grows the server; `esmm export` writes a SavedModel that reproduces the registered model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml

from benchmarks.serving_load import Client, bounded_load, fuzz_bodies
from models.features import COMMON_FIELDS, OUTPUT_KEYS
from serving.candidates import candidates_to_inputs
from serving.pyfunc import log_serving_model
from serving.records import records_to_inputs
from tasks.champion import promote, rollback
from tasks.tracking import mlflow_client, mlflow_uris
from tests.conftest import REPO

MAX_CANDIDATES = 64
MAX_BODY = 256 * 1024
UNKNOWN_IDS = (10**12, 10**12 + 7)  # in no vocabulary


@pytest.fixture(scope="module")
def registry(keras_model_path, tmp_path_factory):
    """A SQLite store with two versions of the served model (different weights), both
    passed by the gate, version 1 promoted to champion; a params.yaml pointing at it."""
    import keras
    import mlflow

    import models.esmm  # noqa: F401  (custom layers)

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    second = keras.models.load_model(keras_model_path, compile=False)
    for layer in second.layers:  # version 2: the output biases moved, so every score differs
        if layer.name.endswith("logit"):
            layer.bias.assign(layer.bias + 0.7)
    second_path = root / "model2.keras"
    second.save(second_path)
    with mlflow_uris(uri):
        experiment = mlflow.create_experiment("serve", artifact_location=str(root / "mlruns"))
        for path in (keras_model_path, second_path):
            with mlflow.start_run(experiment_id=experiment):
                log_serving_model(path, registered_model_name="esmm")
    client = mlflow_client(uri)
    for version in ("1", "2"):
        client.set_model_version_tag("esmm", version, "gate_passed", "true")
    promote(uri, "esmm", "1")
    params = {
        "register": {"tracking_uri": uri},
        "serve": {"max_candidates": MAX_CANDIDATES, "max_body_bytes": MAX_BODY},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return {"root": root, "tracking_uri": uri, "models": {"1": keras_model_path, "2": second_path}}


@pytest.fixture(scope="module")
def models(registry):
    import keras

    return {v: keras.models.load_model(p, compile=False) for v, p in registry["models"].items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(registry):
    """`esmm serve --follow champion` (checking every 0.5 s) on 127.0.0.1, small limits."""
    root = registry["root"]
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PATH": "/usr/bin:/bin",  # the environment not activated: `esmm serve` must cope
    }
    log = open(root / "server.log", "w")  # noqa: SIM115  (closed below)
    cmd = [sys.executable, "-m", "flows.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--follow", "champion", "--follow-interval", "0.5", "--params", "params.yaml"],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"esmm serve exited:\n{(root / 'server.log').read_text()}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, (root / "server.log").read_text()
            time.sleep(0.3)
        yield {"url": url, "pid": proc.pid, "log": root / "server.log"}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _post(url: str, body) -> requests.Response:
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return requests.post(
        f"{url}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=60
    )


def _split(record: dict) -> tuple[dict, dict]:
    """A record's user side and impression side."""
    user = {f: v for f, v in record.items() if f in COMMON_FIELDS}
    return user, {f: v for f, v in record.items() if f not in COMMON_FIELDS}


def _candidate_request(test_records: list[dict], n: int = 30) -> dict:
    """The first record's context with the impression sides of `n` records as candidates."""
    context = _split(test_records[0])[0]
    return {"context": context, "candidates": [_split(r)[1] for r in test_records[:n]]}


def _frame(predictions: list[dict]) -> np.ndarray:
    return pd.DataFrame(predictions)[list(OUTPUT_KEYS)].to_numpy()


def _expected(model, inputs) -> np.ndarray:
    outputs = model.predict_batch(inputs)
    return np.stack([np.asarray(outputs[k], np.float64).reshape(-1) for k in OUTPUT_KEYS], 1)


def test_record_requests_answer_like_the_model_in_process(server, registry, models, test_records):
    """Both record forms (and the pyfunc model in process) give the Keras model's numbers,
    and the answer names the version that produced them."""
    import mlflow

    expected = _expected(models["1"], records_to_inputs(test_records))
    assert expected[:, 0].std() > 1e-3  # the records really differ
    for form in ("dataframe_records", "inputs"):
        response = _post(server["url"], {form: [{"features": r} for r in test_records]})
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == response.json()["model_version"] == "1"
        np.testing.assert_allclose(
            _frame(response.json()["predictions"]), expected, rtol=1e-6, atol=1e-7
        )
    with mlflow_uris(registry["tracking_uri"]):
        pyfunc = mlflow.pyfunc.load_model("models:/esmm/1")
    local = pyfunc.predict([{"features": r} for r in test_records])
    np.testing.assert_allclose(local.to_numpy(), expected, rtol=1e-6, atol=1e-7)


def test_a_candidate_request_scores_like_whole_records(server, models, test_records):
    """One context and 30 candidates: each candidate scores as the record holding that context
    and that candidate, and the model got the user side once (one user-side row)."""
    request = _candidate_request(test_records)
    inputs = candidates_to_inputs(request["context"], request["candidates"])
    assert inputs["ids_109_14"].shape[0] == 1 and inputs["ids_205"].shape[0] == 30
    records = [{**request["context"], **c} for c in request["candidates"]]
    expected = _expected(models["1"], records_to_inputs(records))
    response = _post(server["url"], request)
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        _frame(response.json()["predictions"]), expected, rtol=1e-5, atol=1e-7
    )
    assert expected[:, 0].std() > 1e-3  # the candidates really differ


def test_esmm_serve_binds_loopback_by_default(server):
    log = server["log"].read_text()
    assert f"Uvicorn running on {server['url']} " in log
    assert "0.0.0.0" not in log


def test_unknown_ids_go_to_the_oov_bucket(server, test_records, ingested):
    from tasks.ingest import load_vocabularies

    known = int(load_vocabularies(ingested / "vocab.parquet")["205"][0])
    context, item = _split(test_records[0])
    request = {
        "context": context,
        "candidates": [{**item, "205": [[i, 1.0]]} for i in (*UNKNOWN_IDS, known)],
    }
    response = _post(server["url"], request)
    assert response.status_code == 200, response.text
    p = _frame(response.json()["predictions"])[:, 0]
    assert p[0] == p[1]
    assert abs(p[0] - p[2]) > 1e-6


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {"dataframe_records": [{"features": {"101": [[1, 1.0]], "999": [[5, 1.0]]}}]},
            400,
            "record 0, field '999': unknown field",
        ),
        (
            {"dataframe_records": [{"features": {"101": [["abc", 1.0]]}}]},
            400,
            "record 0, field '101', entry 0: id must be an integer, got str 'abc'",
        ),
        (
            '{"dataframe_records": [{"features": {"109_14": [[1, NaN]]}}]}',
            400,
            "not valid JSON",
        ),
        (
            {"dataframe_records": [{"features": {}}, {"features": {"205": [[1, 1.0, 2.0]]}}]},
            400,
            "record 1, field '205', entry 0: must be an [id, weight] pair, got 3 value(s)",
        ),
        ({"inputs": [{"features": 5}]}, 400, "record 0: must be an object mapping field names"),
        ({"dataframe_records": [{"feature": {}}]}, 400, "single key 'features'"),
        ({"dataframe_records": []}, 400, "the request holds no records"),
        ("{not json", 400, "not valid JSON"),
        ([1, 2], 400, "must be a JSON object"),
        ({"context": {}}, 400, "the request has the keys ['context']"),
        (
            {"context": {"205": [[1, 1.0]]}, "candidates": [{}]},
            400,
            "context, field '205': an impression-side field, which belongs in each candidate",
        ),
        (
            {"context": {}, "candidates": [{}, {"101": [[1, 1.0]]}]},
            400,
            "candidate 1, field '101': a user-side field, which belongs in the context",
        ),
        (
            {"context": {}, "candidates": [{"206": [[1, 1e400]]}]},
            400,
            "not valid JSON",
        ),
        (
            {"context": {}, "candidates": [{"206": [[2**63, 1.0]]}]},
            400,
            "candidate 0, field '206', entry 0: id must be in [0, 2**63)",
        ),
        ({"context": {}, "candidates": []}, 400, "the request holds no candidates"),
        ({"context": [], "candidates": [{}]}, 400, "context: must be an object"),
        (
            {"context": {}, "candidates": [{}] * (MAX_CANDIDATES + 1)},
            422,
            f"{MAX_CANDIDATES + 1} candidates, more than this server accepts ({MAX_CANDIDATES}",
        ),
        (
            {"dataframe_records": [{"features": {}}] * (MAX_CANDIDATES + 1)},
            422,
            "serve.max_candidates",
        ),
        ('{"context": {}, "candidates": [{}]}' + " " * MAX_BODY, 413, "serve.max_body_bytes"),
    ],
    ids=[
        "unknown-field",
        "string-id",
        "nan-weight",
        "pair-of-three",
        "record-not-an-object",
        "no-features-key",
        "empty-records",
        "not-json",
        "not-an-object",
        "no-candidates-key",
        "item-field-in-context",
        "user-field-in-candidate",
        "infinite-weight",
        "id-too-large",
        "empty-candidates",
        "context-not-an-object",
        "too-many-candidates",
        "too-many-records",
        "body-too-large",
    ],
)
def test_bad_requests_get_a_4xx_naming_the_problem(server, body, status, message):
    response = _post(server["url"], body)
    assert response.status_code == status, response.text
    assert message in response.json()["message"]


def test_follow_switches_on_promote_and_rollback_under_load(server, registry, models, test_records):
    """While one client sends requests back to back, `champion` moves to version 2, then
    back: every request succeeds, each answer's numbers are those of the version it names,
    and the version changes exactly once per move."""
    request = _candidate_request(test_records, 10)
    body = json.dumps(request).encode()
    records = [{**request["context"], **c} for c in request["candidates"]]
    expected = {v: _expected(m, records_to_inputs(records)) for v, m in models.items()}
    assert np.abs(expected["1"] - expected["2"]).max() > 1e-3

    for move, target in (
        (lambda: promote(registry["tracking_uri"], "esmm", "2"), "2"),
        (lambda: rollback(registry["tracking_uri"], "esmm", "test"), "1"),
    ):
        answers = []
        stop = threading.Event()

        def load(answers=answers, stop=stop) -> None:
            client = Client(server["url"])
            while not stop.is_set() and len(answers) < 5000:
                answers.append(client.post(body))
            client.close()

        thread = threading.Thread(target=load)
        thread.start()
        time.sleep(0.5)
        move()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (answers and answers[-1].version == target):
            time.sleep(0.1)
        time.sleep(0.5)  # some requests after the switch too
        stop.set()
        thread.join()
        assert [a.status for a in answers if a.status != 200] == []
        versions = [a.version for a in answers]
        changes = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
        assert len(changes) == 1 and versions[-1] == target, versions
        for a in answers:
            assert a.body["model_version"] == a.version
            np.testing.assert_allclose(
                _frame(a.body["predictions"]), expected[a.version], rtol=1e-5, atol=1e-7
            )


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_fuzzing_gets_4xx_never_5xx_and_memory_stays_flat(server, models, test_records):
    """1,500 seeded malformed, oversized and valid requests: each malformed one a 4xx of its
    kind, each valid one the right answer, none a 5xx; the server's memory does not grow
    over the second 1,000 requests."""
    request = _candidate_request(test_records, 10)
    records = [{**request["context"], **c} for c in request["candidates"]]
    expected = _expected(models["1"], records_to_inputs(records))
    bodies = fuzz_bodies(
        request, 1500, seed=3, max_candidates=MAX_CANDIDATES, max_body_bytes=MAX_BODY
    )
    assert {kind for _, kind in bodies} == {"valid", "malformed", "too_many", "too_large", "broken"}
    statuses = {"valid": {200}, "malformed": {400}, "too_many": {422}, "too_large": {413}}
    warm = bounded_load(server["url"], bodies[:500], clients=2, max_requests=500, time_limit=120)
    before = _rss_mib(server["pid"])
    rest = bounded_load(server["url"], bodies[500:], clients=2, max_requests=1000, time_limit=240)
    after = _rss_mib(server["pid"])
    answers = warm.answers + rest.answers
    assert len(answers) == 1500
    for a in answers:
        assert a.status < 500, (a.kind, a.status, a.body)
        assert a.status in statuses.get(a.kind, range(400, 500)), (a.kind, a.status, a.body)
        if a.kind == "valid":
            np.testing.assert_allclose(
                _frame(a.body["predictions"]), expected, rtol=1e-5, atol=1e-7
            )
    assert after - before < 30, f"server RSS grew from {before:.0f} to {after:.0f} MiB"


def test_export_savedmodel_reproduces_the_registered_model(
    registry, models, test_records, tmp_path
):
    """`esmm export --format savedmodel`: `tf.saved_model.load` and the `serving_default`
    signature (the context's ids and weights, the candidates' padded ones) give the
    registered champion's predictions."""
    import tensorflow as tf
    from typer.testing import CliRunner

    from flows.cli import app

    out = tmp_path / "export"
    params = registry["root"] / "params.yaml"
    result = CliRunner().invoke(app, ["export", "--out", str(out), "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "esmm_export.json").read_text())["source"].startswith("models:/esmm")
    request = _candidate_request(test_records, 20)
    inputs = candidates_to_inputs(request["context"], request["candidates"])
    feed = {
        name: tf.constant(value[0] if name.split("_", 1)[1] in COMMON_FIELDS else value)
        for name, value in inputs.items()
        if name != "context_row"
    }
    served = tf.saved_model.load(str(out)).signatures["serving_default"](**feed)
    got = np.stack([served[k].numpy().astype(np.float64) for k in OUTPUT_KEYS], 1)
    champion = mlflow_client(registry["tracking_uri"]).get_model_version_by_alias(
        "esmm", "champion"
    )
    np.testing.assert_allclose(
        got, _expected(models[str(champion.version)], inputs), rtol=1e-5, atol=1e-7
    )
