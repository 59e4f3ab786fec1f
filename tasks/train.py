"""Training step: the tf.data input pipeline over the ingested Parquet files, and ESMM fitting.

Impressions are read one Parquet row group at a time (shuffled within it for training) and
joined per batch with the user-side table by `common_feature_index`, so the denormalised join
is never materialised. Ragged id/weight lists are padded per batch (id 0, weight 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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
from tasks.config import ModelConfig, TrainConfig
from tasks.ingest import load_vocabularies


def pad_lists(lists: pa.Array | pa.ChunkedArray, dtype: type) -> np.ndarray:
    """Ragged list column -> dense (rows, longest list) array, padded with zeros."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    n = len(lengths)
    out = np.zeros((n, max(int(lengths.max(initial=0)), 1)), dtype=dtype)
    if lengths.sum():
        rows = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        cols = np.arange(lengths.sum()) - np.repeat(starts, lengths)
        out[rows, cols] = lists.flatten().to_numpy(zero_copy_only=False)
    return out


class SplitReader:
    """Batches of model inputs from one ingested split (impressions joined with contexts)."""

    def __init__(self, split_dir: Path):
        self.split_dir = Path(split_dir)
        self._impressions = pq.ParquetFile(self.split_dir / "impressions.parquet")
        self._common = pq.read_table(self.split_dir / "common.parquet")
        self._index = pd.Index(self._common[COMMON_INDEX_KEY].to_pandas())

    @property
    def num_rows(self) -> int:
        return self._impressions.metadata.num_rows

    def num_batches(self, batch_size: int) -> int:
        md = self._impressions.metadata
        return sum(
            math.ceil(md.row_group(i).num_rows / batch_size) for i in range(md.num_row_groups)
        )

    def tables(self, batch_size: int, seed: int | None = None) -> Iterator[pa.Table]:
        """Impression batches; with a seed, row groups and rows within them are shuffled."""
        rng = np.random.default_rng(seed) if seed is not None else None
        groups = np.arange(self._impressions.num_row_groups)
        if rng is not None:
            groups = rng.permutation(groups)
        for g in groups:
            table = self._impressions.read_row_group(int(g))
            if rng is not None:
                table = table.take(pa.array(rng.permutation(table.num_rows)))
            for start in range(0, table.num_rows, batch_size):
                yield table.slice(start, batch_size)

    def contexts(self, table: pa.Table) -> pa.Table:
        """The user-side rows of a batch of impressions, joined by common_feature_index."""
        rows = self._index.get_indexer(table[COMMON_INDEX_KEY].to_pandas())
        if (rows < 0).any():
            missing = table[COMMON_INDEX_KEY].to_pandas()[rows < 0].iloc[0]
            raise KeyError(
                f"{self.split_dir}: common_feature_index {missing} not in common.parquet"
            )
        return self._common.take(pa.array(rows))

    def features(self, table: pa.Table, contexts: pa.Table | None = None) -> dict[str, np.ndarray]:
        """Model inputs of a batch: skeleton lists from the batch, user lists via the key."""
        common = self.contexts(table) if contexts is None else contexts
        feats: dict[str, np.ndarray] = {}
        for source, fields in ((table, SKELETON_FIELDS), (common, COMMON_FIELDS)):
            for f in fields:
                feats[ids_key(f)] = pad_lists(source[ids_key(f)], np.int64)
                feats[wts_key(f)] = pad_lists(source[wts_key(f)], np.float32)
        return feats


def _labels(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    click = table[CLICK_LABEL_KEY].to_numpy().astype(np.float32)
    conversion = table[CONVERSION_LABEL_KEY].to_numpy().astype(np.float32)
    return click, conversion


def make_dataset(reader: SplitReader, batch_size: int, seed: int | None = None):
    """A finite tf.data.Dataset of (inputs, ESMM targets); reshuffled on every pass."""
    import tensorflow as tf

    from models.esmm import esmm_targets

    passes = iter(range(1_000_000))

    def generate():
        pass_seed = None if seed is None else seed + next(passes)
        for table in reader.tables(batch_size, pass_seed):
            yield reader.features(table), esmm_targets(*_labels(table))

    signature = (
        {
            **{ids_key(f): tf.TensorSpec((None, None), tf.int64) for f in ALL_FIELDS},
            **{wts_key(f): tf.TensorSpec((None, None), tf.float32) for f in ALL_FIELDS},
        },
        {k: tf.TensorSpec((None,), tf.float32) for k in ("p_ctr", "p_ctcvr")},
    )
    ds = tf.data.Dataset.from_generator(generate, output_signature=signature)
    ds = ds.apply(tf.data.experimental.assert_cardinality(reader.num_batches(batch_size)))
    return ds.prefetch(tf.data.AUTOTUNE)


@dataclass(frozen=True)
class TrainResult:
    model_path: Path
    epochs_run: int
    history: dict[str, list[float]]


def train_esmm(
    ingest_dir: Path,
    out_dir: Path,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    verbose: int = 1,
) -> TrainResult:
    """Fit ESMM on the train split, early-stopping on the validation loss; save `.keras`.

    Args:
        ingest_dir: output folder of the ingest step (splits and `vocab.parquet`).
        out_dir: where `model.keras` and `history.json` are written.
        model_cfg: architecture.
        train_cfg: optimisation and loss weights.
        verbose: Keras progress output (1 = progress bar).

    Returns:
        Where the model was saved, and the training history.
    """
    import keras

    from models.esmm import build_esmm, compile_esmm

    keras.utils.set_random_seed(train_cfg.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = load_vocabularies(Path(ingest_dir) / "vocab.parquet")
    model = build_esmm(model_cfg, vocab, seed=train_cfg.seed)
    compile_esmm(
        model,
        learning_rate=train_cfg.learning_rate,
        ctr_loss_weight=train_cfg.ctr_loss_weight,
        ctcvr_loss_weight=train_cfg.ctcvr_loss_weight,
        variant=model_cfg.variant,
    )
    train = SplitReader(Path(ingest_dir) / "train")
    valid = SplitReader(Path(ingest_dir) / "valid")
    if train.num_rows == 0:
        raise ValueError(f"{train.split_dir}: the train split is empty")
    validation = make_dataset(valid, train_cfg.batch_size) if valid.num_rows else None
    callbacks = []
    if validation is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
        )
    fit = model.fit(
        make_dataset(train, train_cfg.batch_size, seed=train_cfg.seed),
        validation_data=validation,
        epochs=train_cfg.epochs,
        callbacks=callbacks,
        verbose=verbose,
    )
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    model_path = out_dir / "model.keras"
    model.save(model_path)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    return TrainResult(model_path, len(next(iter(history.values()), [])), history)


def predict_split(model, split_dir: Path, batch_size: int = 4096) -> pd.DataFrame:
    """Predictions for every impression of a split, with labels, user id and position."""
    reader = SplitReader(split_dir)
    frames = []
    for table in reader.tables(batch_size):
        contexts = reader.contexts(table)
        preds = model.predict_on_batch(reader.features(table, contexts))
        click, conversion = _labels(table)
        frame = pd.DataFrame(
            {
                SAMPLE_ID_KEY: table[SAMPLE_ID_KEY].to_numpy(),
                CLICK_LABEL_KEY: click.astype(np.int8),
                CONVERSION_LABEL_KEY: conversion.astype(np.int8),
                "position": _first_id(table[ids_key(POSITION_FIELD)]),
                "user": _first_id(contexts[ids_key(USER_ID_FIELD)]),
                **{k: np.asarray(preds[k], dtype=np.float64).reshape(-1) for k in OUTPUT_KEYS},
            }
        )
        frames.append(frame)
    if not frames:
        raise ValueError(f"{split_dir}: no impressions to predict")
    return pd.concat(frames, ignore_index=True)


def _first_id(lists: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """First id of each list (0 where the field is absent)."""
    return pad_lists(lists, np.int64)[:, 0] if len(lists) else np.zeros(0, np.int64)
