"""Checkpoints on small generated data: resume after an interruption to the weights of an
uninterrupted run, starting over when the config changes or resuming is off, and early
stopping (real files, real Keras)."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from tasks.checkpoints import steps_done
from tasks.config import EarlyStoppingConfig
from tasks.inputs import SplitReader
from tasks.train import train_esmm
from tests.tasks.conftest import MODEL, TRAIN


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
