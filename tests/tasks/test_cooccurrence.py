"""Co-occurrence initialisation of a cross's history and item tables: ids that share
contexts start close together, in one space for both tables (real Parquet, real Keras)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.first_id import FirstIdReader
from models.config import ModelConfig, TowerConfig
from models.features import COMMON_INDEX_KEY, ids_key, wts_key
from tasks.config import TrainConfig
from tasks.cooccurrence import _rows, cooccurrence_tables, initialise_from_cooccurrence
from tasks.inputs import SplitReader
from tasks.train import compiled_model

GROUPS = (np.arange(100, 110), np.arange(200, 210))  # two tastes' category ids


def _lists(rows: list[list[int]]) -> pa.Array:
    return pa.array(rows, type=pa.list_(pa.int64()))


@pytest.fixture(scope="module")
def clustered(tmp_path_factory) -> Path:
    """Contexts of two kinds: history and shown categories from one group each; history
    ids are 1000 + the category (the format's fields use their own id spaces)."""
    split = tmp_path_factory.mktemp("split") / "train"
    split.mkdir()
    rng = np.random.default_rng(0)
    keys, histories, impressions = [], [], {"key": [], "cat": []}
    for c in range(400):
        group = GROUPS[c % 2]
        keys.append(f"c{c}")
        histories.append([1000 + int(x) for x in rng.choice(group, 4, replace=False)])
        for x in rng.choice(group, 3):
            impressions["key"].append(f"c{c}")
            impressions["cat"].append([int(x)])
    pq.write_table(
        pa.table(
            {
                COMMON_INDEX_KEY: keys,
                ids_key("109_14"): _lists(histories),
                wts_key("109_14"): pa.array(
                    [[1.0] * len(h) for h in histories], type=pa.list_(pa.float32())
                ),
            }
        ),
        split / "common.parquet",
    )
    pq.write_table(
        pa.table(
            {COMMON_INDEX_KEY: impressions["key"], ids_key("206"): _lists(impressions["cat"])}
        ),
        split / "impressions.parquet",
        row_group_size=300,  # several row groups
    )
    return split


def _vocab() -> dict[str, np.ndarray]:
    from models.features import ALL_FIELDS

    vocab = {f: np.array([7], dtype=np.int64) for f in ALL_FIELDS}
    vocab["109_14"] = np.sort(1000 + np.concatenate(GROUPS)).astype(np.int64)
    vocab["206"] = np.sort(np.concatenate(GROUPS)).astype(np.int64)
    return vocab


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


@pytest.mark.parametrize("solver", ["dense", "sparse"])
def test_ids_sharing_contexts_start_close_in_one_space_for_both_tables(
    clustered, solver, monkeypatch
):
    if solver == "sparse":  # the eigensolver of large vocabularies (shops, brands)
        monkeypatch.setattr("tasks.cooccurrence._DENSE_LIMIT", 10)
    vocab = _vocab()
    tables = cooccurrence_tables(SplitReader(clustered), vocab, "508", dim=4, scale=0.3)
    assert tables.contexts == 400
    assert tables.history.shape == (21, 4) and tables.item.shape == (21, 4)
    assert not tables.history_seen[0] and not tables.item_seen[0]  # OOV rows untouched
    assert tables.history_seen[1:].all() and tables.item_seen[1:].all()
    seen = np.vstack([tables.history[1:], tables.item[1:]])
    assert seen.std() == pytest.approx(0.3, rel=1e-4)
    # Rows 1-10 are group 0 in both tables (sorted vocabularies), rows 11-20 group 1.
    cos = _cosine(tables.history[1:], tables.item[1:])
    same = np.concatenate([cos[:10, :10].ravel(), cos[10:, 10:].ravel()])
    other = np.concatenate([cos[:10, 10:].ravel(), cos[10:, :10].ravel()])
    assert same.min() > 0.5 > other.max()
    # The history x item dot the model computes already tells the groups apart.
    dots = tables.history[1:] @ tables.item[1:].T
    assert dots[:10, :10].min() > 10 * np.abs(dots[:10, 10:]).max()
    again = cooccurrence_tables(SplitReader(clustered), vocab, "508", dim=4, scale=0.3)
    np.testing.assert_array_equal(again.history, tables.history)  # deterministic
    np.testing.assert_array_equal(again.item, tables.item)


def test_a_sample_of_contexts_and_the_first_id_baseline_are_honoured(clustered):
    vocab = _vocab()
    sampled = cooccurrence_tables(
        SplitReader(clustered), vocab, "508", dim=4, scale=0.3, max_contexts=50
    )
    assert sampled.contexts == 50
    first = cooccurrence_tables(FirstIdReader(clustered), vocab, "508", dim=4, scale=0.3)
    first_ids = {
        h[0] for h in pq.read_table(clustered / "common.parquet")[ids_key("109_14")].to_pylist()
    }
    seen = set(vocab["109_14"][first.history_seen[1:]])
    assert seen == first_ids


def test_unknown_cross_is_named(clustered):
    with pytest.raises(ValueError, match="cooccurrence_init.*'999'"):
        cooccurrence_tables(SplitReader(clustered), _vocab(), "999", dim=4, scale=0.3)


@pytest.mark.parametrize("variant", ["esmm", "esmm_ns"])
def test_the_model_tables_get_the_seen_rows_and_keep_the_rest(clustered, variant):
    vocab = _vocab()
    config = ModelConfig(
        embedding_dim=4,
        variant=variant,
        ctr_tower=TowerConfig(units=[8]),
        cvr_tower=TowerConfig(units=[8]),
    )
    model = compiled_model(config, TrainConfig(seed=3), vocab)
    for field in ("109_14", "206"):  # the tables' rows are the model's own id mapping
        ids = np.concatenate([vocab[field], [1, 99_999]])  # two ids outside the vocabulary
        np.testing.assert_array_equal(
            np.asarray(model.get_layer(f"lookup_{field}")(ids)), _rows(vocab[field], ids)
        )
    before = {w.path: np.array(w.numpy()) for w in model.weights}
    (tables,) = initialise_from_cooccurrence(
        model, SplitReader(clustered), vocab, ["508"], dim=4, scale=0.3, seed=3
    )
    prefixes = [""] if variant == "esmm" else ["ctr_", "cvr_"]
    changed = set()
    for prefix in prefixes:
        for field, rows, seen in (
            ("109_14", tables.history, tables.history_seen),
            ("206", tables.item, tables.item_seen),
        ):
            layer = model.get_layer(f"{prefix}embedding_{field}")
            now = layer.embeddings.numpy()
            # model.interest_match: both halves of the twice-as-wide tables start there
            assert now.shape[1] == 2 * rows.shape[1]
            np.testing.assert_array_equal(now[seen], np.hstack([rows[seen], rows[seen]]))
            np.testing.assert_array_equal(now[~seen], before[layer.embeddings.path][~seen])
            changed.add(layer.embeddings.path)
    for w in model.weights:  # nothing else moved
        if w.path not in changed:
            np.testing.assert_array_equal(w.numpy(), before[w.path])
