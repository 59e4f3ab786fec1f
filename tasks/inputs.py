"""The input pipeline over the ingested Parquet files: what training, evaluation and serving feed
the model.

Impressions are read one Parquet row group at a time and joined per batch with the user-side
table by `common_feature_index`, so the denormalised join is never materialised and memory
holds one row group plus the user-side table. A batch carries each of its contexts'
user-side lists once, plus `context_row` (the model pools them once per context). For
training, the row groups are visited in an order drawn from (seed, epoch) and, within a row
group, whole contexts in a drawn order, so a context's impressions share a batch; batch `k`
of epoch `e` is the same on every run, which is what lets an interrupted run resume
mid-epoch. Ragged id/weight lists are padded per batch (id 0, weight 0). Batches are built in
background threads and prefetched by tf.data. `predict_split` scores a whole split in file
order.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

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
    CONTEXT_ROW_KEY,
    CONVERSION_LABEL_KEY,
    OUTPUT_KEYS,
    POSITION_FIELD,
    SAMPLE_ID_KEY,
    SKELETON_FIELDS,
    USER_ID_FIELD,
    ids_key,
    wts_key,
)

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

    Everything fed comes from `common` and `read_row_group`: a subclass that changes them
    changes what the model sees, in training, initialisation and prediction alike.

    Attributes:
        impressions: the split's `impressions.parquet` (read a row group at a time).
        common: the user-side lists of every context (`ids_F`/`wts_F` of the common
            fields), one row per context, in memory.
        index: each context's `common_feature_index`, the row labels of `common`.
    """

    def __init__(self, split_dir: Path):
        self.split_dir = Path(split_dir)
        self.impressions = pq.ParquetFile(self.split_dir / "impressions.parquet")
        common = pq.read_table(self.split_dir / "common.parquet")
        self.index = pd.Index(common[COMMON_INDEX_KEY].to_pandas())
        self.common = common.drop([COMMON_INDEX_KEY]).combine_chunks()
        # The last row group read, in its drawn order: the input threads share it.
        self._group_lock = threading.Lock()
        self._group: tuple[tuple, pa.Table] | None = None
        self._shard = (0, 1)  # (index, count): the contexts fed (`shard_contexts`)
        self._shard_rows: list[int] | None = None

    @property
    def num_rows(self) -> int:
        return self.impressions.metadata.num_rows

    def _group_rows(self) -> list[int]:
        if self._shard[1] > 1:
            if self._shard_rows is None:
                self._shard_rows = self.shard_group_rows(self._shard[1])[self._shard[0]]
            return self._shard_rows
        md = self.impressions.metadata
        return [md.row_group(i).num_rows for i in range(md.num_row_groups)]

    def _context_shard(self, table: pa.Table, count: int) -> np.ndarray:
        """Each impression's shard of `count`: its context's row in common.parquet mod
        `count`, so that a context's impressions all go to one shard."""
        rows = self.index.get_indexer(table[COMMON_INDEX_KEY].to_pandas())
        return np.where(rows < 0, 0, rows) % count

    def shard_group_rows(self, count: int) -> list[list[int]]:
        """Impressions per row group of each of `count` context shards (one column read)."""
        out = [[0] * self.impressions.metadata.num_row_groups for _ in range(count)]
        for g in range(self.impressions.metadata.num_row_groups):
            shards = self._context_shard(self.read_row_group(g, [COMMON_INDEX_KEY]), count)
            for k, n in enumerate(np.bincount(shards, minlength=count)):
                out[k][g] = int(n)
        return out

    def shard_contexts(self, index: int, count: int) -> None:
        """Feed only context shard `index` of `count` from now on (multi-worker training:
        each worker its own). Every impression is in exactly one shard, and a context's
        impressions are all in the same one; `num_rows` stays the whole split's."""
        self._shard, self._shard_rows, self._group = (index, count), None, None

    def num_batches(self, batch_size: int) -> int:
        return sum(math.ceil(n / batch_size) for n in self._group_rows())

    def read_row_group(self, g: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Row group `g` of the impressions as stored (all columns unless `columns`): every
        read of impressions goes through here, so a subclass may change what is fed."""
        return self.impressions.read_row_group(g, columns=columns)

    def _row_group(self, g: int, seed: int | None, epoch: int) -> pa.Table:
        """Row group `g`, its contexts in the order drawn from (seed, epoch, g) if seeded."""
        with self._group_lock:
            if self._group is not None and self._group[0] == (g, seed, epoch):
                return self._group[1]
            table = self.read_row_group(g)
            if self._shard[1] > 1:
                mine = self._context_shard(table, self._shard[1]) == self._shard[0]
                table = table.filter(pa.array(mine))
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
            ids, wts, widths = pad_fields(source, fields)
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
    # TensorFlow (and models.esmm, which imports Keras) load here, not with the module:
    # serving and evaluation import this module for its NumPy/Arrow readers.
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

    signature = _packed_signature(variant)
    shards = tf.data.Dataset.range(parallel)
    ds = shards.interleave(
        lambda shard: tf.data.Dataset.from_generator(
            generate, output_signature=signature, args=(shard,)
        ),
        cycle_length=parallel,
        block_length=1,
        num_parallel_calls=parallel,
        deterministic=True,
    ).map(_unpack)
    n = len(range(start + (shard_index - start) % num_shards, end, num_shards))
    ds = ds.apply(tf.data.experimental.assert_cardinality(n))
    return ds.prefetch(tf.data.AUTOTUNE)


def _packed_signature(variant: str) -> tuple[dict, dict]:
    """tf.TensorSpecs of one batch as it leaves Python: `SplitReader.packed`'s arrays and
    the targets of `variant`."""
    import tensorflow as tf

    return (
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


def _unpack(packed: dict, targets: dict) -> tuple[dict, dict]:
    """A packed batch back to one `ids_F` and one `wts_F` tensor per field (in the graph)."""
    import tensorflow as tf

    feats = {CONTEXT_ROW_KEY: packed[CONTEXT_ROW_KEY]}
    for fields, side in SIDES:
        widths = packed[f"{side}_widths"]
        for key, name in ((ids_key, "ids"), (wts_key, "wts")):
            parts = tf.split(packed[f"{side}_{name}"], widths, axis=1, num=len(fields))
            feats.update({key(f): part for f, part in zip(fields, parts, strict=True)})
    return feats, targets


def predict_split(model: Any, split: Path | SplitReader, batch_size: int = 4096) -> pd.DataFrame:
    """Predictions for every impression of a split, with labels, user id and position.

    Args:
        model: a built ESMM (any variant).
        split: an ingested split's folder, or a reader of it (which decides what is fed).
        batch_size: impressions per call of the model.

    Raises:
        ValueError: the split has no impressions.
    """
    reader = split if isinstance(split, SplitReader) else SplitReader(split)
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
        raise ValueError(f"{reader.split_dir}: no impressions to predict")
    return pd.concat(frames, ignore_index=True)


def _first_id(source: pa.Table, field: str) -> np.ndarray:
    """First id of each row's `field` list (0 where the field is absent)."""
    return pad_fields(source, (field,), first_only=True)[0][:, 0]
