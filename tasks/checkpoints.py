"""Checkpoints of a training run, resuming from them, and the early-stopping record they carry.

A run's checkpoint lives in `<train dir>/checkpoints/`: `latest.weights.h5` (weights with
optimizer state), `rng.npz` (dropout's random state, which the weights file lacks),
`state.json` (the run's fingerprint, its position as epoch and step, the early-stopping
record and the history so far) and, with early stopping, `best.weights.h5`. It is written at
the end of every epoch and optionally every N steps. A run whose configs and data have the
same fingerprint (`run_fingerprint`; `epochs` may differ) continues from it, mid-epoch
included, and reaches the weights of an uninterrupted run: the input pipeline replays batch
`k` of epoch `e` identically (`tasks.inputs`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models.config import ModelConfig
from tasks.config import EarlyStoppingConfig, TrainConfig

# Keys that may change without invalidating a checkpoint: more epochs continue a run.
_RESUMABLE_CHANGES = {
    "epochs",
    "resume",
    "tensorboard",
    "checkpoint_every_steps",
    "steps_per_execution",  # changes speed only (tested: the same weights)
}


def run_fingerprint(ingest_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> str:
    """What a checkpoint must match to be resumed: configs, vocabulary and split files."""
    digest = hashlib.sha256()
    digest.update(model_cfg.model_dump_json().encode())
    digest.update(train_cfg.model_dump_json(exclude=_RESUMABLE_CHANGES).encode())
    ingest_dir = Path(ingest_dir)
    digest.update(hashlib.sha256((ingest_dir / "vocab.parquet").read_bytes()).digest())
    for split in ("train", "valid"):
        for name in ("impressions.parquet", "common.parquet"):
            path = ingest_dir / split / name
            if path.is_file():
                digest.update(f"{split}/{name}:{path.stat().st_size}".encode())
                digest.update(pq.ParquetFile(path).metadata.to_dict().__repr__().encode())
    return digest.hexdigest()


def load_state(
    ckpt_dir: Path, fingerprint: str, resume: bool, write: bool = True
) -> dict[str, Any]:
    """The run state to continue from, and `ckpt_dir` ready for its checkpoints.

    The checkpoint's state when resuming and its fingerprint is `fingerprint`; otherwise a
    fresh state (epoch 0, step 0, no early-stopping record, empty history), and whatever
    `ckpt_dir` held is deleted, unless `write` is false (a multi-worker run's non-chief
    worker, which only reads the chief's checkpoints).
    """
    state_path = ckpt_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if not resume or (state is not None and state.get("fingerprint") != fingerprint):
        state = None
    if state is None:
        if write:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        state = {
            "fingerprint": fingerprint,
            "epoch": 0,
            "step": 0,
            "best": None,
            "best_epoch": None,
            "wait": 0,
            "stopped": False,
            "history": {},
        }
    if write:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    return state


def resumed_position(state: dict[str, Any]) -> tuple[int, int] | None:
    """(epoch, step) a state continues from; None for a run that starts afresh."""
    return (state["epoch"], state["step"]) if state["epoch"] or state["step"] else None


def restore(model: Any, ckpt_dir: Path) -> None:
    """Load the latest checkpoint into a compiled `model`: weights, optimizer state and
    dropout's random state."""
    model.optimizer.build(model.trainable_variables)
    model.load_weights(ckpt_dir / "latest.weights.h5")
    with np.load(ckpt_dir / "rng.npz") as rng:
        for i, variable in enumerate(_rng_states(model)):
            variable.assign(rng[str(i)])


def restore_best(model: Any, ckpt_dir: Path, stop: EarlyStoppingConfig | None) -> None:
    """Load the best epoch's weights, if early stopping saved them and asks for them."""
    if stop is not None and stop.restore_best_weights and (ckpt_dir / "best.weights.h5").is_file():
        model.load_weights(ckpt_dir / "best.weights.h5")


def _rng_states(model: Any) -> list[Any]:
    """The state variables of the model's seed generators (dropout), in build order."""
    return [v for v in model.variables if "seed_generator" in v.path]


def steps_done(callback: Any, batch: int) -> int:
    """Steps of the current `fit` call done when `callback.on_train_batch_end(batch)` runs.

    With `steps_per_execution` > 1 that hook runs after each call into TF, `batch` being
    the call's last step, and an epoch's last call may stop early, at its last batch."""
    return min(batch + 1, callback.params["steps"])


def _improved(value: float, best: float | None, cfg: EarlyStoppingConfig) -> bool:
    if best is None:
        return True
    mode = cfg.mode
    if mode == "auto":
        mode = "max" if "auc" in cfg.monitor else "min"
    if mode == "min":
        return value < best - cfg.min_delta
    return value > best + cfg.min_delta


def checkpointer(
    ckpt_dir: Path, state: dict[str, Any], train_cfg: TrainConfig, write: bool = True
) -> Any:
    """A Keras callback that keeps `state` (position, early stopping, history) up to date,
    saves the checkpoint (every `train_cfg.checkpoint_every_steps` steps and at the end of
    every epoch) and does early stopping (`train_cfg.early_stopping`). With `write` false
    (a multi-worker run's non-chief worker) it keeps the same state but writes nothing."""
    # Keras loads here, not with the module: the `esmm` CLI imports the training step at
    # start-up, and importing TensorFlow takes seconds.
    import keras

    class Checkpointer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.start = 0  # batches of the current epoch done before this fit call

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = state["step"]  # > 0 only in a resumed epoch

        def save(self) -> None:
            if not write:
                return
            self.model.save_weights(ckpt_dir / "latest.weights.h5")
            # Dropout's random state is not part of the weights file.
            rng = {str(i): np.asarray(v) for i, v in enumerate(_rng_states(self.model))}
            np.savez(ckpt_dir / "rng.npz", **rng)
            tmp = ckpt_dir / "state.json.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(ckpt_dir / "state.json")  # the weights are valid once this exists

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            done = self.start + steps_done(self, batch)
            every = train_cfg.checkpoint_every_steps
            crossed = every and done // every > state["step"] // every
            state["step"] = done
            if crossed:
                self.save()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items()}
            for key, value in logs.items():
                state["history"].setdefault(key, []).append(value)
            if train_cfg.early_stopping is not None:
                self.early_stopping(epoch, logs, train_cfg.early_stopping)
            state.update(epoch=epoch + 1, step=0)
            self.save()

        def early_stopping(self, epoch: int, logs: dict, stop: EarlyStoppingConfig) -> None:
            if stop.monitor not in logs:
                raise ValueError(
                    f"train.early_stopping.monitor {stop.monitor!r} is not a logged metric; "
                    f"logged: {sorted(logs)}"
                )
            if _improved(logs[stop.monitor], state["best"], stop):
                state.update(best=logs[stop.monitor], best_epoch=epoch, wait=0)
                if write:
                    self.model.save_weights(ckpt_dir / "best.weights.h5")
            else:
                state["wait"] += 1
                if state["wait"] >= stop.patience:
                    state["stopped"] = True
                    self.model.stop_training = True

    return Checkpointer()
