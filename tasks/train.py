"""Training step: the tf.data input pipeline over the ingested Parquet files, and ESMM fitting.

Input: impressions are read one Parquet row group at a time and joined per batch with the
user-side table by `common_feature_index`, so the denormalised join is never materialised
and memory holds one row group plus the user-side table. A batch carries each of its
contexts' user-side lists once, plus `context_row` (the model pools them once per
context). For training, the row groups are visited in an order drawn from (seed, epoch)
and, within a row group, whole contexts in a drawn order, so a context's impressions share
a batch; batch `k` of epoch `e` is the same on every run, which is what lets an interrupted
run resume mid-epoch. Ragged id/weight lists are padded per batch (id 0, weight 0). Batches
are built in background threads and prefetched by tf.data.

Training: early stopping on a named metric, a checkpoint (weights with optimizer state,
plus a small JSON state: position, early-stopping record, history) at the end of every
epoch and optionally every N steps under `<train dir>/checkpoints/`, automatic resume from
it when the config and data match, a progress bar with samples/s, optional TensorBoard.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.config import ModelConfig
from models.features import (
    ALL_FIELDS,
    CLICK_LABEL_KEY,
    COMMON_FIELDS,
    COMMON_INDEX_KEY,
    CONVERSION_LABEL_KEY,
    OUTPUT_KEYS,
    POSITION_FIELD,
    SAMPLE_ID_KEY,
    SKELETON_FIELDS,
    USER_ID_FIELD,
    ids_key,
    wts_key,
)
from tasks.config import EarlyStoppingConfig, TrainConfig
from tasks.ingest import load_vocabularies

CONTEXT_ROW_KEY = "context_row"  # = models.esmm.CONTEXT_ROW_KEY (kept import-light here)


SIDES = ((COMMON_FIELDS, "user"), (SKELETON_FIELDS, "item"))  # (fields, name) of each side


def _one_chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def pad_fields(
    source: pa.Table, fields: Sequence[str], first_only: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `ids_F`/`wts_F` lists of `fields`, padded (id 0, weight 0) and side by side.

    Returns `(ids, weights, widths)`: two (rows, sum of widths) arrays, int64 and float32,
    field after field, and each field's width (its longest list in `source`, at least 1).
    `first_only` keeps each list's first entry (width 1). Null lists count as empty. All
    fields are placed with one vectorised scatter, so the cost hardly grows with their
    number.
    """
    n = source.num_rows
    lengths = np.zeros((len(fields), n), np.int64)
    ids_parts, wts_parts = [], []
    for j, f in enumerate(fields):
        ids, wts = _one_chunk(source[ids_key(f)]), _one_chunk(source[wts_key(f)])
        if ids.null_count:
            lengths[j] = pc.list_value_length(ids).fill_null(0).to_numpy(zero_copy_only=False)
        else:
            lengths[j] = np.diff(ids.offsets.to_numpy())
        ids_parts.append(ids.flatten().to_numpy(zero_copy_only=False))
        wts_parts.append(wts.flatten().to_numpy(zero_copy_only=False))
    kept = np.minimum(lengths, 1) if first_only else lengths
    widths = np.maximum(kept.max(axis=1, initial=0), 1)
    total_width = int(widths.sum())
    ids_out = np.zeros((n, total_width), np.int64)
    wts_out = np.zeros((n, total_width), np.float32)
    segments = lengths.reshape(-1)  # one per (field, row), field-major like the values
    total = int(segments.sum())
    if total:
        column = np.cumsum(widths) - widths  # each field's first column
        base = (column[:, None] + np.arange(n)[None, :] * total_width).reshape(-1)
        position = np.arange(total) - np.repeat(np.cumsum(segments) - segments, segments)
        target = np.repeat(base, segments) + position
        ids_values, wts_values = np.concatenate(ids_parts), np.concatenate(wts_parts)
        if first_only:
            first = position == 0
            target, ids_values, wts_values = target[first], ids_values[first], wts_values[first]
        ids_out.reshape(-1)[target] = ids_values
        wts_out.reshape(-1)[target] = wts_values
    return ids_out, wts_out, widths.astype(np.int32)


def split_fields(
    fields: Sequence[str], ids: np.ndarray, wts: np.ndarray, widths: np.ndarray
) -> dict[str, np.ndarray]:
    """`pad_fields`' side-by-side arrays back to one `ids_F` and one `wts_F` array per field."""
    cuts = np.cumsum(widths)[:-1]
    out: dict[str, np.ndarray] = {}
    for f, i, w in zip(
        fields, np.split(ids, cuts, axis=1), np.split(wts, cuts, axis=1), strict=True
    ):
        out[ids_key(f)], out[wts_key(f)] = i, w
    return out


class SplitReader:
    """Batches of model inputs from one ingested split (impressions joined with contexts).

    Attributes:
        impressions: the split's `impressions.parquet` (read a row group at a time).
        common: the user-side lists of every context (`ids_F`/`wts_F` of the common
            fields), one row per context, in memory.
        index: each context's `common_feature_index`, the row labels of `common`.
    """

    def __init__(self, split_dir: Path, first_id_only: bool = False):
        """`first_id_only`: keep only each field's first entry (and its weight), the input
        of the usual one-id-per-field reproductions; a baseline for benchmarks."""
        self.split_dir = Path(split_dir)
        self.first_id_only = first_id_only
        self.impressions = pq.ParquetFile(self.split_dir / "impressions.parquet")
        common = pq.read_table(self.split_dir / "common.parquet")
        self.index = pd.Index(common[COMMON_INDEX_KEY].to_pandas())
        self.common = common.drop([COMMON_INDEX_KEY]).combine_chunks()
        # The last row group read, in its drawn order: the input threads share it.
        self._group_lock = threading.Lock()
        self._group: tuple[tuple, pa.Table] | None = None

    @property
    def num_rows(self) -> int:
        return self.impressions.metadata.num_rows

    def _group_rows(self) -> list[int]:
        md = self.impressions.metadata
        return [md.row_group(i).num_rows for i in range(md.num_row_groups)]

    def num_batches(self, batch_size: int) -> int:
        return sum(math.ceil(n / batch_size) for n in self._group_rows())

    def _row_group(self, g: int, seed: int | None, epoch: int) -> pa.Table:
        """Row group `g`, its contexts in the order drawn from (seed, epoch, g) if seeded."""
        with self._group_lock:
            if self._group is not None and self._group[0] == (g, seed, epoch):
                return self._group[1]
            table = self.impressions.read_row_group(g)
            if seed is not None:
                rng = np.random.default_rng([seed, epoch, g])
                codes, uniques = pd.factorize(table[COMMON_INDEX_KEY].to_pandas())
                rank = rng.permutation(len(uniques))
                table = table.take(pa.array(np.argsort(rank[codes], kind="stable")))
            self._group = ((g, seed, epoch), table)
            return table

    def tables(
        self, batch_size: int, seed: int | None = None, epoch: int = 0, start: int = 0
    ) -> Iterator[pa.Table]:
        """Impression batches, from batch number `start` of the pass.

        Without a seed: file order. With one: row groups in an order drawn from
        (seed, epoch), and within each row group whole contexts in an order drawn from
        (seed, epoch, row group), so a context's impressions stay together. Skipped
        batches are not read (whole row groups) or only sliced away. Passes running side
        by side (the input threads) read and order each row group once between them.
        """
        group_rows = self._group_rows()
        groups = np.arange(len(group_rows))
        if seed is not None:
            groups = np.random.default_rng([seed, epoch]).permutation(groups)
        skip = start
        for g in groups:
            n_batches = math.ceil(group_rows[g] / batch_size)
            if skip >= n_batches:
                skip -= n_batches
                continue
            table = self._row_group(int(g), seed, epoch)
            for b in range(skip, n_batches):
                yield table.slice(b * batch_size, batch_size)
            skip = 0

    def contexts(self, table: pa.Table) -> tuple[pa.Table, np.ndarray]:
        """The distinct user-side rows of a batch, and each impression's row among them."""
        encoded = pc.dictionary_encode(_one_chunk(table[COMMON_INDEX_KEY]))  # first-seen order
        context_row, keys = encoded.indices.to_numpy(), encoded.dictionary.to_pandas()
        rows = self.index.get_indexer(keys)
        if (rows < 0).any():
            raise KeyError(
                f"{self.split_dir}: common_feature_index {keys[rows < 0][0]} not in common.parquet"
            )
        return self.common.take(pa.array(rows)), context_row.astype(np.int32)

    def packed(
        self, table: pa.Table, contexts: tuple[pa.Table, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Model inputs of a batch, each side's fields side by side (`pad_fields`):
        `user_ids`, `user_wts` (a row per context), `item_ids`, `item_wts` (a row per
        impression), each side's field widths (`user_widths`, `item_widths`), and
        `context_row` (each impression's context). `contexts`: `self.contexts(table)`,
        if already at hand."""
        common, context_row = self.contexts(table) if contexts is None else contexts
        out: dict[str, np.ndarray] = {CONTEXT_ROW_KEY: context_row}
        for fields, side in SIDES:
            source = common if side == "user" else table
            ids, wts, widths = pad_fields(source, fields, self.first_id_only)
            out[f"{side}_ids"], out[f"{side}_wts"], out[f"{side}_widths"] = ids, wts, widths
        return out

    def features(
        self, table: pa.Table, contexts: tuple[pa.Table, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Model inputs of a batch: skeleton lists per impression, user lists per context."""
        packed = self.packed(table, contexts)
        feats = {CONTEXT_ROW_KEY: packed[CONTEXT_ROW_KEY]}
        for fields, side in SIDES:
            feats.update(
                split_fields(
                    fields, packed[f"{side}_ids"], packed[f"{side}_wts"], packed[f"{side}_widths"]
                )
            )
        return feats


def _labels(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    click = table[CLICK_LABEL_KEY].to_numpy().astype(np.float32)
    conversion = table[CONVERSION_LABEL_KEY].to_numpy().astype(np.float32)
    return click, conversion


def input_signature(variant: str = "esmm") -> tuple[dict, dict]:
    """tf.TensorSpecs of one batch: (inputs, targets of `variant`)."""
    import tensorflow as tf

    targets = ("p_ctr", "p_cvr") if variant == "base" else ("p_ctr", "p_ctcvr")
    return (
        {
            **{ids_key(f): tf.TensorSpec((None, None), tf.int64) for f in ALL_FIELDS},
            **{wts_key(f): tf.TensorSpec((None, None), tf.float32) for f in ALL_FIELDS},
            CONTEXT_ROW_KEY: tf.TensorSpec((None,), tf.int32),
        },
        {k: tf.TensorSpec((None,), tf.float32) for k in targets},
    )


def make_dataset(
    reader: SplitReader,
    batch_size: int,
    seed: int | None = None,
    *,
    variant: str = "esmm",
    epoch: int = 0,
    start: int = 0,
    parallel: int = 2,
    stop: int | None = None,
    shard: tuple[int, int] = (0, 1),
):
    """A finite tf.data.Dataset of (inputs, targets): one pass, from batch `start`.

    With a seed the pass is epoch `epoch`'s order (see `SplitReader.tables`); without one,
    file order (the dataset can then be iterated again, e.g. for validation). `parallel`
    generator threads build batches i, i + parallel, ...; a deterministic interleave puts
    them back in order, so the result does not depend on `parallel`. `stop` ends the pass
    before that batch number; `shard = (k, n)` keeps the batches whose number is k mod n
    (one input pipeline of n, in distributed training).
    """
    import tensorflow as tf

    from models.esmm import esmm_targets

    shard_index, num_shards = shard
    end = reader.num_batches(batch_size) if stop is None else stop

    def generate(thread):
        # One ids and one weights matrix per side (fields side by side, with their
        # widths): 9 tensors cross from Python per batch instead of 49.
        mine = 0
        for i, table in enumerate(reader.tables(batch_size, seed, epoch, start), start):
            if i == end:
                return
            if i % num_shards != shard_index:
                continue
            mine += 1
            if (mine - 1) % parallel != thread:
                continue
            yield reader.packed(table), esmm_targets(*_labels(table), variant)

    packed_signature = (
        {
            CONTEXT_ROW_KEY: tf.TensorSpec((None,), tf.int32),
            **{
                key: spec
                for _, side in SIDES
                for key, spec in (
                    (f"{side}_ids", tf.TensorSpec((None, None), tf.int64)),
                    (f"{side}_wts", tf.TensorSpec((None, None), tf.float32)),
                    (f"{side}_widths", tf.TensorSpec((None,), tf.int32)),
                )
            },
        },
        input_signature(variant)[1],
    )

    def unpack(packed, targets):
        feats = {CONTEXT_ROW_KEY: packed[CONTEXT_ROW_KEY]}
        for fields, side in SIDES:
            widths = packed[f"{side}_widths"]
            for key, name in ((ids_key, "ids"), (wts_key, "wts")):
                parts = tf.split(packed[f"{side}_{name}"], widths, axis=1, num=len(fields))
                feats.update({key(f): part for f, part in zip(fields, parts, strict=True)})
        return feats, targets

    shards = tf.data.Dataset.range(parallel)
    ds = shards.interleave(
        lambda shard: tf.data.Dataset.from_generator(
            generate, output_signature=packed_signature, args=(shard,)
        ),
        cycle_length=parallel,
        block_length=1,
        num_parallel_calls=parallel,
        deterministic=True,
    ).map(unpack)
    n = len(range(start + (shard_index - start) % num_shards, end, num_shards))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))
    return ds.prefetch(tf.data.AUTOTUNE)


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    epochs_run: int
    history: dict[str, list[float]]
    resumed_from: tuple[int, int] | None = None  # (epoch, step) of the checkpoint, if any


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


def _improved(value: float, best: float | None, cfg: EarlyStoppingConfig) -> bool:
    if best is None:
        return True
    mode = cfg.mode
    if mode == "auto":
        mode = "max" if "auc" in cfg.monitor else "min"
    if mode == "min":
        return value < best - cfg.min_delta
    return value > best + cfg.min_delta


def _rng_states(model: Any) -> list[Any]:
    """The state variables of the model's seed generators (dropout), in build order."""
    return [v for v in model.variables if "seed_generator" in v.path]


def steps_done(callback: Any, batch: int) -> int:
    """Steps of the current `fit` call done when `callback.on_train_batch_end(batch)` runs.

    With `steps_per_execution` > 1 that hook runs after each call into TF, `batch` being
    the call's last step, and an epoch's last call may stop early, at its last batch."""
    return min(batch + 1, callback.params["steps"])


def _make_callbacks(keras):
    """The training callbacks (classes need keras, imported lazily)."""

    class Checkpointer(keras.callbacks.Callback):
        """Saves weights + optimizer state and the run state; does early stopping."""

        def __init__(self, ckpt_dir: Path, state: dict, train_cfg: TrainConfig):
            super().__init__()
            self.ckpt_dir = ckpt_dir
            self.state = state
            self.cfg = train_cfg
            self.start = 0  # batches of the current epoch done before this fit call

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self.start = self.state["step"]  # > 0 only in a resumed epoch

        def save(self) -> None:
            self.model.save_weights(self.ckpt_dir / "latest.weights.h5")
            # Dropout's random state is not part of the weights file.
            rng = {str(i): np.asarray(v) for i, v in enumerate(_rng_states(self.model))}
            np.savez(self.ckpt_dir / "rng.npz", **rng)
            tmp = self.ckpt_dir / "state.json.tmp"
            tmp.write_text(json.dumps(self.state, indent=1))
            tmp.replace(self.ckpt_dir / "state.json")  # the weights are valid once this exists

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            done = self.start + steps_done(self, batch)
            every = self.cfg.checkpoint_every_steps
            crossed = every and done // every > self.state["step"] // every
            self.state["step"] = done
            if crossed:
                self.save()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs = {k: float(v) for k, v in (logs or {}).items()}
            for key, value in logs.items():
                self.state["history"].setdefault(key, []).append(value)
            stop = self.cfg.early_stopping
            if stop is not None:
                if stop.monitor not in logs:
                    raise ValueError(
                        f"train.early_stopping.monitor {stop.monitor!r} is not a logged metric; "
                        f"logged: {sorted(logs)}"
                    )
                if _improved(logs[stop.monitor], self.state["best"], stop):
                    self.state.update(best=logs[stop.monitor], best_epoch=epoch, wait=0)
                    self.model.save_weights(self.ckpt_dir / "best.weights.h5")
                else:
                    self.state["wait"] += 1
                    if self.state["wait"] >= stop.patience:
                        self.state["stopped"] = True
                        self.model.stop_training = True
            self.state.update(epoch=epoch + 1, step=0)
            self.save()

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

    return Checkpointer, Throughput, Progress


def train_esmm(
    ingest_dir: Path,
    out_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    verbose: int = 1,
    callbacks: Sequence[Any] = (),
    resume: bool | None = None,
    first_id_only: bool = False,
) -> TrainResult:
    """Fit ESMM on the train split with early stopping on the validation split; save `.keras`.

    Checkpoints go to `out_dir/checkpoints/`; when one exists for the same configs and data
    (see `run_fingerprint`; `epochs` may differ) and resuming is on, training continues
    from it, mid-epoch included, and reaches the weights of an uninterrupted run.

    Args:
        ingest_dir: output folder of the ingest step (splits and `vocab.parquet`).
        out_dir: where `model.keras`, `history.json` and `checkpoints/` are written.
        model_cfg: architecture and variant.
        train_cfg: optimisation, loss weights, early stopping, checkpoints.
        verbose: Keras progress output (1 = progress bar with samples/s).
        callbacks: extra Keras callbacks, run after ours.
        resume: overrides `train_cfg.resume` (`esmm train --no-resume`).
        first_id_only: feed only each field's first entry (benchmark baseline).

    Returns:
        Where the model was saved, the training history and the checkpoint resumed from.

    Raises:
        ValueError: an empty train split, or an early-stopping metric that is not logged.
    """
    import keras
    import tensorflow as tf

    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    train = SplitReader(ingest_dir / "train", first_id_only)
    valid = SplitReader(ingest_dir / "valid", first_id_only)
    if train.num_rows == 0:
        raise ValueError(f"{train.split_dir}: the train split is empty")
    stop = train_cfg.early_stopping
    if stop is not None and stop.monitor.startswith("val_") and not valid.num_rows:
        raise ValueError(
            f"{valid.split_dir} is empty, so train.early_stopping.monitor {stop.monitor!r} "
            "cannot be computed: set ingest.valid_fraction > 0 or train.early_stopping: null"
        )

    strategy = _strategy(train_cfg.distribute)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if strategy is not None and train_cfg.steps_per_execution > 1:
        # Keras's multi-step loop fails on distributed datasets ("You must feed a value for
        # placeholder tensor", keras-team/keras#19246); one step per call is the same run.
        train_cfg = train_cfg.model_copy(update={"steps_per_execution": 1})
    ckpt_dir = out_dir / "checkpoints"
    fingerprint = run_fingerprint(ingest_dir, model_cfg, train_cfg) + ("-first" * first_id_only)
    fingerprint += f"-replicas{replicas}" * (strategy is not None)
    state_path = ckpt_dir / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    if not (train_cfg.resume if resume is None else resume) or (
        state is not None and state.get("fingerprint") != fingerprint
    ):
        state = None
    if state is None:
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
    resumed_from = (state["epoch"], state["step"]) if state["epoch"] or state["step"] else None
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(train_cfg.seed)
    if train_cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    vocab = load_vocabularies(ingest_dir / "vocab.parquet")
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = compiled_model(model_cfg, train_cfg, vocab)
        if resumed_from is not None:
            model.optimizer.build(model.trainable_variables)
            model.load_weights(ckpt_dir / "latest.weights.h5")
            with np.load(ckpt_dir / "rng.npz") as rng:
                for i, variable in enumerate(_rng_states(model)):
                    variable.assign(rng[str(i)])
        else:
            rates = initialise_logit_biases(model, train)
            if verbose:
                print(
                    "logit biases start at the train split's rates: click "
                    f"{rates['ctr_logit']:.4f}, conversion given click {rates['cvr_logit']:.4f}",
                    flush=True,
                )
            if model_cfg.cooccurrence_init:
                from tasks.cooccurrence import initialise_from_cooccurrence

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

    variant, batch_size = model_cfg.variant, train_cfg.batch_size
    # A step is one batch per replica; distributed, a pass drops its last few batches
    # (fewer than the replicas) so that every replica gets one each step.
    n_batches = train.num_batches(batch_size) // replicas
    if n_batches == 0:
        raise ValueError(
            f"{train.split_dir}: {train.num_batches(batch_size)} batches cannot feed "
            f"{replicas} replicas; lower train.batch_size"
        )

    def distributed(build):
        """`build(shard)` for one input pipeline, fed to every replica by the strategy."""
        if strategy is None:
            return build((0, 1))
        return strategy.distribute_datasets_from_function(
            lambda ctx: build((ctx.input_pipeline_id, ctx.num_input_pipelines))
        )

    validation, validation_steps = None, None
    if valid.num_rows and valid.num_batches(batch_size) >= replicas:
        validation_steps = valid.num_batches(batch_size) // replicas
        v_stop = validation_steps * replicas
        validation = distributed(
            lambda shard: make_dataset(valid, batch_size, variant=variant, stop=v_stop, shard=shard)
        )
    if validation is None and stop is not None and stop.monitor.startswith("val_"):
        raise ValueError(
            f"{valid.split_dir}: {valid.num_batches(batch_size)} batches cannot feed "
            f"{replicas} replicas, so {stop.monitor!r} cannot be computed; lower "
            "train.batch_size or set train.early_stopping: null"
        )
    Checkpointer, Throughput, Progress = _make_callbacks(keras)
    extra = [Throughput(batch_size * replicas)]
    if verbose:
        extra.append(Progress(train_cfg.epochs))
    if train_cfg.tensorboard:
        extra.append(keras.callbacks.TensorBoard(log_dir=str(out_dir / "tensorboard")))
    checkpointer = Checkpointer(ckpt_dir, state, train_cfg)

    # One fit call per epoch, from its recorded step (a resumed epoch from where it was
    # interrupted): a call into TF of `steps_per_execution` steps then never takes batches
    # of the next epoch, whose data is a pass of its own (seed, epoch).
    while state["epoch"] < train_cfg.epochs and not state["stopped"]:
        epoch, start = state["epoch"], state["step"]
        model.fit(
            distributed(
                lambda shard, epoch=epoch, start=start: make_dataset(
                    train,
                    batch_size,
                    train_cfg.seed,
                    variant=variant,
                    epoch=epoch,
                    start=start * replicas,
                    stop=n_batches * replicas,
                    shard=shard,
                )
            ),
            validation_data=validation,
            validation_steps=validation_steps,
            initial_epoch=epoch,
            epochs=epoch + 1,
            steps_per_epoch=n_batches - start,
            shuffle=False,  # the pipeline shuffles, by (seed, epoch)
            callbacks=[checkpointer, *extra, *callbacks],
            verbose=verbose,
        )
        if model.stop_training:  # set by a callback (early stopping sets state["stopped"])
            break

    if strategy is not None:  # the saved model runs anywhere: rebuild it outside the strategy
        model.save_weights(ckpt_dir / "trained.weights.h5")
        model = compiled_model(model_cfg, train_cfg, vocab)
        model.load_weights(ckpt_dir / "trained.weights.h5")
    if stop is not None and stop.restore_best_weights and (ckpt_dir / "best.weights.h5").is_file():
        model.load_weights(ckpt_dir / "best.weights.h5")
    history = state["history"]
    shifts = None
    if train_cfg.recalibrate and valid.num_rows:
        shifts = recalibrate(model, valid.split_dir, first_id_only)
    model_path = out_dir / "model.keras"
    model.save(model_path)
    (out_dir / "history.json").write_text(
        json.dumps(
            {
                **history,
                "best_epoch": state["best_epoch"],
                "recalibration": shifts,
                "replicas": replicas,
            },
            indent=2,
        )
    )
    return TrainResult(model_path, state["epoch"], history, resumed_from)


def _strategy(name: str):
    """The tf.distribute strategy of `train.distribute` (None: plain Keras)."""
    if name == "none":
        return None
    import tensorflow as tf

    return tf.distribute.MirroredStrategy()


def recalibrate(model, split_dir: Path, first_id_only: bool = False) -> dict[str, float]:
    """Intercept recalibration on a held-out split, in place.

    Over-fitted id embeddings make noisy logits, and noise in logit space raises the mean
    probability (an ESMM early-stopped after one epoch over-predicts CTR by 25-35%). This
    adds one constant to the CTR tower's logit bias so that the mean p_ctr on `split_dir`
    equals its click rate, then one to the CVR tower's so that the mean p_ctcvr equals its
    conversion rate. Each tower's ranking is unchanged. A tower whose labels on the split
    are all one class is left alone.

    Returns:
        The shifts added: `ctr_logit_shift`, `cvr_logit_shift`.
    """
    frame = predict_split(model, split_dir, first_id_only=first_id_only)
    click = frame[CLICK_LABEL_KEY].to_numpy(np.float64)
    converted = click * frame[CONVERSION_LABEL_KEY].to_numpy(np.float64)
    logit_ctr, logit_cvr = _logit(frame["p_ctr"]), _logit(frame["p_cvr"])
    shift_ctr = shift_cvr = 0.0
    if 0 < click.sum() < len(click):
        shift_ctr = _solve_shift(lambda b: _sigmoid(logit_ctr + b).mean(), click.mean())
    p_ctr = _sigmoid(logit_ctr + shift_ctr)
    if 0 < converted.sum() < len(converted):
        shift_cvr = _solve_shift(
            lambda b: (p_ctr * _sigmoid(logit_cvr + b)).mean(), converted.mean()
        )
    for layer, shift in (("ctr_logit", shift_ctr), ("cvr_logit", shift_cvr)):
        bias = model.get_layer(layer).bias
        bias.assign(bias + np.float32(shift))
    return {"ctr_logit_shift": shift_ctr, "cvr_logit_shift": shift_cvr}


def initialise_logit_biases(model, split: SplitReader) -> dict[str, float]:
    """Start each tower's logit bias at its base rate on `split`, in place.

    The CTR tower's at the click rate, the CVR tower's at the conversion rate among
    clicks (both Laplace-smoothed), so that training starts at the constant predictor of
    the labels rather than at p = 0.5 ("init well": Karpathy, "A Recipe for Training
    Neural Networks"; TensorFlow's "Classification on imbalanced data" tutorial). The
    p_cvr of an ESMM is supervised only through p_ctr * p_cvr; started at 0.5, the CVR
    tower first spends its steps pulling it down to the conversion rate. At a learning
    rate of 0.002 this start scored better on every seed tried on rare-conversion data; it
    does not prevent a collapsed CVR tower at 0.01 (benchmarks/README.md, "Starting at the
    base rates"), which the evaluation gate refuses.

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
        bias.assign(np.full(bias.shape, _logit(rate), dtype=np.float32))
    return rates


def _logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-30, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _solve_shift(mean_at, target: float) -> float:
    """The b with mean_at(b) == target, for mean_at increasing in b (bisection)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_at(mid) < target else (lo, mid)
    return (lo + hi) / 2


def compiled_model(model_cfg: ModelConfig, train_cfg: TrainConfig, vocab: dict[str, np.ndarray]):
    """The ESMM of `model_cfg`, initialised from `train_cfg.seed` and compiled with its
    optimiser settings and loss weights."""
    from models.esmm import build_esmm, compile_esmm

    model = build_esmm(model_cfg, vocab, seed=train_cfg.seed)
    compile_esmm(model, train_cfg.compile_config)
    return model


def predict_split(
    model, split_dir: Path, batch_size: int = 4096, first_id_only: bool = False
) -> pd.DataFrame:
    """Predictions for every impression of a split, with labels, user id and position."""
    reader = SplitReader(split_dir, first_id_only=first_id_only)
    frames = []
    for table in reader.tables(batch_size):
        common, context_row = reader.contexts(table)
        preds = model.predict_batch(reader.features(table, (common, context_row)))
        click, conversion = _labels(table)
        frame = pd.DataFrame(
            {
                SAMPLE_ID_KEY: table[SAMPLE_ID_KEY].to_numpy(),
                CLICK_LABEL_KEY: click.astype(np.int8),
                CONVERSION_LABEL_KEY: conversion.astype(np.int8),
                "position": _first_id(table, POSITION_FIELD),
                "user": _first_id(common, USER_ID_FIELD)[context_row],
                **{k: np.asarray(preds[k], dtype=np.float64).reshape(-1) for k in OUTPUT_KEYS},
            }
        )
        frames.append(frame)
    if not frames:
        raise ValueError(f"{split_dir}: no impressions to predict")
    return pd.concat(frames, ignore_index=True)


def _first_id(source: pa.Table, field: str) -> np.ndarray:
    """First id of each row's `field` list (0 where the field is absent)."""
    return pad_fields(source, (field,), first_only=True)[0][:, 0]
