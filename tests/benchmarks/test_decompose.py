"""The decomposition's table diagnostic: tables holding the categories' true tastes are
read as such, random tables are not (real Keras model, the generator's replayed world)."""

from __future__ import annotations

import numpy as np

from aliccp.synth import feature_id_ranges
from benchmarks.attainable import category_means, replay
from benchmarks.decompose import category_tables, model_tables
from models.config import ModelConfig, TowerConfig
from tasks.config import TrainConfig
from tasks.train import compiled_model


def test_tables_holding_the_true_category_tastes_carry_the_taste():
    world, _, splits = replay(60_000, 10_000, seed=5)
    ranges = feature_id_ranges(60_000, 5)
    vocab = {f: np.arange(r.start, r.stop, dtype=np.int64) for f, r in ranges.items()}
    truth = category_means(world, world.item_taste)
    n_cat, dim = truth.shape
    assert n_cat >= 5 * (dim + 1)  # enough categories that a linear map cannot fit noise
    config = ModelConfig(
        embedding_dim=dim, ctr_tower=TowerConfig(units=[4]), cvr_tower=TowerConfig(units=[4])
    )
    model = compiled_model(config, TrainConfig(seed=1), vocab)
    random = category_tables(model_tables(model), vocab, ranges, world, splits)
    random_interest = category_tables(model_tables(model, "interest"), vocab, ranges, world, splits)
    for field in ("109_14", "206"):
        table = model.get_layer(f"embedding_{field}").embeddings
        rows = np.array(table.numpy())
        assert rows.shape[1] == 2 * dim  # model.interest_match: a second half of columns
        rows[1 : n_cat + 1, :dim] = truth  # row 0 is the OOV bucket; the towers' half
        table.assign(rows)
    told = category_tables(model_tables(model), vocab, ranges, world, splits)
    assert told["taste_r2_109_14"] > 0.999 and told["taste_r2_206"] > 0.999
    assert random["taste_r2_109_14"] < 0.5 and random["taste_r2_206"] < 0.5
    assert told["bilinear_taste_correlation"] > 0.5
    assert told["bilinear_taste_correlation"] > random["bilinear_taste_correlation"] + 0.2
    # the interest half was left random, and is read on its own
    interest = category_tables(model_tables(model, "interest"), vocab, ranges, world, splits)
    assert interest == random_interest
    off = compiled_model(config.model_copy(update={"interest_match": False}), TrainConfig(), vocab)
    assert model_tables(off, "interest") is None
