"""The training step on small generated data: learning, base-rate start, recalibration and
mirrored training (real files, real Keras)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from models.features import CLICK_LABEL_KEY, OUTPUT_KEYS, SAMPLE_ID_KEY
from tasks.ingest import load_vocabularies
from tasks.inputs import SplitReader, predict_split
from tasks.train import compiled_model, initialise_logit_biases, train_esmm
from tests.tasks.conftest import MODEL, TRAIN


def test_short_training_beats_a_constant_predictor_and_saves_a_raw_record_model(
    ingested, uninterrupted
):
    """Two epochs on 4k impressions: test AUCs above 0.5 (a constant's) on CTR, CTCVR and
    clicked CVR; the saved model predicts from raw ids, and TensorBoard logs were written."""
    out, result = uninterrupted
    model = keras.models.load_model(result.model_path)
    predictions = predict_split(model, ingested / "test", batch_size=500)

    assert list(predictions.columns) == [
        SAMPLE_ID_KEY,
        CLICK_LABEL_KEY,
        "conversion",
        "position",
        "user",
        *OUTPUT_KEYS,
    ]
    assert (
        len(predictions) == pq.ParquetFile(ingested / "test/impressions.parquet").metadata.num_rows
    )
    click = predictions[CLICK_LABEL_KEY].to_numpy()
    conversion = predictions["conversion"].to_numpy()
    clicked = click == 1
    assert roc_auc_score(click, predictions["p_ctr"]) > 0.55
    assert roc_auc_score(click * conversion, predictions["p_ctcvr"]) > 0.55
    assert roc_auc_score(conversion[clicked], predictions["p_cvr"][clicked]) > 0.5
    assert result.epochs_run == 2 and len(result.history["loss"]) == 2
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_towers_start_at_the_train_splits_click_and_conversion_rates(ingested):
    """With the logit layers' kernels at zero, a model whose biases were initialised
    predicts the train split's (smoothed) click rate as p_ctr and its conversion rate among
    clicks as p_cvr, not 0.5: training starts at the constant predictor of the labels."""
    model = compiled_model(MODEL, TRAIN, load_vocabularies(ingested / "vocab.parquet"))
    for layer in ("ctr_logit", "cvr_logit"):
        kernel = model.get_layer(layer).kernel
        kernel.assign(np.zeros(kernel.shape, dtype=np.float32))
    rates = initialise_logit_biases(model, SplitReader(ingested / "train"))

    frame = predict_split(model, ingested / "train")
    clicks = frame[CLICK_LABEL_KEY].sum()
    conversions = (frame[CLICK_LABEL_KEY] * frame["conversion"]).sum()
    assert 0 < conversions < clicks < len(frame)
    np.testing.assert_allclose(frame["p_ctr"], (clicks + 1) / (len(frame) + 2), rtol=1e-5)
    np.testing.assert_allclose(frame["p_cvr"], (conversions + 1) / (clicks + 2), rtol=1e-5)
    assert rates == pytest.approx(
        {
            "ctr_logit": (clicks + 1) / (len(frame) + 2),
            "cvr_logit": (conversions + 1) / (clicks + 2),
        }
    )


def test_recalibration_matches_validation_rates_and_keeps_rankings(ingested, tmp_path):
    """With train.recalibrate the validation split's mean p_ctr is its click rate and its
    mean p_ctcvr its conversion rate; CTR and clicked-CVR rankings are those of the same
    training without it."""
    cfg = TRAIN.model_copy(update={"early_stopping": None, "epochs": 1})
    plain = train_esmm(
        ingested,
        tmp_path / "plain",
        MODEL,
        cfg.model_copy(update={"recalibrate": False}),
        verbose=0,
    )
    tuned = train_esmm(ingested, tmp_path / "tuned", MODEL, cfg, verbose=0)
    shifts = json.loads((tmp_path / "tuned" / "history.json").read_text())["recalibration"]
    assert shifts["ctr_logit_shift"] != 0 and shifts["cvr_logit_shift"] != 0
    before = predict_split(keras.models.load_model(plain.model_path), ingested / "valid")
    after = predict_split(keras.models.load_model(tuned.model_path), ingested / "valid")
    click, conversion = after[CLICK_LABEL_KEY], after["conversion"]
    assert after["p_ctr"].mean() == pytest.approx(click.mean(), rel=1e-3)
    assert after["p_ctcvr"].mean() == pytest.approx((click * conversion).mean(), rel=1e-3)
    assert abs(before["p_ctr"].mean() / click.mean() - 1) > 0.01  # there was something to fix
    for key in ("p_ctr", "p_cvr"):
        assert (after[key].rank().to_numpy() == before[key].rank().to_numpy()).mean() > 0.99


_MIRRORED = """
import json, sys
from pathlib import Path

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]  # two logical devices: two replicas
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras

from tasks.config import TrainConfig
from models.config import ModelConfig, TowerConfig
from tasks.inputs import SplitReader, predict_split
from tasks.train import train_esmm


class Count(keras.callbacks.Callback):
    train = valid = 0

    def on_train_batch_end(self, batch, logs=None):
        Count.train += 1

    def on_test_batch_end(self, batch, logs=None):
        Count.valid += 1


ingest, out = Path(sys.argv[1]), Path(sys.argv[2])
model = ModelConfig(
    embedding_dim=4, ctr_tower=TowerConfig(units=[16]), cvr_tower=TowerConfig(units=[16])
)
cfg = TrainConfig(batch_size=128, epochs=2, learning_rate=0.01, seed=1, distribute="mirrored")
result = train_esmm(ingest, out, model, cfg, verbose=0, callbacks=[Count()])
frame = predict_split(keras.models.load_model(result.model_path), ingest / "test")
print(json.dumps({
    "train_steps": Count.train,
    "valid_steps": Count.valid,
    "train_batches": SplitReader(ingest / "train").num_batches(128),
    "valid_batches": SplitReader(ingest / "valid").num_batches(128),
    "history": json.loads((out / "history.json").read_text()),
    "click": frame["click"].tolist(),
    "p_ctr": frame["p_ctr"].tolist(),
}))
"""


def test_mirrored_training_feeds_whole_context_batches_to_two_replicas(ingested, tmp_path):
    """train.distribute: mirrored over two logical CPU devices (a fresh process: devices are
    fixed when TensorFlow starts): each step takes one per-context batch per replica, the
    validation split is scored across both, the loss falls, and the saved model predicts
    outside the strategy."""
    import subprocess
    import sys

    script = tmp_path / "mirrored.py"
    script.write_text(_MIRRORED)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(
        [sys.executable, str(script), str(ingested), str(tmp_path / "train")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["history"]["replicas"] == 2
    assert report["train_steps"] == 2 * (report["train_batches"] // 2)  # two epochs
    assert report["valid_steps"] == 2 * (report["valid_batches"] // 2)
    assert report["history"]["loss"][1] < report["history"]["loss"][0]
    assert roc_auc_score(report["click"], report["p_ctr"]) > 0.5
