"""Tiny synthetic inputs for the model tests (tests/models): vocabularies, batches, labels."""

from __future__ import annotations

import keras
import numpy as np

from models.config import ModelConfig, TowerConfig
from models.esmm import CONTEXT_ROW_KEY, per_impression_inputs
from models.features import ALL_FIELDS, MULTI_VALUED_FIELDS, WEIGHTED_FIELDS, ids_key, wts_key
from models.layers import EmbeddingBag

VOCAB_SIZE = 12  # known ids per field

UNKNOWN_IDS = (999_999_001, 999_999_002)  # in no vocabulary

SMALL_CONFIG = ModelConfig(
    embedding_dim=4,
    ctr_tower=TowerConfig(units=[8]),
    cvr_tower=TowerConfig(units=[8]),
)


def make_vocabularies(size: int = VOCAB_SIZE) -> dict[str, np.ndarray]:
    """Per field, `size` raw ids that look like Ali-CCP hashes (large, never 0)."""
    return {
        field: (i + 1) * 1_000_003 + 7 * np.arange(1, size + 1, dtype=np.int64)
        for i, field in enumerate(ALL_FIELDS)
    }


def make_batch(
    n: int, vocabularies: dict[str, np.ndarray], *, seed: int = 0, max_length: int = 4
) -> dict[str, np.ndarray]:
    """A padded input batch: every field has at least one real entry per row.

    Multi-valued fields get 1..max_length entries, the rest exactly one; weighted fields
    get weights in [0.5, 2), the rest weight 1. Padding is id 0 with weight 0.
    """
    rng = np.random.default_rng(seed)
    batch = {}
    for field in ALL_FIELDS:
        length = max_length if field in MULTI_VALUED_FIELDS else 1
        ids = rng.choice(vocabularies[field], size=(n, length))
        real = np.arange(length)[None, :] < rng.integers(1, length + 1, size=(n, 1))
        weights = rng.uniform(0.5, 2.0, (n, length)) if field in WEIGHTED_FIELDS else 1.0
        batch[ids_key(field)] = np.where(real, ids, 0).astype(np.int64)
        batch[wts_key(field)] = np.where(real, weights, 0.0).astype(np.float32)
    return per_impression_inputs(batch)


def pad(batch: dict[str, np.ndarray], extra: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The same batch with `extra` more zero-weight columns of random ids per field."""
    rng = np.random.default_rng(seed)
    padded = {CONTEXT_ROW_KEY: batch[CONTEXT_ROW_KEY]}
    for field in ALL_FIELDS:
        ids, weights = batch[ids_key(field)], batch[wts_key(field)]
        junk = rng.integers(1, 2**40, size=(len(ids), extra))
        padded[ids_key(field)] = np.concatenate([ids, junk], axis=1).astype(np.int64)
        padded[wts_key(field)] = np.concatenate(
            [weights, np.zeros((len(ids), extra), np.float32)], axis=1
        )
    return padded


def predict(model: keras.Model, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inference-mode outputs as numpy arrays."""
    return {key: np.asarray(value) for key, value in model(batch, training=False).items()}


def embedding_layers(model: keras.Model) -> dict[str, EmbeddingBag]:
    return {
        layer.name.removeprefix("embedding_"): layer
        for layer in model.layers
        if isinstance(layer, EmbeddingBag)
    }


def make_labels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 0/1 click and conversion labels."""
    rng = np.random.default_rng(seed)
    click = (rng.random(n) < 0.4).astype(np.float32)
    conversion = (rng.random(n) < 0.5).astype(np.float32)
    return click, conversion


def make_planted_dataset(
    n: int, vocabularies: dict[str, np.ndarray], *, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Random inputs where the item id (205) sets the CTR and the category (206) the CVR.

    Items in the first half of the 205 vocabulary are clicked with probability 0.6, others
    0.15; clicked impressions of categories in the first half of the 206 vocabulary
    convert with probability 0.7, others 0.1. The other fields are noise.
    """
    rng = np.random.default_rng(seed)
    batch = make_batch(n, vocabularies, seed=seed, max_length=3)
    items, categories = vocabularies["205"], vocabularies["206"]
    item = rng.integers(0, len(items), n)
    category = rng.integers(0, len(categories), n)
    batch[ids_key("205")] = items[item][:, None]
    batch[ids_key("206")] = categories[category][:, None]
    click = rng.random(n) < np.where(item < len(items) // 2, 0.6, 0.15)
    conversion = rng.random(n) < np.where(category < len(categories) // 2, 0.7, 0.1)
    return batch, click.astype(np.float32), (click & conversion).astype(np.float32)
