"""The graph `models.esmm.build_esmm` builds, on tiny synthetic inputs: named outputs,
p_ctcvr = p_ctr * p_cvr, one shared embedding table per field, the interactions, padding
and the OOV bucket, per-context batches, the ablations' separate tables, and bad arguments.
Training, losses and files: test_esmm_training.py; the layers alone: test_layers.py.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.config import ModelConfig, TowerConfig
from models.esmm import CONTEXT_ROW_KEY, build_esmm, per_impression_inputs
from models.features import (
    ALL_FIELDS,
    COMMON_FIELDS,
    CROSSES,
    HISTORY_FIELDS,
    INTEREST_FIELDS,
    OUTPUT_KEYS,
    SKELETON_FIELDS,
    ids_key,
    wts_key,
)
from models.layers import EmbeddingBag, GradientScale, InterestMatch, UserItemDot
from tests.models.esmm_data import (
    SMALL_CONFIG,
    UNKNOWN_IDS,
    embedding_layers,
    make_batch,
    pad,
    predict,
)

# --- Outputs --------------------------------------------------------------------------


def test_inputs_are_ids_and_weights_of_every_field(model):
    """Inputs: ids_F int64 and wts_F float32, both (batch, None), for each of the 23 fields."""
    inputs = {tensor.name: tensor for tensor in model.inputs}

    assert set(inputs) == {key(f) for f in ALL_FIELDS for key in (ids_key, wts_key)} | {
        CONTEXT_ROW_KEY
    }
    assert inputs[CONTEXT_ROW_KEY].dtype == "int32"
    for field in ALL_FIELDS:
        assert inputs[ids_key(field)].dtype == "int64"
        assert inputs[wts_key(field)].dtype == "float32"
        assert tuple(inputs[ids_key(field)].shape) == (None, None)


def test_outputs_are_the_three_named_probabilities_of_shape_batch(model, batch):
    """The model returns exactly p_ctr, p_cvr, p_ctcvr, each float32 (batch,) in [0, 1]."""
    out = predict(model, batch)

    assert set(out) == set(OUTPUT_KEYS)
    for key in OUTPUT_KEYS:
        assert out[key].shape == (32,), key
        assert out[key].dtype == np.float32, key
        assert np.all((out[key] >= 0) & (out[key] <= 1)), key


def test_p_ctcvr_is_p_ctr_times_p_cvr_and_never_above_either(model, batch):
    """p_ctcvr = p_ctr * p_cvr, hence p_ctcvr <= min(p_ctr, p_cvr)."""
    out = predict(model, batch)

    np.testing.assert_allclose(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"], rtol=1e-6)
    assert np.all(out["p_ctcvr"] <= np.minimum(out["p_ctr"], out["p_cvr"]) + 1e-7)


def test_towers_are_seeded_apart_and_the_build_is_reproducible(vocabularies, model, batch):
    """Identical tower configs still give p_ctr != p_cvr; the same seed rebuilds the same model."""
    out = predict(model, batch)
    assert not np.allclose(out["p_ctr"], out["p_cvr"])

    again = predict(build_esmm(SMALL_CONFIG, vocabularies, seed=3), batch)
    other = predict(build_esmm(SMALL_CONFIG, vocabularies, seed=4), batch)
    np.testing.assert_array_equal(again["p_ctr"], out["p_ctr"])
    assert not np.allclose(other["p_ctr"], out["p_ctr"])


# --- Shared embeddings ----------------------------------------------------------------


def test_exactly_one_embedding_table_per_field(model, vocabularies):
    """Each field owns one embedding variable of shape (vocabulary + OOV row, dim); the
    interest fields' tables are twice as wide (`model.interest_match`)."""
    tables = embedding_layers(model)

    assert sorted(tables) == sorted(ALL_FIELDS)
    for field, layer in tables.items():
        width = 8 if field in INTEREST_FIELDS else 4
        assert len(layer.weights) == 1, field
        assert tuple(layer.weights[0].shape) == (len(vocabularies[field]) + 1, width), field
    assert not any(isinstance(layer, keras.layers.Embedding) for layer in model.layers)
    table_ids = {id(layer.weights[0]) for layer in tables.values()}
    assert len(table_ids) == len(ALL_FIELDS)


def test_each_embedding_table_feeds_both_towers(model, batch):
    """d p_ctr / d E_F and d p_cvr / d E_F are both non-zero for every field's table F.

    The probabilities are sigmoids of the tower logits, so a non-zero gradient of the
    probability means a non-zero gradient of the logit.
    """
    tables = embedding_layers(model)
    variables = [tables[field].weights[0] for field in ALL_FIELDS]
    with tf.GradientTape(persistent=True) as tape:
        out = model(batch, training=False)
        ctr, cvr = tf.reduce_sum(out["p_ctr"]), tf.reduce_sum(out["p_cvr"])
    for name, target in (("p_ctr", ctr), ("p_cvr", cvr)):
        grads = tape.gradient(target, variables)
        for field, grad in zip(ALL_FIELDS, grads, strict=True):
            assert grad is not None, (name, field)
            assert np.abs(tf.convert_to_tensor(grad).numpy()).max() > 0, (name, field)


def _dense(grad) -> np.ndarray:
    return tf.convert_to_tensor(grad).numpy()


def test_cvr_gradient_scale_multiplies_only_the_cvr_towers_pull_on_the_shared_tables(
    vocabularies, batch
):
    """Same predictions; d p_cvr / d E_F times the factor for every shared table; the click
    tower's gradients and the CVR tower's own weights' gradients unchanged."""
    plain = build_esmm(
        SMALL_CONFIG.model_copy(update={"cvr_gradient_scale": 1.0}), vocabularies, seed=3
    )
    scaled = build_esmm(
        SMALL_CONFIG.model_copy(update={"cvr_gradient_scale": 5.0}), vocabularies, seed=3
    )
    before, after = predict(plain, batch), predict(scaled, batch)
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(after[key], before[key])

    grads = {}
    for name, model in (("plain", plain), ("scaled", scaled)):
        tables = embedding_layers(model)
        variables = [tables[field].weights[0] for field in ALL_FIELDS]
        tower = model.get_layer("cvr_logit").kernel
        with tf.GradientTape(persistent=True) as tape:
            out = model(batch, training=False)
            ctr, cvr = tf.reduce_sum(out["p_ctr"]), tf.reduce_sum(out["p_cvr"])
        grads[name] = (
            [_dense(g) for g in tape.gradient(ctr, variables)],
            [_dense(g) for g in tape.gradient(cvr, variables)],
            _dense(tape.gradient(cvr, tower)),
        )
    for field, plain_g, scaled_g in zip(
        ALL_FIELDS, grads["plain"][0], grads["scaled"][0], strict=True
    ):
        np.testing.assert_array_equal(scaled_g, plain_g, err_msg=field)
    for field, plain_g, scaled_g in zip(
        ALL_FIELDS, grads["plain"][1], grads["scaled"][1], strict=True
    ):
        assert np.abs(plain_g).max() > 0, field
        np.testing.assert_allclose(scaled_g, 5.0 * plain_g, rtol=1e-5, atol=1e-6, err_msg=field)
    np.testing.assert_array_equal(grads["scaled"][2], grads["plain"][2])


@pytest.mark.parametrize("variant", ["esmm_ns", "base"])
def test_cvr_gradient_scale_leaves_the_ablations_separate_tables_alone(vocabularies, variant):
    config = SMALL_CONFIG.model_copy(update={"variant": variant, "cvr_gradient_scale": 5.0})
    model = build_esmm(config, vocabularies, seed=3)
    assert not [layer for layer in model.layers if isinstance(layer, GradientScale)]


# --- User x item interactions ---------------------------------------------------------


def _pooled(
    table: EmbeddingBag,
    vocabulary: np.ndarray,
    ids: np.ndarray,
    weights: np.ndarray,
    columns: slice = slice(0, SMALL_CONFIG.embedding_dim),
):
    """sum_l w_l * E[row(id_l)] in numpy (row 0 is the OOV bucket, then the vocabulary),
    over the table's first `embedding_dim` columns (the towers' half) unless told."""
    rows = np.searchsorted(vocabulary, ids) + 1
    embeddings = np.asarray(table.embeddings)[:, columns]
    return (embeddings[rows] * weights[..., None]).sum(axis=1)


def test_user_item_dots_are_history_means_against_the_item_embedding(model, batch, vocabularies):
    """One dot per cross of the format: mean(history) . item, from the shared tables."""
    assert set(CROSSES) == {"508", "509", "702", "853"}
    dots_model = keras.Model(model.inputs, model.get_layer("user_item_dots").output)
    got = np.asarray(dots_model(batch, training=False))
    assert got.shape == (len(batch[CONTEXT_ROW_KEY]), len(CROSSES))
    tables = embedding_layers(model)
    for k, (history, item) in enumerate(CROSSES.values()):
        h_ids, h_wts = batch[ids_key(history)], batch[wts_key(history)]
        i_ids, i_wts = batch[ids_key(item)], batch[wts_key(item)]
        total = h_wts.sum(axis=1, keepdims=True)
        mean = _pooled(tables[history], np.sort(vocabularies[history]), h_ids, h_wts) / total
        pooled_item = _pooled(tables[item], np.sort(vocabularies[item]), i_ids, i_wts)
        if tables[item].pooling == "mean":  # the item field's own pooling
            pooled_item /= np.maximum(i_wts.sum(axis=1, keepdims=True), 1e-8)
        np.testing.assert_allclose(
            got[:, k], (mean * pooled_item).sum(axis=1), rtol=1e-4, atol=1e-7
        )
    # Both towers read the same dots (ESMM: one set of embeddings, one interaction layer).
    assert sum(isinstance(layer, UserItemDot) for layer in model.layers) == 1


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_user_item_dots_take_the_history_mean_whatever_the_list_pooling(
    vocabularies, batch, pooling
):
    """The same tables give the same dots when the lists are summed or averaged."""

    def dots(list_pooling):
        config = SMALL_CONFIG.model_copy(update={"pooling": pooling, "list_pooling": list_pooling})
        model = build_esmm(config, vocabularies, seed=3)
        return np.asarray(
            keras.Model(model.inputs, model.get_layer("user_item_dots").output)(batch)
        )

    np.testing.assert_allclose(dots("mean"), dots("sum"), rtol=1e-4, atol=1e-7)
    assert np.abs(dots("mean")).max() > 0


def test_user_item_dots_use_each_impressions_context_row(model, vocabularies):
    """Per-context user inputs give the same dots as each impression carrying its own."""
    flat = make_batch(6, vocabularies, seed=5)
    rows = np.array([0, 0, 1, 1, 1, 0], dtype=np.int32)
    per_context = {key: value for key, value in flat.items() if key != CONTEXT_ROW_KEY}
    for field in COMMON_FIELDS:
        for key in (ids_key(field), wts_key(field)):
            per_context[key] = flat[key][:2]  # two contexts
            flat[key] = flat[key][:2][rows]  # each impression: its context's user fields
    per_context[CONTEXT_ROW_KEY] = rows
    dots_model = keras.Model(model.inputs, model.get_layer("user_item_dots").output)
    np.testing.assert_allclose(
        np.asarray(dots_model(per_context)), np.asarray(dots_model(flat)), rtol=1e-5, atol=1e-7
    )


def test_an_empty_history_gives_a_zero_dot(model, batch):
    emptied = dict(batch)
    emptied[wts_key("109_14")] = np.zeros_like(batch[wts_key("109_14")])
    dots_model = keras.Model(model.inputs, model.get_layer("user_item_dots").output)
    dots = np.asarray(dots_model(emptied))
    assert np.all(dots[:, list(CROSSES).index("508")] == 0.0)
    assert np.all(np.isfinite(dots))


def test_list_pooling_applies_to_the_behaviour_lists_only(vocabularies):
    config = SMALL_CONFIG.model_copy(update={"pooling": "sum", "list_pooling": "mean"})
    pooling = {
        field: bag.pooling
        for field, bag in embedding_layers(build_esmm(config, vocabularies)).items()
    }
    assert {field for field, kind in pooling.items() if kind == "mean"} == set(HISTORY_FIELDS)
    default = embedding_layers(
        build_esmm(
            SMALL_CONFIG.model_copy(update={"pooling": "sum", "list_pooling": None}), vocabularies
        )
    )
    assert {bag.pooling for bag in default.values()} == {"sum"}  # null: model.pooling


def test_interactions_off_builds_the_plain_towers(vocabularies, batch):
    no_stats = SMALL_CONFIG.model_copy(update={"weight_features": False, "interest_match": False})
    plain = build_esmm(no_stats.model_copy(update={"interactions": False}), vocabularies)
    assert not any(isinstance(layer, UserItemDot) for layer in plain.layers)
    first = plain.get_layer("ctr_dense_0")
    item_dim = first.kernel.shape[0] - first.user_dim
    assert item_dim == len(SKELETON_FIELDS) * SMALL_CONFIG.embedding_dim
    with_dots = build_esmm(no_stats, vocabularies)
    first = with_dots.get_layer("ctr_dense_0")
    assert first.kernel.shape[0] - first.user_dim == item_dim + len(CROSSES)
    assert np.all(np.isfinite(predict(plain, batch)["p_ctcvr"]))


def test_interest_match_is_history_and_profile_against_the_item_category(
    model, batch, vocabularies
):
    """(weighted mean of 109_14 + 121) . 206 and their element-wise products, from the
    second half of those tables' columns, joined to the item part of both towers."""
    got = np.asarray(
        keras.Model(model.inputs, model.get_layer("interest_match").output)(batch, training=False)
    )
    d = SMALL_CONFIG.embedding_dim
    tables, second = embedding_layers(model), slice(d, 2 * d)
    history, profile, category = INTEREST_FIELDS

    def pooled(field):
        return _pooled(
            tables[field],
            np.sort(vocabularies[field]),
            batch[ids_key(field)],
            batch[wts_key(field)],
            second,
        )

    # per-impression batch: each row carries its own user fields
    user = pooled(history) / batch[wts_key(history)].sum(axis=1, keepdims=True) + pooled(profile)
    item = pooled(category)
    assert got.shape == (len(batch[CONTEXT_ROW_KEY]), d + 1)
    np.testing.assert_allclose(got[:, 0], (user * item).sum(axis=1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got[:, 1:], user * item, rtol=1e-4, atol=1e-7)
    assert np.abs(got).max() > 0
    # One match layer, read by both towers: the item part grows by d + 1 columns.
    assert sum(isinstance(layer, InterestMatch) for layer in model.layers) == 1
    off = build_esmm(SMALL_CONFIG.model_copy(update={"interest_match": False}), vocabularies)
    assert not any(isinstance(layer, InterestMatch) for layer in off.layers)
    for tower in ("ctr", "cvr"):
        on_first, off_first = model.get_layer(f"{tower}_dense_0"), off.get_layer(f"{tower}_dense_0")
        on_item = on_first.kernel.shape[0] - on_first.user_dim
        assert on_item == off_first.kernel.shape[0] - off_first.user_dim + d + 1
    for field, layer in embedding_layers(off).items():
        assert layer.embeddings.shape[1] == d, field


def test_interest_match_in_the_ablations_has_a_copy_per_tower(vocabularies, batch):
    ns = build_esmm(SMALL_CONFIG.model_copy(update={"variant": "esmm_ns"}), vocabularies)
    names = {layer.name for layer in ns.layers if isinstance(layer, InterestMatch)}
    assert names == {"ctr_interest_match", "cvr_interest_match"}
    for tower in ("ctr", "cvr"):
        assert ns.get_layer(f"{tower}_embedding_206").embeddings.shape[1] == 8
    assert np.all(np.isfinite(predict(ns, batch)["p_ctcvr"]))


# --- Padding and the OOV bucket -------------------------------------------------------


def test_zero_weight_padding_changes_no_prediction(model, batch):
    """Longer padding (zero weights, arbitrary ids) gives the same predictions."""
    out = predict(model, batch)
    padded = predict(model, pad(batch, extra=7))

    for key in OUTPUT_KEYS:
        np.testing.assert_allclose(padded[key], out[key], rtol=1e-6, atol=1e-7)


def test_predict_batch_is_the_model_traced_once_for_any_widths_and_batch_size(vocabularies, batch):
    """`predict_batch` gives the model's outputs, and batches of other list widths and
    sizes reuse its one trace (Keras's `predict_on_batch` traces again per shape)."""
    model = build_esmm(SMALL_CONFIG, vocabularies, seed=3)
    smaller = make_batch(9, vocabularies, seed=2)
    for inputs in (batch, pad(batch, extra=3), smaller):
        got, expected = model.predict_batch(inputs), predict(model, inputs)
        for key in OUTPUT_KEYS:
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-7)
    assert model._predict_any_shape[1].experimental_get_tracing_count() == 1


def test_an_absent_field_may_be_zero_width_or_all_zero_weights(model, batch):
    """A field absent from a whole batch predicts alike as (batch, 0) or as zero weights."""
    zero_width, zero_weights = dict(batch), dict(batch)
    zero_width[ids_key("150_14")] = np.zeros((32, 0), np.int64)
    zero_width[wts_key("150_14")] = np.zeros((32, 0), np.float32)
    zero_weights[wts_key("150_14")] = np.zeros_like(batch[wts_key("150_14")])

    np.testing.assert_allclose(
        predict(model, zero_width)["p_ctr"], predict(model, zero_weights)["p_ctr"], atol=1e-7
    )


def test_unknown_ids_share_the_oov_bucket(model, batch, vocabularies):
    """Two different unknown ids predict alike (one OOV row); two known ids need not."""

    def with_item(raw_id: int) -> dict[str, np.ndarray]:
        changed = dict(batch)
        changed[ids_key("205")] = np.full_like(batch[ids_key("205")], raw_id)
        return changed

    first, second = (predict(model, with_item(i))["p_ctr"] for i in UNKNOWN_IDS)
    np.testing.assert_array_equal(first, second)
    known_a, known_b = (predict(model, with_item(i))["p_ctr"] for i in vocabularies["205"][:2])
    assert not np.allclose(known_a, known_b)
    assert not np.allclose(first, known_a)


def test_an_empty_vocabulary_sends_every_id_of_the_field_to_oov(vocabularies, batch):
    """A field with no known ids still builds; all its ids share the OOV row."""
    vocabs = {**vocabularies, "150_14": np.array([], dtype=np.int64)}
    model = build_esmm(SMALL_CONFIG, vocabs, seed=0)
    changed = dict(batch)
    changed[ids_key("150_14")] = np.where(batch[wts_key("150_14")] > 0, UNKNOWN_IDS[0], 0).astype(
        np.int64
    )

    np.testing.assert_array_equal(predict(model, batch)["p_ctr"], predict(model, changed)["p_ctr"])


# --- Weight features ------------------------------------------------------------------


def test_weight_features_give_each_tower_two_numbers_per_field(vocabularies, batch):
    assert SMALL_CONFIG.weight_features  # the default
    plain = build_esmm(SMALL_CONFIG.model_copy(update={"weight_features": False}), vocabularies)
    with_stats = build_esmm(SMALL_CONFIG, vocabularies)
    for tower in ("ctr", "cvr"):
        first, base = with_stats.get_layer(f"{tower}_dense_0"), plain.get_layer(f"{tower}_dense_0")
        assert first.user_dim == base.user_dim + 2 * len(COMMON_FIELDS)
        assert first.kernel.shape[0] == base.kernel.shape[0] + 2 * len(ALL_FIELDS)
    # the cross counts reach the prediction with the matched ids unchanged
    more = dict(batch)
    more[wts_key("509")] = batch[wts_key("509")] * 5.0
    assert not np.allclose(predict(with_stats, more)["p_ctr"], predict(with_stats, batch)["p_ctr"])


# --- Ablation variants: separate tables -----------------------------------------------


@pytest.mark.parametrize("variant", ["esmm_ns", "base"])
def test_ns_and_base_give_each_tower_its_own_embedding_tables(vocabularies, batch, variant):
    """Two tables per field, one per tower: the CTR output depends only on the ctr_ tables
    and the CVR output only on the cvr_ tables (ESMM has one table feeding both)."""
    model = build_esmm(SMALL_CONFIG.model_copy(update={"variant": variant}), vocabularies, seed=3)
    bags = [layer for layer in model.layers if isinstance(layer, EmbeddingBag)]
    assert sorted(layer.name for layer in bags) == sorted(
        f"{tower}_embedding_{field}" for tower in ("ctr", "cvr") for field in ALL_FIELDS
    )
    dots = {layer.name for layer in model.layers if isinstance(layer, UserItemDot)}
    assert dots == {"ctr_user_item_dots", "cvr_user_item_dots"}  # each from its own tables
    tables = {
        tower: [layer.weights[0] for layer in bags if layer.name.startswith(tower)]
        for tower in ("ctr", "cvr")
    }
    with tf.GradientTape(persistent=True) as tape:
        out = model(batch, training=False)
        ctr, cvr = tf.reduce_sum(out["p_ctr"]), tf.reduce_sum(out["p_cvr"])
    for target, own, other in ((ctr, "ctr", "cvr"), (cvr, "cvr", "ctr")):
        own_grads = tape.gradient(target, tables[own])
        assert all(np.abs(tf.convert_to_tensor(g).numpy()).max() > 0 for g in own_grads)
        assert all(g is None for g in tape.gradient(target, tables[other]))
    out = predict(model, batch)
    np.testing.assert_allclose(out["p_ctcvr"], out["p_ctr"] * out["p_cvr"], rtol=1e-6)


# --- Per-context batches --------------------------------------------------------------


def grouped_and_per_impression(
    vocabularies: dict[str, np.ndarray], n: int, n_contexts: int, *, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The same impressions twice: user fields once per context with `context_row`, and
    copied into every impression's row (`per_impression_inputs`)."""
    rng = np.random.default_rng(seed)
    contexts = make_batch(n_contexts, vocabularies, seed=seed)
    impressions = make_batch(n, vocabularies, seed=seed + 1)
    row = rng.integers(0, n_contexts, n).astype(np.int32)
    grouped, flat = {CONTEXT_ROW_KEY: row}, {}
    for field in ALL_FIELDS:
        for key in (ids_key(field), wts_key(field)):
            if field in COMMON_FIELDS:
                grouped[key], flat[key] = contexts[key], contexts[key][row]
            else:
                grouped[key] = flat[key] = impressions[key]
    return grouped, per_impression_inputs(flat)


@pytest.mark.parametrize("variant", ["esmm", "esmm_ns"])
def test_per_context_inputs_give_the_per_impression_predictions(vocabularies, variant):
    """User fields sent once per context with context_row give the same outputs (and loss
    gradients) as the same impressions with their user fields copied per row."""
    config = SMALL_CONFIG.model_copy(
        update={"variant": variant, "cvr_tower": TowerConfig(units=[8, 4], batch_norm=True)}
    )
    model = build_esmm(config, vocabularies, seed=8)
    grouped, flat = grouped_and_per_impression(vocabularies, 40, 6, seed=3)

    def outputs_and_grads(inputs):
        with tf.GradientTape() as tape:
            out = model(inputs, training=False)
            total = tf.reduce_sum(out["p_ctr"]) + tf.reduce_sum(out["p_ctcvr"])
        grads = tape.gradient(total, model.trainable_variables)
        return out, [tf.convert_to_tensor(g).numpy() for g in grads]

    (out_g, grads_g), (out_f, grads_f) = outputs_and_grads(grouped), outputs_and_grads(flat)
    for key in OUTPUT_KEYS:
        np.testing.assert_allclose(np.asarray(out_g[key]), np.asarray(out_f[key]), rtol=1e-5)
    for a, b in zip(grads_g, grads_f, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_per_impression_inputs_mark_every_row_as_its_own_context(batch):
    """context_row = -1 everywhere; an existing context_row is not silently replaced."""
    flat = {key: value for key, value in batch.items() if key != CONTEXT_ROW_KEY}
    inputs = per_impression_inputs(flat)
    np.testing.assert_array_equal(inputs[CONTEXT_ROW_KEY], np.full(32, -1, np.int32))
    with pytest.raises(ValueError, match="already have a 'context_row'"):
        per_impression_inputs(inputs)


# --- Errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda v: {k: x for k, x in v.items() if k != "205"}, r"no entry for fields \['205'\]"),
        (lambda v: {f"ids_{k}": x for k, x in v.items()}, r"not 'ids_205'"),
        (lambda v: {**v, "999": [1]}, r"unknown fields \['999'\]"),
        (lambda v: {**v, "206": [5, 5, 6]}, r"field '206' has duplicate ids"),
        (lambda v: {**v, "206": [1.5, 2.5]}, r"field '206' must be a 1-D sequence of integer"),
        (lambda v: {**v, "206": [[1, 2]]}, r"field '206' must be a 1-D sequence of integer"),
        (lambda v: {**v, "206": [-1, 2]}, r"field '206' has negative ids"),
    ],
)
def test_bad_vocabularies_are_rejected_naming_the_field(vocabularies, change, message):
    """A missing, misnamed, unknown or malformed vocabulary fails before any layer is built."""
    with pytest.raises(ValueError, match=message):
        build_esmm(SMALL_CONFIG, change(vocabularies))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (ModelConfig.model_construct(embedding_dim=0), r"model\.embedding_dim must be > 0"),
        (
            SMALL_CONFIG.model_copy(update={"cvr_tower": TowerConfig(units=[8, 0])}),
            r"model\.cvr_tower\.units must all be > 0",
        ),
        (
            SMALL_CONFIG.model_copy(update={"ctr_tower": TowerConfig(activation="relux")}),
            r"model\.ctr_tower\.activation 'relux' is not a Keras activation",
        ),
    ],
)
def test_bad_model_config_is_rejected_naming_the_key(vocabularies, config, message):
    """Config values that slipped past pydantic are reported by their params.yaml key."""
    with pytest.raises(ValueError, match=message):
        build_esmm(config, vocabularies)
