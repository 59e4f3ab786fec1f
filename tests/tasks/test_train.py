"""The training step on small generated data: per-context batches, learning, early
stopping, checkpoints and resume after an interruption (real files, real Keras)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

import models.esmm
from models.config import ModelConfig, TowerConfig
from models.features import CLICK_LABEL_KEY, COMMON_INDEX_KEY, OUTPUT_KEYS, SAMPLE_ID_KEY
from tasks.config import EarlyStoppingConfig, IngestConfig, TrainConfig
from tasks.ingest import ingest_ali_ccp, load_vocabularies
from tasks.train import (
    CONTEXT_ROW_KEY,
    SplitReader,
    compiled_model,
    initialise_logit_biases,
    make_dataset,
    pad_fields,
    predict_split,
    split_fields,
    steps_done,
    train_esmm,
)

MODEL = ModelConfig(
    embedding_dim=4,
    ctr_tower=TowerConfig(units=[16]),
    cvr_tower=TowerConfig(units=[16], dropout=0.1),
)
TRAIN = TrainConfig(batch_size=128, epochs=2, learning_rate=0.01, seed=1)


@pytest.fixture(scope="module")
def ingested(small_raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ingest")
    ingest_ali_ccp(small_raw, out, IngestConfig(valid_fraction=0.15, min_count=1))
    return out


class Interrupt(keras.callbacks.Callback):
    """Raises once `after` training steps of this run are done, like a killed process (at
    the end of the call into TF that reaches them)."""

    def __init__(self, after: int):
        super().__init__()
        self.after, self.seen, self.base = after, 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.base = self.seen

    def on_train_batch_end(self, batch, logs=None):
        self.seen = self.base + steps_done(self, batch)
        if self.seen >= self.after:
            raise KeyboardInterrupt(f"interrupted after {self.seen} steps")


def weights(model_path: Path) -> list[np.ndarray]:
    return [np.asarray(w) for w in keras.models.load_model(model_path).weights]


# --- Input pipeline ---------------------------------------------------------------------


def test_training_batches_hold_whole_contexts_once_each_and_replay_from_any_step(ingested):
    """A pass yields every impression once; a context's impressions are adjacent, its user
    lists sent once per batch; the order depends on (seed, epoch) only, and starting at
    batch k gives exactly the pass's batches from k on."""
    reader = SplitReader(ingested / "train")
    n = reader.num_rows

    def pass_ids(epoch: int, start: int = 0) -> list[np.ndarray]:
        return [
            t[SAMPLE_ID_KEY].to_numpy()
            for t in reader.tables(100, seed=5, epoch=epoch, start=start)
        ]

    first = pass_ids(0)
    seen = np.concatenate(first)
    assert len(seen) == n and len(np.unique(seen)) == n
    assert len(first) == reader.num_batches(100)
    np.testing.assert_array_equal(np.concatenate(pass_ids(0)), seen)
    assert not np.array_equal(np.concatenate(pass_ids(1)), seen)
    for a, b in zip(pass_ids(0, start=7), first[7:], strict=True):
        np.testing.assert_array_equal(a, b)

    table = next(reader.tables(100, seed=5))
    keys = table[COMMON_INDEX_KEY].to_numpy()
    changes = int((keys[1:] != keys[:-1]).sum())
    assert changes == len(np.unique(keys)) - 1  # each context's rows are contiguous
    feats = reader.features(table)
    assert len(feats[CONTEXT_ROW_KEY]) == 100
    assert len(feats["ids_101"]) == len(np.unique(keys)) < 100
    assert len(feats["ids_205"]) == 100


def test_padding_puts_each_fields_lists_in_its_own_columns():
    """Ragged lists (empty and null ones too) are padded with id 0 and weight 0, fields side
    by side with their own widths; `first_only` keeps each list's first entry."""
    lists = lambda rows, t: pa.array(rows, pa.list_(t))  # noqa: E731
    table = pa.table(
        {
            "ids_a": lists([[5, 6, 7], [], None, [8]], pa.int64()),
            "wts_a": lists([[0.5, 0.6, 0.7], [], None, [0.8]], pa.float32()),
            "ids_b": lists([[1], [2], [3, 4], []], pa.int64()),
            "wts_b": lists([[1.0], [2.0], [3.0, 4.0], []], pa.float32()),
        }
    )
    ids, wts, widths = pad_fields(table, ["a", "b"])
    assert widths.tolist() == [3, 2]
    assert ids.tolist() == [[5, 6, 7, 1, 0], [0, 0, 0, 2, 0], [0, 0, 0, 3, 4], [8, 0, 0, 0, 0]]
    np.testing.assert_allclose(wts[:, :3], [[0.5, 0.6, 0.7], [0, 0, 0], [0, 0, 0], [0.8, 0, 0]])
    first_ids, first_wts, first_widths = pad_fields(table.slice(1), ["a", "b"], first_only=True)
    assert first_widths.tolist() == [1, 1]
    assert first_ids.tolist() == [[0, 2], [0, 3], [8, 0]]
    np.testing.assert_allclose(first_wts, [[0, 2], [0, 3], [0.8, 0]])
    fields = split_fields(["a", "b"], ids, wts, widths)
    assert fields["ids_b"].tolist() == [[1, 0], [2, 0], [3, 4], [0, 0]]


def test_batches_do_not_depend_on_the_number_of_input_threads(ingested):
    """Input threads share the row group they read; the batches are the same with one or
    three of them, in the same order."""
    import tensorflow as tf

    def batches(parallel: int) -> list:
        reader = SplitReader(ingested / "train")
        ds = make_dataset(reader, 64, seed=3, epoch=1, parallel=parallel)
        return [tf.nest.map_structure(np.asarray, b) for b in ds]

    one, three = batches(1), batches(3)
    assert len(one) == len(three) == SplitReader(ingested / "train").num_batches(64)
    for a, b in zip(one, three, strict=True):
        tf.nest.map_structure(np.testing.assert_array_equal, a, b)


# --- Training ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uninterrupted(ingested, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("train")
    cfg = TRAIN.model_copy(update={"early_stopping": None, "tensorboard": True})
    return out, train_esmm(ingested, out, MODEL, cfg, verbose=0)


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


def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
    ingested, uninterrupted, tmp_path
):
    """Killed mid-epoch 2 (checkpoints every 4 steps, 3 steps per call into TF), then rerun
    with 5 steps per call: it resumes from the last checkpoint, mid-epoch, and ends with
    exactly the weights of the uninterrupted run (made with 10 steps per call)."""
    _, reference = uninterrupted
    cfg = TRAIN.model_copy(
        update={"early_stopping": None, "checkpoint_every_steps": 4, "steps_per_execution": 3}
    )
    per_epoch = SplitReader(ingested / "train").num_batches(TRAIN.batch_size)
    assert per_epoch % 3 and per_epoch > 9  # an epoch ends inside a call, and is long enough
    interrupt_at = per_epoch + per_epoch // 2 + 1
    with pytest.raises(KeyboardInterrupt):
        train_esmm(ingested, tmp_path, MODEL, cfg, verbose=0, callbacks=[Interrupt(interrupt_at)])
    assert not (tmp_path / "model.keras").exists()

    resumed_cfg = cfg.model_copy(update={"steps_per_execution": 5})  # speed only: resumable
    result = train_esmm(ingested, tmp_path, MODEL, resumed_cfg, verbose=0)

    # Calls into TF end at steps 3, 6, 9, ... of the epoch; the run was interrupted at the
    # end of the one reaching `interrupt_at`, and a checkpoint is saved at the end of every
    # call that passes a multiple of 4.
    interrupted = -(-(interrupt_at - per_epoch) // 3) * 3
    saved = max(e for e in range(3, interrupted + 1, 3) if e // 4 > (e - 3) // 4)
    assert result.resumed_from == (1, saved)
    for a, b in zip(weights(result.model_path), weights(reference.model_path), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # three trainings, about 60 s on 2 shared cores
def test_a_changed_config_or_no_resume_starts_over(ingested, tmp_path):
    """A checkpoint of another config is not resumed, and --no-resume ignores a matching one."""
    cfg = TRAIN.model_copy(update={"epochs": 1, "early_stopping": None})
    train_esmm(ingested, tmp_path, MODEL, cfg, verbose=0)
    more = train_esmm(ingested, tmp_path, MODEL, cfg.model_copy(update={"epochs": 2}), verbose=0)
    assert more.resumed_from == (1, 0) and more.epochs_run == 2

    other = train_esmm(ingested, tmp_path, MODEL, cfg.model_copy(update={"seed": 2}), verbose=0)
    assert other.resumed_from is None
    again = train_esmm(
        ingested, tmp_path, MODEL, cfg.model_copy(update={"seed": 2}), verbose=0, resume=False
    )
    assert again.resumed_from is None


@pytest.mark.slow  # two trainings, about 40 s on 2 shared cores
def test_early_stopping_on_a_named_metric_stops_and_restores_the_best_epoch(ingested, tmp_path):
    """Monitoring the training loss in `max` mode: epoch 1 is the best, patience 1 stops after
    epoch 2, and the saved model holds epoch 1's weights."""
    stop = EarlyStoppingConfig(monitor="loss", mode="max", patience=1)
    cfg = TRAIN.model_copy(update={"epochs": 5, "early_stopping": stop})
    first = train_esmm(
        ingested, tmp_path / "one", MODEL, cfg.model_copy(update={"epochs": 1}), verbose=0
    )
    result = train_esmm(ingested, tmp_path / "stop", MODEL, cfg, verbose=0)

    assert result.epochs_run == 2
    assert result.history["loss"][1] < result.history["loss"][0]
    for a, b in zip(weights(result.model_path), weights(first.model_path), strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_unknown_early_stopping_metric_is_named(ingested, tmp_path):
    cfg = TRAIN.model_copy(
        update={"epochs": 1, "early_stopping": EarlyStoppingConfig(monitor="val_auc")}
    )
    with pytest.raises(ValueError, match=r"train.early_stopping.monitor 'val_auc' is not a logged"):
        train_esmm(ingested, tmp_path, MODEL, cfg, verbose=0)


def test_the_context_row_key_matches_the_model():
    assert CONTEXT_ROW_KEY == models.esmm.CONTEXT_ROW_KEY


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
from tasks.train import SplitReader, predict_split, train_esmm


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
