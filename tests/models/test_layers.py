"""The custom layers (`models.layers`) on their own: pooling, weight statistics, and the
registered names saved `.keras` files refer to."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models import layers
from models.layers import EmbeddingBag, WeightStats


@pytest.mark.parametrize(
    "name",
    [
        "EmbeddingBag",
        "ContextDense",
        "UserItemDot",
        "ColumnSplit",
        "InterestMatch",
        "GradientScale",
        "WeightStats",
        "WeightedMean",
        "Probability",
    ],
)
def test_layers_keep_their_registered_names(name):
    """Saved models name the layers `esmm>Name`: moving a layer must not change that."""
    assert keras.saving.get_registered_name(getattr(layers, name)) == f"esmm>{name}"


# --- Pooling --------------------------------------------------------------------------


def _bag(pooling: str) -> EmbeddingBag:
    """A 5-row, 3-dim bag whose row r is [r, 10 r, 100 r] + 1."""
    bag = EmbeddingBag(input_dim=5, output_dim=3, pooling=pooling)
    bag.build([(None, None), (None, None)])
    rows = np.arange(5, dtype=np.float32)[:, None]
    bag.embeddings.assign(np.concatenate([rows, 10 * rows, 100 * rows], axis=1) + 1)
    return bag


def _both_paths(bag: EmbeddingBag, indices, weights) -> list[np.ndarray]:
    """Pooled output through the layer call, and the backend-neutral dense formulation."""
    indices = np.asarray(indices, np.int64)
    weights = np.asarray(weights, np.float32)
    called = np.asarray(bag([indices, weights]))
    dense = np.asarray(bag._weighted_sum_dense(indices, weights))
    if bag.pooling == "mean":
        dense = dense / np.maximum(weights.sum(axis=1, keepdims=True), bag.epsilon)
    return [called, dense]


def test_sum_pooling_weighs_each_entry_by_its_weight():
    """Doubling one entry's weight adds exactly that entry's weighted embedding once more."""
    bag = _bag("sum")
    table = np.asarray(bag.embeddings)
    indices = [[1, 3, 3, 0]]  # a repeated id counts twice
    for before, after in zip(
        _both_paths(bag, indices, [[0.5, 2.0, 1.0, 0.0]]),
        _both_paths(bag, indices, [[1.0, 2.0, 1.0, 0.0]]),
        strict=True,
    ):
        np.testing.assert_allclose(before[0], 0.5 * table[1] + 3.0 * table[3], rtol=1e-6)
        np.testing.assert_allclose(after - before, 0.5 * table[1][None], rtol=1e-6)


def test_mean_pooling_is_the_weighted_average_and_zero_for_all_zero_weights():
    """mean = sum(w e) / sum(w); a row of zero weights (absent field) pools to zeros."""
    bag = _bag("mean")
    table = np.asarray(bag.embeddings)
    for pooled in _both_paths(bag, [[2, 4], [3, 1]], [[1.0, 3.0], [0.0, 0.0]]):
        np.testing.assert_allclose(pooled[0], (table[2] + 3 * table[4]) / 4, rtol=1e-6)
        np.testing.assert_array_equal(pooled[1], np.zeros(3, np.float32))


# --- Weight statistics ----------------------------------------------------------------


def test_weight_stats_are_log_total_and_log_count_ignoring_padding():
    weights = np.array([[2.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0] * 4], np.float32)
    got = np.asarray(WeightStats()(weights))
    np.testing.assert_allclose(
        got, np.log1p([[5.0, 2.0], [1.0, 1.0], [0.0, 0.0]]), rtol=1e-6, atol=1e-7
    )
