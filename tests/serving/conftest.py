"""Shared fixtures of the serving tests: small raw data ingested, a small ESMM with
embeddings scaled up, request records of test impressions, and an MLflow store with the
served model registered as esmm@champion. Package-scoped: built once for the three test
modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.config import ModelConfig
from serving.pyfunc import log_serving_model
from serving.records import table_to_records
from tasks.config import IngestConfig
from tasks.ingest import ingest_ali_ccp, load_vocabularies
from tasks.inputs import SplitReader
from tasks.tracking import mlflow_uris

MODEL_NAME = "esmm"


@pytest.fixture(scope="package")
def ingested(small_raw, tmp_path_factory) -> Path:
    """small_raw ingested (min_count 2, so rare ids are out of vocabulary)."""
    out = tmp_path_factory.mktemp("ingest")
    ingest_ali_ccp(small_raw, out, IngestConfig(min_count=2, workers=1))
    return out


@pytest.fixture(scope="package")
def keras_model_path(ingested, tmp_path_factory) -> Path:
    """A small ESMM over the ingested vocabularies, embeddings scaled up so ids matter."""
    from models.esmm import build_esmm
    from models.layers import EmbeddingBag

    config = ModelConfig(embedding_dim=4, ctr_tower={"units": [8]}, cvr_tower={"units": [8]})
    model = build_esmm(config, load_vocabularies(ingested / "vocab.parquet"), seed=5)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, EmbeddingBag):
            layer.embeddings.assign(rng.normal(size=layer.embeddings.shape).astype("float32"))
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path


@pytest.fixture(scope="package")
def keras_model(keras_model_path):
    import keras

    import models.esmm  # noqa: F401  (custom layers)

    return keras.models.load_model(keras_model_path, compile=False)


@pytest.fixture(scope="package")
def test_records(ingested) -> list[dict]:
    """Request records of the first 40 test impressions (user and impression fields)."""
    reader = SplitReader(ingested / "test")
    table = next(reader.tables(40))
    return table_to_records(joined_table(reader, table))


@pytest.fixture(scope="package")
def store(keras_model_path, tmp_path_factory):
    """A SQLite MLflow store with the served model registered as esmm@champion."""
    import mlflow
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    # MLflow's global URIs point at this store only while it registers the model and during
    # each test that uses it (`_mlflow_uris_of_the_store`): other test files run in this
    # process too, and an earlier in-process registration may have set the registry URI.
    with mlflow_uris(tracking_uri):
        experiment = mlflow.create_experiment("serve", artifact_location=str(root / "mlruns"))
        with mlflow.start_run(experiment_id=experiment):
            info = log_serving_model(keras_model_path, registered_model_name=MODEL_NAME)
        MlflowClient(tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
            MODEL_NAME, "champion", info.registered_model_version
        )
    yield {"root": root, "tracking_uri": tracking_uri, "info": info}


@pytest.fixture(autouse=True)
def _mlflow_uris_of_the_store(request):
    """In a test that uses the store, MLflow's global URIs are the store's."""
    if "store" not in request.fixturenames:
        yield
        return
    with mlflow_uris(request.getfixturevalue("store")["tracking_uri"]):
        yield


def joined_table(reader: SplitReader, table):
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
