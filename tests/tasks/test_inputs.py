"""The input pipeline on small generated data: per-context batches that replay from any
step, padding, input threads (real files)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

import models.esmm
from models.features import COMMON_INDEX_KEY, SAMPLE_ID_KEY
from tasks.inputs import CONTEXT_ROW_KEY, SplitReader, make_dataset, pad_fields, split_fields


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


def test_the_context_row_key_matches_the_model():
    assert CONTEXT_ROW_KEY == models.esmm.CONTEXT_ROW_KEY
