"""Training the model of `models.esmm`: the targets, the ESMM and BASE losses of
`compile_esmm`, the `.keras` round trip (variant included), and short fits that learn a
planted signal.
"""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from models.config import CompileConfig, TowerConfig
from models.esmm import (
    EsmmModel,
    binary_crossentropy_per_row,
    build_esmm,
    compile_esmm,
    esmm_targets,
)
from models.features import OUTPUT_KEYS, ids_key, wts_key
from tests.models.esmm_data import (
    SMALL_CONFIG,
    UNKNOWN_IDS,
    VOCAB_SIZE,
    make_batch,
    make_labels,
    make_planted_dataset,
    predict,
)

# --- Targets --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global seeds (Keras initialisers, shuffling): a fit
    must not depend on which tests ran earlier in this process (pytest-xdist mixes them)."""
    keras.utils.set_random_seed(0)


def test_esmm_targets_are_click_and_click_times_conversion():
    """Labels: p_ctr = click, p_ctcvr = click * conversion, float32, no p_cvr key."""
    targets = esmm_targets([1, 0, 1, 0], [1, 1, 0, 0])

    assert set(targets) == {"p_ctr", "p_ctcvr"}
    np.testing.assert_array_equal(targets["p_ctr"], [1, 0, 1, 0])
    np.testing.assert_array_equal(targets["p_ctcvr"], [1, 0, 0, 0])
    assert all(t.dtype == np.float32 for t in targets.values())


def test_base_targets_mask_the_conversion_label_of_unclicked_rows():
    """BASE labels: p_ctr = click, p_cvr = conversion on clicked rows and -1 elsewhere."""
    targets = esmm_targets([1, 0, 1, 0], [1, 1, 0, 0], variant="base")

    assert set(targets) == {"p_ctr", "p_cvr"}
    np.testing.assert_array_equal(targets["p_ctr"], [1, 0, 1, 0])
    np.testing.assert_array_equal(targets["p_cvr"], [1, -1, 0, -1])
    with pytest.raises(ValueError, match="model.variant must be one of"):
        esmm_targets([1], [1], variant="mmoe")


@pytest.mark.parametrize(
    ("click", "conversion", "message"),
    [
        ([1, 0, 1], [1, 0], "same length"),
        ([1, 0, 2], [1, 0, 0], "click labels must be 0 or 1"),
        ([1, 0, 1], [0.5, 0, 0], "conversion labels must be 0 or 1"),
    ],
)
def test_esmm_targets_rejects_misaligned_or_non_binarymake_labels(click, conversion, message):
    """Click and conversion labels must align row by row and be 0/1."""
    with pytest.raises(ValueError, match=message):
        esmm_targets(click, conversion)


# --- Loss and compile -----------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_model(vocabularies) -> keras.Model:
    model = build_esmm(SMALL_CONFIG, vocabularies, seed=5)
    compile_esmm(
        model, CompileConfig(learning_rate=1e-2, ctr_loss_weight=0.3, ctcvr_loss_weight=2.0)
    )
    return model


def test_compiled_loss_is_weighted_ctr_plus_ctcvr_bce_with_no_p_cvr_term(compiled_model, batch):
    """loss = 0.3 * BCE(click, p_ctr) + 2.0 * BCE(click * conversion, p_ctcvr), nothing on p_cvr."""
    click, conversion = make_labels(32, seed=2)
    logs = compiled_model.evaluate(
        batch, esmm_targets(click, conversion), batch_size=32, verbose=0, return_dict=True
    )
    out = predict(compiled_model, batch)

    def bce(y, p):
        p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))

    expected = 0.3 * bce(click, out["p_ctr"]) + 2.0 * bce(click * conversion, out["p_ctcvr"])
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)
    assert not any(key.startswith("p_cvr_loss") for key in logs)


def test_loss_ignores_conversion_labels_of_unclicked_rows(compiled_model, batch):
    """Flipping conversion on unclicked rows leaves the loss unchanged; on clicked rows it does not."""
    click, conversion = make_labels(32, seed=3)
    unclicked_flipped = np.where(click == 0, 1 - conversion, conversion)
    clicked_flipped = np.where(click == 1, 1 - conversion, conversion)

    def loss(conv: np.ndarray) -> float:
        return compiled_model.evaluate(
            batch, esmm_targets(click, conv), batch_size=32, verbose=0, return_dict=True
        )["loss"]

    assert loss(unclicked_flipped) == loss(conversion)
    assert loss(clicked_flipped) != pytest.approx(loss(conversion))


def test_base_loss_is_ctr_bce_plus_cvr_bce_on_clicked_rows_only(vocabularies, batch):
    """BASE: loss = 0.3 * BCE(click, p_ctr) + 2.0 * mean(click * BCE(conversion, p_cvr)), so
    flipping conversions of unclicked rows changes nothing, of clicked rows it does."""
    config = SMALL_CONFIG.model_copy(update={"variant": "base"})
    model = build_esmm(config, vocabularies, seed=5)
    compile_esmm(
        model, CompileConfig(learning_rate=1e-2, ctr_loss_weight=0.3, ctcvr_loss_weight=2.0)
    )
    click, conversion = make_labels(32, seed=2)
    out = predict(model, batch)

    def loss(conv: np.ndarray) -> dict[str, float]:
        targets = esmm_targets(click, conv, variant="base")
        return model.evaluate(batch, targets, batch_size=32, verbose=0, return_dict=True)

    def bce(y, p):
        p = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        return -(y * np.log(p) + (1 - y) * np.log(1 - p))

    expected = 0.3 * bce(click, out["p_ctr"]).mean() + 2.0 * np.mean(
        click * bce(conversion, out["p_cvr"])
    )
    logs = loss(conversion)
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)
    assert not any(key.startswith("p_ctcvr_loss") for key in logs)
    assert {"p_ctr_auc", "p_ctcvr_auc", "p_cvr_auc_clicked"} <= set(logs)
    assert loss(np.where(click == 0, 1 - conversion, conversion))["loss"] == logs["loss"]
    assert loss(np.where(click == 1, 1 - conversion, conversion))["loss"] != pytest.approx(
        logs["loss"]
    )


def test_loss_keeps_the_gradient_of_rare_positives_below_keras_clip():
    """A converted impression predicted at p_ctcvr = 1e-12 (far below Keras' 1e-7 clip) still
    gets its full log loss and a gradient that raises the CVR logit; a collapsed p_cvr
    would otherwise never recover."""
    logit = tf.Variable([-20.0, -20.0])  # cvr logits; p_ctr = 0.5
    with tf.GradientTape() as tape:
        p_ctcvr = 0.5 * tf.sigmoid(logit)
        loss = binary_crossentropy_per_row(tf.constant([1.0, 0.0]), p_ctcvr)
    grad = tape.gradient(loss, logit).numpy()
    assert float(loss[0]) == pytest.approx(-np.log(0.5 / (1 + np.exp(20.0))), rel=1e-4)
    assert grad[0] == pytest.approx(-1.0, abs=1e-3)  # d(-log sigmoid(z))/dz = -(1 - p)
    assert 0 <= grad[1] < 1e-8  # a negative at p ~ 1e-9 barely pushes further down
    with tf.GradientTape() as tape:  # what Keras' clipped BCE does instead
        clipped = keras.losses.binary_crossentropy(
            tf.constant([[1.0]]), 0.5 * tf.sigmoid(logit[:1])[:, None]
        )
    assert float(tf.reduce_sum(tf.abs(tape.gradient(clipped, logit)))) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"learning_rate": 0.0}, ValueError, r"learning_rate must be > 0"),
        ({"ctr_loss_weight": -1.0}, ValueError, r"loss weights must be >= 0"),
        ({"ctr_loss_weight": 0.0, "ctcvr_loss_weight": 0.0}, ValueError, r"at least one"),
    ],
)
def test_bad_compile_arguments_are_rejected(model, kwargs, error, message):
    """compile_esmm names the train.* key at fault."""
    arguments = {"learning_rate": 1e-3, "ctr_loss_weight": 1.0, "ctcvr_loss_weight": 1.0}
    config = CompileConfig.model_construct(**{**arguments, **kwargs})  # past pydantic's checks
    with pytest.raises(error, match=message):
        compile_esmm(model, config)


def test_compile_esmm_refuses_a_model_not_built_by_build_esmm():
    """A plain Keras model cannot take ESMM's two-key labels, so compile_esmm says so."""
    inputs = keras.Input(shape=(2,))
    plain = keras.Model(inputs, {"p_ctr": keras.layers.Dense(1)(inputs)})
    with pytest.raises(TypeError, match="build_esmm"):
        compile_esmm(plain, CompileConfig())


# --- Serialisation --------------------------------------------------------------------


def test_keras_round_trip_reproduces_predictions_and_training_state(vocabularies, batch, tmp_path):
    """A trained model saved to .keras loads without custom_objects and gives the same
    predictions (vocabularies and OOV included), loss and optimizer step."""
    config = SMALL_CONFIG.model_copy(
        update={
            "pooling": "sum",
            "embedding_l2": 1e-5,
            "cvr_gradient_scale": 3.0,
            "cvr_tower": TowerConfig(units=[8, 4], batch_norm=True, dropout=0.2, l2=1e-4),
        }
    )
    model = build_esmm(config, vocabularies, seed=6)
    compile_esmm(model, CompileConfig(learning_rate=1e-2))
    targets = esmm_targets(*make_labels(32, seed=4))
    model.fit(batch, targets, batch_size=16, epochs=1, verbose=0)
    probe = dict(batch)
    probe[ids_key("205")] = probe[ids_key("205")].copy()
    probe[ids_key("205")][:4, 0] = UNKNOWN_IDS[0]
    path = tmp_path / "esmm.keras"

    model.save(path)
    loaded = keras.models.load_model(path)

    assert isinstance(loaded, EsmmModel)
    before, after = predict(model, probe), predict(loaded, probe)
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(after[key], before[key])
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 2
    logs = [
        m.evaluate(probe, targets, batch_size=32, verbose=0, return_dict=True)
        for m in (model, loaded)
    ]
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-6)


# --- Training -------------------------------------------------------------------------


def test_short_fit_learns_ctr_ctcvr_and_clicked_cvr(vocabularies):
    """Two epochs on a planted signal lower the loss and beat a constant predictor on
    CTR AUC, CTCVR AUC and CVR AUC over clicked rows (held-out data, sklearn AUC). Also
    pins Keras 3.15.1: fit/evaluate accept labels for two of the three outputs."""
    train_x, train_click, train_conv = make_planted_dataset(6000, vocabularies, seed=10)
    test_x, test_click, test_conv = make_planted_dataset(3000, vocabularies, seed=11)
    model = build_esmm(SMALL_CONFIG, vocabularies, seed=0)
    compile_esmm(model, CompileConfig(learning_rate=0.02))
    targets = esmm_targets(train_click, train_conv)

    initial = model.evaluate(train_x, targets, batch_size=1024, verbose=0, return_dict=True)
    history = model.fit(train_x, targets, batch_size=256, epochs=2, verbose=0)
    final = model.evaluate(train_x, targets, batch_size=1024, verbose=0, return_dict=True)

    assert final["loss"] < initial["loss"]
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert {"p_ctr_auc", "p_ctcvr_auc", "p_cvr_auc_clicked"} <= set(final)
    out = model.predict(test_x, batch_size=1024, verbose=0)
    clicked = test_click == 1
    assert roc_auc_score(test_click, out["p_ctr"]) > 0.65
    assert roc_auc_score(test_click * test_conv, out["p_ctcvr"]) > 0.65
    assert roc_auc_score(test_conv[clicked], out["p_cvr"][clicked]) > 0.65


def make_count_dataset(
    n: int, vocabularies: dict[str, np.ndarray], *, seed: int, shops: slice
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The shop cross (509) carries the signal in its count only: the matched shop is
    drawn from `shops` of the 509 vocabulary, and its weight (the user's history count of
    the shop) sets the click probability: 0.1 without a match, up to 0.7 with many."""
    rng = np.random.default_rng(seed)
    batch = make_batch(n, vocabularies, seed=seed, max_length=3)
    count = np.where(rng.random(n) < 0.5, 0, rng.integers(1, 30, n))
    shop = rng.choice(vocabularies["509"][shops], n)
    batch[ids_key("509")] = np.where(count > 0, shop, 0)[:, None].astype(np.int64)
    batch[wts_key("509")] = count[:, None].astype(np.float32)
    click = rng.random(n) < 0.1 + 0.6 * np.log1p(count) / np.log1p(30)
    conversion = rng.random(n) < 0.3
    return batch, click.astype(np.float32), (click & conversion).astype(np.float32)


def test_weight_features_learn_a_signal_carried_by_cross_counts_alone(vocabularies):
    """Test impressions match shops no training impression matched (rare ids in real
    data): their embeddings are untrained, and only the weight features carry the count."""
    half = VOCAB_SIZE // 2
    train_x, train_click, train_conv = make_count_dataset(
        6000, vocabularies, seed=20, shops=slice(0, half)
    )
    test_x, test_click, _ = make_count_dataset(3000, vocabularies, seed=21, shops=slice(half, None))
    aucs = {}
    for weight_features in (False, True):
        config = SMALL_CONFIG.model_copy(update={"weight_features": weight_features})
        model = build_esmm(config, vocabularies, seed=0)
        compile_esmm(model, CompileConfig(learning_rate=0.02))
        model.fit(
            train_x, esmm_targets(train_click, train_conv), batch_size=256, epochs=2, verbose=0
        )
        out = model.predict(test_x, batch_size=1024, verbose=0)
        aucs[weight_features] = roc_auc_score(test_click, out["p_ctr"])
    assert aucs[True] > 0.65  # the count's own AUC here is about 0.75
    assert aucs[True] > aucs[False] + 0.1


@pytest.mark.parametrize("variant", ["esmm_ns", "base"])
def test_variants_learn_and_round_trip_through_keras_files(vocabularies, variant, tmp_path):
    """A short fit of ESMM-NS / BASE beats a constant predictor on the three AUCs, and the
    saved model (same three outputs) reloads with identical predictions."""
    train_x, train_click, train_conv = make_planted_dataset(6000, vocabularies, seed=10)
    test_x, test_click, test_conv = make_planted_dataset(3000, vocabularies, seed=11)
    model = build_esmm(SMALL_CONFIG.model_copy(update={"variant": variant}), vocabularies, seed=0)
    compile_esmm(model, CompileConfig(learning_rate=0.02))
    model.fit(
        train_x,
        esmm_targets(train_click, train_conv, variant),
        batch_size=256,
        epochs=2,
        verbose=0,
    )
    out = predict(model, test_x)
    clicked = test_click == 1
    assert roc_auc_score(test_click, out["p_ctr"]) > 0.65
    assert roc_auc_score(test_click * test_conv, out["p_ctcvr"]) > 0.65
    assert roc_auc_score(test_conv[clicked], out["p_cvr"][clicked]) > 0.65

    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert model.variant == loaded.variant == variant  # saved with the model
    again = predict(loaded, test_x)
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(again[key], out[key])


# The models are compiled, never trained: their optimisers have no state to restore.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_a_file_saved_without_the_variant_gets_it_from_its_compiled_loss(vocabularies, tmp_path):
    """Models saved before `EsmmModel` stored its variant (no `variant` in config.json)
    load with the variant their compiled loss implies: BASE has a loss on p_cvr."""
    for variant in ("esmm", "esmm_ns", "base"):
        model = build_esmm(SMALL_CONFIG.model_copy(update={"variant": variant}), vocabularies)
        compile_esmm(model, CompileConfig())
        saved, legacy = tmp_path / f"{variant}.keras", tmp_path / f"{variant}_legacy.keras"
        model.save(saved)
        with zipfile.ZipFile(saved) as src, zipfile.ZipFile(legacy, "w") as dst:
            for item in src.infolist():
                data = src.read(item)
                if item.filename == "config.json":
                    config = json.loads(data)
                    del config["config"]["variant"]
                    data = json.dumps(config).encode()
                dst.writestr(item, data)
        assert keras.models.load_model(legacy).variant == variant
