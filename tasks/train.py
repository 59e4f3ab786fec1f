"""Training step: fits ESMM on the train split, then recalibrates and saves it.

`train_esmm` reads the splits through `tasks.inputs`, starts each tower's logit bias at its
base rate (and the tables of `model.cooccurrence_init` from their ids' co-occurrence), fits
one epoch per `fit` call with early stopping on a named metric, checkpoints and resumes
through `tasks.checkpoints`, shows a progress bar with samples/s and optionally logs to
TensorBoard, runs on one process or under `tf.distribute.MirroredStrategy`, recalibrates the
logit intercepts on the validation split and saves `model.keras` with `history.json`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.config import ModelConfig
from models.features import CLICK_LABEL_KEY, CONVERSION_LABEL_KEY
from models.numeric import logit, sigmoid, solve_increasing
from tasks.checkpoints import (
    checkpointer,
    load_state,
    restore,
    restore_best,
    resumed_position,
    run_fingerprint,
    steps_done,
)
from tasks.config import TrainConfig
from tasks.cooccurrence import initialise_from_cooccurrence
from tasks.distribute import (
    barrier,
    fix_step_logs,
    is_chief,
    multi_worker_strategy,
    shard_train,
)
from tasks.ingest import load_vocabularies
from tasks.inputs import SplitReader, make_dataset, predict_split
from tasks.warm_start import WarmStart

# Keras, TensorFlow and models.esmm (which imports Keras) load inside the functions that need
# them: the `esmm` CLI imports this module at start-up, and importing TensorFlow takes seconds.


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    epochs_run: int
    history: dict[str, list[float]]
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the checkpoint, if any
    chief: bool = True  # False: a multi-worker run's other worker (the chief saved the model)


# Over 80 lines only with its docstring (the arguments, 35 lines); the body is about 60.
def train_esmm(
    ingest_dir: Path,
    out_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    verbose: int = 1,
    callbacks: Sequence[Any] = (),
    resume: bool | None = None,
    split_reader: type[SplitReader] = SplitReader,
    warm_start: WarmStart | None = None,
) -> TrainResult:
    """Fit ESMM on the train split with early stopping on the validation split; save `.keras`.

    Checkpoints go to `out_dir/checkpoints/`; when one exists for the same configs and data
    (see `tasks.checkpoints.run_fingerprint`; `epochs` may differ) and resuming is on,
    training continues from it, mid-epoch included, and reaches the weights of an
    uninterrupted run.

    Args:
        ingest_dir: output folder of the ingest step (splits and `vocab.parquet`).
        out_dir: where `model.keras`, `history.json` and `checkpoints/` are written.
        model_cfg: architecture and variant.
        train_cfg: optimisation, loss weights, early stopping, checkpoints.
        verbose: Keras progress output (1 = progress bar with samples/s).
        callbacks: extra Keras callbacks, run after ours.
        resume: overrides `train_cfg.resume` (`esmm train --no-resume`).
        split_reader: the reader of each split, which decides what the model is fed (a
            subclass of `SplitReader`; its checkpoints are its own).
        warm_start: start from a champion's weights with grown vocabularies
            (`tasks.warm_start`); None: a random start. Either way `warm_start.json` and
            `id_ages.parquet` are written beside the model.

    Returns:
        Where the model was saved, the training history and the checkpoint resumed from.

    Raises:
        ValueError: an empty train split, too few batches for the replicas, or an
            early-stopping metric that cannot be computed or is not logged.
    """
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    train, valid = _readers(ingest_dir, train_cfg, split_reader)
    strategy = _strategy(train_cfg.distribute)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    train_cfg = _fit_settings(train_cfg, strategy)
    chief = is_chief(strategy)  # multi-worker: only the chief writes files
    ckpt_dir = out_dir / "checkpoints"
    warm = warm_start or WarmStart(None)
    fingerprint = _fingerprint(ingest_dir, model_cfg, train_cfg, split_reader, strategy)
    fingerprint += warm.fingerprint
    resume = train_cfg.resume if resume is None else resume
    state = load_state(ckpt_dir, fingerprint, resume, write=chief)
    resumed_from = resumed_position(state)

    vocab = warm.grow(load_vocabularies(ingest_dir / "vocab.parquet"))
    model = _initial_model(
        model_cfg,
        train_cfg,
        vocab,
        train,
        strategy,
        ckpt_dir if resumed_from else None,
        verbose,
        warm,
    )
    fix_step_logs(model, strategy)

    batch_size = train_cfg.batch_size
    # Batches of the pass per step: mirrored, one per replica; multi-worker, each worker's
    # reader holds its own contexts and feeds one batch a step.
    sharded = shard_train(strategy, train, batch_size)
    n_batches = sharded or _steps_per_epoch(train, batch_size, replicas)
    per_step = 1 if sharded else replicas
    validation, validation_steps = _validation(valid, model_cfg, train_cfg, strategy, replicas)

    def train_pass(epoch: int, start: int):
        """Epoch `epoch`'s pass over the train split from step `start`, for every replica."""
        return _distributed(
            strategy,
            lambda shard: make_dataset(
                train,
                batch_size,
                train_cfg.seed,
                variant=model_cfg.variant,
                epoch=epoch,
                start=start * per_step,
                stop=n_batches * per_step,
                shard=shard if per_step > 1 else (0, 1),
            ),
        )

    fit_args = {
        "validation_data": validation,
        "validation_steps": validation_steps,
        "callbacks": [
            checkpointer(ckpt_dir, state, train_cfg, write=chief),
            *_reporting_callbacks(
                train_cfg.model_copy(update={"tensorboard": train_cfg.tensorboard and chief}),
                replicas,
                out_dir,
                verbose,
            ),
            *callbacks,
        ],
        "verbose": verbose,
    }
    _fit_epochs(model, state, train_cfg.epochs, train_pass, n_batches, fit_args)
    if not chief:
        barrier(strategy)  # until the chief has saved the model
        model_path = out_dir / "model.keras"  # the chief's
        return TrainResult(model_path, state["epoch"], state["history"], resumed_from, False)

    if strategy is not None:  # the saved model runs anywhere: rebuild it outside the strategy
        model = _rebuilt(model, model_cfg, train_cfg, vocab, ckpt_dir)
    restore_best(model, ckpt_dir, train_cfg.early_stopping)
    shifts = recalibrate(model, valid) if train_cfg.recalibrate and valid.num_rows else None
    model_path = _save(model, out_dir, state, shifts, replicas)
    warm.record(out_dir)
    barrier(strategy)
    return TrainResult(model_path, state["epoch"], state["history"], resumed_from)


def _fingerprint(
    ingest_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    split_reader: type[SplitReader],
    strategy: Any,
) -> str:
    """What a checkpoint must match to be resumed: the configs and data, the reader (fed
    other inputs, a run is another run) and the number of replicas."""
    fingerprint = run_fingerprint(ingest_dir, model_cfg, train_cfg)
    if split_reader is not SplitReader:
        fingerprint += f"-{split_reader.__qualname__}"
    if strategy is not None:
        fingerprint += f"-replicas{strategy.num_replicas_in_sync}"
    return fingerprint


def recalibrate(model: Any, split: Path | SplitReader) -> dict[str, float]:
    """Intercept recalibration on a held-out split, in place.

    Over-fitted id embeddings make noisy logits, and noise in logit space raises the mean
    probability (an early-stopped ESMM over-predicts CTR: see benchmarks/decompose.md). This
    adds one constant to the CTR tower's logit bias so that the mean p_ctr on `split`
    equals its click rate, then one to the CVR tower's so that the mean p_ctcvr equals its
    conversion rate. Each tower's ranking is unchanged. A tower whose labels on the split
    are all one class is left alone.

    Args:
        model: a built ESMM (its `ctr_logit` and `cvr_logit` layers are shifted).
        split: the held-out split's folder, or its reader (fed as in training).

    Returns:
        The shifts added: `ctr_logit_shift`, `cvr_logit_shift`.
    """
    frame = predict_split(model, split)
    click = frame[CLICK_LABEL_KEY].to_numpy(np.float64)
    converted = click * frame[CONVERSION_LABEL_KEY].to_numpy(np.float64)
    logit_ctr, logit_cvr = logit(frame["p_ctr"]), logit(frame["p_cvr"])
    shift_ctr = shift_cvr = 0.0
    if 0 < click.sum() < len(click):
        shift_ctr = solve_increasing(lambda b: sigmoid(logit_ctr + b).mean(), click.mean())
    p_ctr = sigmoid(logit_ctr + shift_ctr)
    if 0 < converted.sum() < len(converted):
        shift_cvr = solve_increasing(
            lambda b: (p_ctr * sigmoid(logit_cvr + b)).mean(), converted.mean()
        )
    for layer, shift in (("ctr_logit", shift_ctr), ("cvr_logit", shift_cvr)):
        bias = model.get_layer(layer).bias
        bias.assign(bias + np.float32(shift))
    return {"ctr_logit_shift": shift_ctr, "cvr_logit_shift": shift_cvr}


def initialise_logit_biases(model: Any, split: SplitReader) -> dict[str, float]:
    """Start each tower's logit bias at its base rate on `split`, in place.

    The CTR tower's at the click rate, the CVR tower's at the conversion rate among
    clicks (both Laplace-smoothed), so that training starts at the constant predictor of
    the labels rather than at p = 0.5 ("init well": Karpathy, "A Recipe for Training
    Neural Networks"; TensorFlow's "Classification on imbalanced data" tutorial). The
    p_cvr of an ESMM is supervised only through p_ctr * p_cvr; started at 0.5, the CVR
    tower first spends its steps pulling it down to the conversion rate. What it gains, and
    that it does not prevent a collapsed CVR tower at a high learning rate (which the
    evaluation gate refuses), is measured in benchmarks/quality.md ("Starting at the base
    rates").

    Returns:
        The smoothed rate each logit layer now starts at: `ctr_logit` (clicks per
        impression), `cvr_logit` (conversions per click).
    """
    labels = split.impressions.read(columns=[CLICK_LABEL_KEY, CONVERSION_LABEL_KEY])
    click = pc.cast(labels[CLICK_LABEL_KEY], pa.int64())
    clicks = pc.sum(click).as_py() or 0
    conversions = pc.sum(pc.multiply(click, labels[CONVERSION_LABEL_KEY])).as_py() or 0
    rates = {
        "ctr_logit": (clicks + 1) / (labels.num_rows + 2),
        "cvr_logit": (conversions + 1) / (clicks + 2),
    }
    for layer, rate in rates.items():
        bias = model.get_layer(layer).bias
        bias.assign(np.full(bias.shape, logit(rate), dtype=np.float32))
    return rates


def _readers(
    ingest_dir: Path, train_cfg: TrainConfig, split_reader: type[SplitReader]
) -> tuple[SplitReader, SplitReader]:
    """The train and validation splits' readers, checked for what training needs."""
    train = split_reader(ingest_dir / "train")
    valid = split_reader(ingest_dir / "valid")
    if train.num_rows == 0:
        raise ValueError(f"{train.split_dir}: the train split is empty")
    stop = train_cfg.early_stopping
    if stop is not None and stop.monitor.startswith("val_") and not valid.num_rows:
        raise ValueError(
            f"{valid.split_dir} is empty, so train.early_stopping.monitor {stop.monitor!r} "
            "cannot be computed: set ingest.valid_fraction > 0 or train.early_stopping: null"
        )
    return train, valid


def _strategy(name: str):
    """The tf.distribute strategy of `train.distribute` (None: plain Keras)."""
    if name == "none":
        return None
    if name == "multi_worker":
        return multi_worker_strategy()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


def _fit_settings(train_cfg: TrainConfig, strategy: Any) -> TrainConfig:
    """`train_cfg` as the strategy can run it."""
    if strategy is not None and train_cfg.steps_per_execution > 1:
        # Keras's multi-step loop fails on distributed datasets ("You must feed a value for
        # placeholder tensor", keras-team/keras#19246); one step per call is the same run.
        return train_cfg.model_copy(update={"steps_per_execution": 1})
    return train_cfg


def _initial_model(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    vocab: dict[str, np.ndarray],
    train: SplitReader,
    strategy: Any,
    resume_from: Path | None,
    verbose: int,
    warm: WarmStart | None = None,
) -> Any:
    """The compiled model, seeded, under `strategy`: the checkpoint in `resume_from` if
    given, else the champion's weights of a warm start, else logit biases at the train
    split's rates and the co-occurrence start of `model.cooccurrence_init`."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(train_cfg.seed)
    if train_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = compiled_model(model_cfg, train_cfg, vocab)
        if resume_from is not None:
            restore(model, resume_from)
            return model
        if warm is not None and warm.source is not None:
            message = warm.apply(model)
            if verbose:
                print(message, flush=True)
            return model
        rates = initialise_logit_biases(model, train)
        if verbose:
            print(
                "logit biases start at the train split's rates: click "
                f"{rates['ctr_logit']:.4f}, conversion given click {rates['cvr_logit']:.4f}",
                flush=True,
            )
        if model_cfg.cooccurrence_init:
            for tables in initialise_from_cooccurrence(
                model,
                train,
                vocab,
                model_cfg.cooccurrence_init,
                model_cfg.embedding_dim,
                model_cfg.cooccurrence_scale,
                seed=train_cfg.seed,
            ):
                if verbose:
                    print(tables.summary(), flush=True)
    return model


def _steps_per_epoch(train: SplitReader, batch_size: int, replicas: int) -> int:
    """Training steps of an epoch. A step is one batch per replica; distributed, a pass
    drops its last few batches (fewer than the replicas) so that every replica gets one
    each step."""
    n_batches = train.num_batches(batch_size) // replicas
    if n_batches == 0:
        raise ValueError(
            f"{train.split_dir}: {train.num_batches(batch_size)} batches cannot feed "
            f"{replicas} replicas; lower train.batch_size"
        )
    return n_batches


def _distributed(strategy: Any, build: Callable[[tuple[int, int]], Any]) -> Any:
    """`build(shard)` for one input pipeline, fed to every replica by the strategy."""
    if strategy is None:
        return build((0, 1))
    return strategy.distribute_datasets_from_function(
        lambda ctx: build((ctx.input_pipeline_id, ctx.num_input_pipelines))
    )


def _validation(
    valid: SplitReader,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    strategy: Any,
    replicas: int,
) -> tuple[Any, int | None]:
    """The validation pass (file order, whole steps for every replica) and its steps; None
    and None without one.

    Raises:
        ValueError: no validation pass, but early stopping monitors a validation metric.
    """
    batch_size, stop = train_cfg.batch_size, train_cfg.early_stopping
    validation, validation_steps = None, None
    if valid.num_rows and valid.num_batches(batch_size) >= replicas:
        validation_steps = valid.num_batches(batch_size) // replicas
        v_stop = validation_steps * replicas
        validation = _distributed(
            strategy,
            lambda shard: make_dataset(
                valid, batch_size, variant=model_cfg.variant, stop=v_stop, shard=shard
            ),
        )
    if validation is None and stop is not None and stop.monitor.startswith("val_"):
        raise ValueError(
            f"{valid.split_dir}: {valid.num_batches(batch_size)} batches cannot feed "
            f"{replicas} replicas, so {stop.monitor!r} cannot be computed; lower "
            "train.batch_size or set train.early_stopping: null"
        )
    return validation, validation_steps


def _reporting_callbacks(
    train_cfg: TrainConfig, replicas: int, out_dir: Path, verbose: int
) -> list[Any]:
    """Samples/s in the logs, the progress bar (if `verbose`) and TensorBoard (if on)."""
    import keras

    class Throughput(keras.callbacks.Callback):
        """Adds `samples/s` (this epoch so far) to the logs the progress bar shows."""

        def __init__(self, batch_size: int):
            super().__init__()
            self.batch_size = batch_size

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.started, self.seen = time.perf_counter(), 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.seen = steps_done(self, batch) * self.batch_size
            if logs is not None:
                logs["samples/s"] = self.seen / max(time.perf_counter() - self.started, 1e-9)

    class Progress(keras.callbacks.ProgbarLogger):
        """Keras's progress bar, numbering epochs out of the run's total (each epoch is
        fitted by its own call)."""

        def __init__(self, epochs: int):
            super().__init__()
            self.total = epochs

        def set_params(self, params: dict) -> None:
            super().set_params(params)
            self.epochs = self.total

    out: list[Any] = [Throughput(train_cfg.batch_size * replicas)]
    if verbose:
        out.append(Progress(train_cfg.epochs))
    if train_cfg.tensorboard:
        out.append(keras.callbacks.TensorBoard(log_dir=str(out_dir / "tensorboard")))
    return out


def _fit_epochs(
    model: Any,
    state: dict[str, Any],
    epochs: int,
    train_pass: Callable[[int, int], Any],
    steps_per_epoch: int,
    fit_args: dict[str, Any],
) -> None:
    """Fit until `epochs` are done or training stops, one `fit` call per epoch.

    Each call starts from the epoch's recorded step (a resumed epoch from where it was
    interrupted): a call into TF of `steps_per_execution` steps then never takes batches of
    the next epoch, whose data is a pass of its own (seed, epoch).
    """
    while state["epoch"] < epochs and not state["stopped"]:
        epoch, start = state["epoch"], state["step"]
        model.fit(
            train_pass(epoch, start),
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=steps_per_epoch - start,
            shuffle=False,  # the pipeline shuffles, by (seed, epoch)
            **fit_args,
        )
        if model.stop_training:  # set by a callback (early stopping sets state["stopped"])
            break


def _rebuilt(
    model: Any,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    vocab: dict[str, np.ndarray],
    ckpt_dir: Path,
) -> Any:
    """`model`'s weights in a model built outside any distribution strategy."""
    model.save_weights(ckpt_dir / "trained.weights.h5")
    model = compiled_model(model_cfg, train_cfg, vocab)
    model.load_weights(ckpt_dir / "trained.weights.h5")
    return model


def _save(
    model: Any, out_dir: Path, state: dict[str, Any], shifts: dict | None, replicas: int
) -> Path:
    """Write `model.keras` and `history.json` (history, best epoch, recalibration shifts,
    replicas); the model's path."""
    model_path = out_dir / "model.keras"
    model.save(model_path)
    (out_dir / "history.json").write_text(
        json.dumps(
            {
                **state["history"],
                "best_epoch": state["best_epoch"],
                "recalibration": shifts,
                "replicas": replicas,
            },
            indent=2,
        )
    )
    return model_path


def compiled_model(model_cfg: ModelConfig, train_cfg: TrainConfig, vocab: dict[str, np.ndarray]):
    """The ESMM of `model_cfg`, initialised from `train_cfg.seed` and compiled with its
    optimiser settings and loss weights."""
    from models.esmm import build_esmm, compile_esmm

    model = build_esmm(model_cfg, vocab, seed=train_cfg.seed)
    compile_esmm(model, train_cfg.compile_config)
    return model
