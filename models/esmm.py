"""The Keras 3 ESMM model: shared field embeddings feeding a CTR tower and a CVR tower.

Entire Space Multi-Task Model: Ma et al., "Entire Space Multi-Task Model: An Effective
Approach for Estimating Post-Click Conversion Rate", SIGIR 2018, arXiv:1804.07931.

Semantics, written down once:

- Inputs are the 23 Ali-CCP fields of `models.features.ALL_FIELDS`. Field `F` arrives as
  `ids_F` (int64, RAW feature ids) and `wts_F` (float32, same shape): `(batch, None)` for
  the impression-side fields, `(n_contexts, None)` for the user-side `COMMON_FIELDS`, with
  `context_row` (int32, `(batch,)`) naming each impression's row of the user-side inputs.
  The user side is pooled, and multiplied by its part of each tower's first layer, once
  per context (`ContextDense`). Records that carry their own user fields (serving, one
  per context) use `per_impression_inputs`, which adds `context_row = -1` ("own row").
  Padding is id 0 with weight 0 and an absent field is a row of zero weights, so neither
  ever contributes.
- The id mapping lives inside the model: per field an `IntegerLookup` over that field's
  vocabulary, with row 0 reserved for ids outside it (the OOV bucket), then one embedding
  table per field (`EmbeddingBag`). Each table is looked up once per batch and the pooled
  result is shared by both towers: the shared embeddings are how the CVR tower learns from
  the far more plentiful click data.
- Each field's entries are pooled with their weights: `sum` = sum(w * e), `mean` =
  sum(w * e) / max(sum(w), eps), so an all-zero-weight field pools to a zero vector.
- `model.interactions` (default on): each tower's per-impression input also gets, for
  each cross of the format (`models.features.CROSSES`: history categories 109_14 x item
  category 206, shops 110_14 x 207, brands 127_14 x 216, intention nodes 150_14 x 210),
  the dot product of the weighted mean of the history field's embeddings with the item
  field's embedding (`UserItemDot`), from the same shared tables.
- `model.interest_match` (default on): each tower's per-impression input also gets the
  match of the user's interest with the item's category: the user's interest vector is
  the weighted mean of their history categories' rows (109_14) plus their profile
  category's row (121), the item's vector its category's row (206), and the tower reads
  their dot and element-wise product (`InterestMatch`, `embedding_dim + 1` inputs). The
  rows come from extra columns of those three fields' tables (width `2 * embedding_dim`,
  still one table per field, looked up once; `ColumnSplit`): the first half feeds the
  towers as every table does and carries every effect of a category (click, conversion,
  gender, age), the second half only the match. Both halves of 109_14 and 206 start from
  the co-occurrence factorisation (`tasks.cooccurrence`).
- `model.weight_features` (default on): each tower also reads, per field, `log1p` of the
  weight total and of the entry count (`WeightStats`; user fields once per context). For
  the crosses that is the user's history count of the item's category, shop, brand or
  node, whatever the matched id.
- `p_ctr = sigmoid(ctr_logit)`, `p_cvr = sigmoid(cvr_logit)`, `p_ctcvr = p_ctr * p_cvr`.
  All three are exposed as named outputs of shape `(batch,)`.
- Training loss = w_ctr * BCE(click, p_ctr) + w_ctcvr * BCE(click * conversion, p_ctcvr)
  over ALL impressions, with NO direct loss on p_cvr: the CVR tower learns only through
  the product, over the entire impression space. The conversion label of an unclicked
  impression is multiplied out by its click label.
- `model.cvr_gradient_scale` (default 5, ESMM only): the gradient the CVR tower sends into
  the shared tables is multiplied by it (`GradientScale`, the identity forward), so the
  conversion-only effects are not drowned by the click loss in Adam's per-row steps.
- Ablations of the paper (`model.variant`, stored on the model): `esmm_ns` gives each
  tower its own embedding tables (two per field) with the same loss; `base` also has
  separate tables and trains the CTR tower with BCE(click, p_ctr) on all impressions and
  the CVR tower with BCE(conversion, p_cvr) on clicked impressions only; p_ctcvr =
  p_ctr * p_cvr is formed from the two. All variants have the same inputs and the same
  three outputs.
- CTR and CTCVR AUC are measured on all impressions; CVR AUC only on clicked ones
  (`p_cvr_auc_clicked`). The compiled AUCs are Keras' thresholded approximations, for
  monitoring training; gate decisions belong to the evaluation step.

This module owns the model (`EsmmModel`, which stores its variant), its losses, `build_esmm`
and its parts, `compile_esmm`, the targets and the checks of their arguments; the layers are
in `models.layers`, the configuration in `models.config`. No file reading, no orchestration:
callers pass the vocabularies in and own all I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from models.checks import (
    check_compile_config,
    check_config,
    check_variant,
    check_vocabularies,
)
from models.config import CompileConfig, ModelConfig, TowerConfig
from models.features import (
    ALL_FIELDS,
    COMMON_FIELDS,
    CONTEXT_ROW_KEY,
    CROSSES,
    HISTORY_FIELDS,
    INTEREST_FIELDS,
    SKELETON_FIELDS,
    ids_key,
    wts_key,
)

# The layers are importable from here too (`from models.esmm import EmbeddingBag`), and
# importing this module registers them for loading `.keras` files.
from models.layers import (
    PACKAGE,
    ColumnSplit,
    ContextDense,
    EmbeddingBag,
    GradientScale,
    InterestMatch,
    Probability,
    UserItemDot,
    WeightedMean,
    WeightStats,
)

_NUM_OOV_INDICES = 1  # index 0 of every lookup is the bucket for ids outside the vocabulary
_LOG_FLOOR = 1e-30  # smallest probability the loss takes the log of (float32 safe)
_MAX_PROBABILITY = 1.0 - 1e-7  # largest p in log(1 - p): 1 - p underflows above it
_TOWERS = ("ctr", "cvr")  # the two towers, in build order


@keras.saving.register_keras_serializable(package=PACKAGE)
class EsmmModel(keras.Model):
    """The functional ESMM graph (built by `build_esmm`) plus ESMM-aware metric updates.

    ESMM labels only two of its three outputs (`esmm_targets` has no `p_cvr` key), but the
    compiled metrics of Keras 3.15.1 index the labels by every output name of a dict-output
    model and fail with `KeyError: 'p_cvr'` (`CompileMetrics._flatten_y`), although the
    compiled loss accepts the partial mapping. `compute_metrics` therefore scores only the
    labelled outputs, and adds `p_cvr_auc_clicked`: the AUC of p_cvr over clicked rows
    only, using the click label as sample weight and click * conversion, which equals
    conversion on clicked rows, as the label.

    The model stores its `variant` (`model.variant`), saved with it: `compile_esmm` picks the
    loss from it and `compute_metrics` reads the labels of that variant.
    """

    def __init__(self, *args: Any, variant: str | None = None, **kwargs: Any) -> None:
        # (*args, **kwargs) keeps the model revivable as a Functional from its config.
        super().__init__(*args, **kwargs)
        # None only while reviving a file saved before the model stored its variant
        # (`compile_from_config` then sets it).
        self.variant = variant
        self.cvr_auc_clicked = keras.metrics.AUC(name="p_cvr_auc_clicked")
        self._predict_any_shape = None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "variant": self.variant}

    def compile_from_config(self, config: dict[str, Any]) -> None:
        super().compile_from_config(config)
        if self.variant is None:
            self.variant = _saved_variant(self)

    def predict_batch(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The outputs on one batch of raw inputs (`ids_F`, `wts_F`, `context_row`), as
        numpy arrays.

        Keras's `predict_on_batch` traces again for each new combination of list widths
        until TF has relaxed the shapes one input at a time: dozens of traces over a test
        split, several times slower the first time (see benchmarks/pipeline.md). This is
        traced once, for any batch size and list widths.
        """
        if self._predict_any_shape is None:
            import tensorflow as tf  # the TensorFlow backend's tracing (keras.ops has none)

            spec = {
                name: tf.TensorSpec((None,) * len(tensor.shape), tensor.dtype, name=name)
                for name, tensor in self.input.items()
            }
            self._predict_any_shape = (
                spec,
                tf.function(lambda x: self(x, training=False), input_signature=[spec]),
            )
        spec, predict = self._predict_any_shape
        outputs = predict({name: inputs[name] for name in spec})
        return {name: np.asarray(value) for name, value in outputs.items()}

    def compute_metrics(
        self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None
    ) -> dict[str, Any]:
        if not isinstance(y, Mapping):
            return super().compute_metrics(x, y, y_pred, sample_weight)
        if self.variant == "base":
            # BASE labels (`esmm_targets(..., variant="base")`): conversion, -1 if unclicked.
            clicked = ops.cast(ops.greater_equal(y["p_cvr"], 0.0), "float32")
            y = {"p_ctr": y["p_ctr"], "p_ctcvr": clicked * ops.maximum(y["p_cvr"], 0.0)}
        if "p_ctr" in y and "p_ctcvr" in y:
            clicked = ops.cast(y["p_ctr"], "float32")
            if sample_weight is not None and not isinstance(sample_weight, Mapping):
                clicked = clicked * ops.cast(sample_weight, "float32")
            self.cvr_auc_clicked.update_state(y["p_ctcvr"], y_pred["p_cvr"], sample_weight=clicked)
        labelled = {key: value for key, value in y_pred.items() if key in y}
        return super().compute_metrics(x, y, labelled, sample_weight)

    def _maybe_symbolic_build(self, iterator: Any = None, data_batch: Any = None) -> None:
        """Build loss and metrics from replica 0's first batch under tf.distribute.

        Keras 3.15.1 averages the first batch over the replicas to get a sample to build
        from, which fails when replicas hold batches of different shapes; ESMM batches do
        (each replica gets whole contexts: the number of contexts and the list widths
        vary). One replica's batch serves as well. (Private Keras API: pinned by
        tests/tasks/test_train.py's distributed test.)
        """
        strategy = getattr(self, "_distribute_strategy", None)
        if strategy is None or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        import tensorflow as tf  # tf.distribute only

        # From a fresh iterator: Keras' own build takes its sample from the training
        # iterator and so drops the epoch's first step.
        batch = next(iter(iterator._get_iterator()))
        first = keras.tree.map_structure(
            lambda v: (
                strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues)
                else v
            ),
            batch,
        )
        with strategy.scope():
            self._symbolic_build(data_batch=first)


def _saved_variant(model: EsmmModel) -> str:
    """The variant of a compiled model revived from a file saved before `EsmmModel` stored
    it: BASE is the one with a loss on p_cvr, ESMM-NS the one with a table per tower."""
    if "p_cvr" in model.loss:
        return "base"
    separate = any(layer.name.startswith("ctr_embedding_") for layer in model.layers)
    return "esmm_ns" if separate else "esmm"


@keras.saving.register_keras_serializable(package=PACKAGE)
def binary_crossentropy_per_row(y_true: Any, y_pred: Any) -> Any:
    """BCE with one value per row, for `(batch,)` probability outputs.

    One loss per impression (not the batch mean `keras.losses.binary_crossentropy` returns
    for rank-1 outputs), so the compiled reduction and any sample weights line up with rows.
    Probabilities are floored at `_LOG_FLOOR`, not at Keras' 1e-7: p_ctcvr = p_ctr * p_cvr
    of a rare conversion (0.5% of clicks in Ali-CCP) easily falls below 1e-7, and under
    Keras' clip its gradient is zero, so p_cvr collapses to 0 and never recovers.
    """
    y_true = ops.cast(y_true, "float32")  # (batch,)
    p = ops.cast(y_pred, "float32")  # (batch,)
    log_p = ops.log(ops.maximum(p, _LOG_FLOOR))
    log_not_p = ops.log1p(-ops.minimum(p, _MAX_PROBABILITY))
    return -(y_true * log_p + (1.0 - y_true) * log_not_p)  # (batch,)


@keras.saving.register_keras_serializable(package=PACKAGE)
def binary_crossentropy_clicked(y_true: Any, y_pred: Any) -> Any:
    """BASE's CVR loss: BCE(conversion, p_cvr) on clicked rows, 0 on rows labelled -1.

    The compiled reduction divides by the batch size, as a sample weight equal to the click
    label would, so clicked rows weigh as much here as in the CTR term.
    """
    y_true = ops.cast(y_true, "float32")
    clicked = ops.cast(ops.greater_equal(y_true, 0.0), "float32")  # (batch,)
    return clicked * binary_crossentropy_per_row(ops.maximum(y_true, 0.0), y_pred)  # (batch,)


def build_esmm(
    config: ModelConfig,
    vocabularies: Mapping[str, Sequence[int] | np.ndarray],
    *,
    seed: int = 0,
) -> EsmmModel:
    """Build the (uncompiled) ESMM model.

    Args:
        config: the `model:` section of params.yaml (`variant` picks ESMM, ESMM-NS or BASE;
            the embedding layers are `embedding_F`, or `ctr_embedding_F` and
            `cvr_embedding_F` in the two ablations).
        vocabularies: per raw field name (e.g. `"205"`, not `"ids_205"`), the raw feature
            ids that get their own embedding row; any other id maps to the OOV row. Every
            field of `models.features.ALL_FIELDS` needs an entry (possibly empty).
        seed: base seed; the embedding tables and each tower get their own seeds derived
            from it, so the same seed always builds the same weights.

    Returns:
        An `EsmmModel` (its `variant` is `config.variant`) taking a dict with `ids_F`
        (int64) and `wts_F` (float32) for every field `F`, `(n_contexts, None)` for
        user-side fields and `(batch, None)` for the others, and `context_row` (int32,
        `(batch,)`), and returning a dict with `p_ctr`, `p_cvr`, `p_ctcvr`, each float32 of
        shape `(batch,)`.

    Raises:
        ValueError: a bad config value or a missing, unknown or malformed vocabulary; the
            message names the field or key to fix.
    """
    check_config(config)
    vocab_arrays = check_vocabularies(vocabularies)
    # ESMM's seeds come first and stay as they were; ESMM-NS and BASE add one more table
    # seed per field for the CVR tower's own embeddings.
    ctr_seed, cvr_seed, *embedding_seeds = _derive_seeds(seed, 2 + 2 * len(ALL_FIELDS))
    # The layers are created in this order (it fixes the saved graph and weight order).
    fields = _embeddings(config, vocab_arrays, embedding_seeds)
    towers = _tower_inputs(config, fields)
    if config.interactions:
        towers = _with_interactions(config, fields, towers)
    if config.interest_match:
        towers = _with_interest_match(config, fields, towers)
    if not _separate(config):
        towers["cvr"] = _cvr_view_of_shared(config, towers["ctr"])
    ctr_logit = _tower(*towers["ctr"], fields.context_row, config.ctr_tower, "ctr", ctr_seed)
    cvr_logit = _tower(*towers["cvr"], fields.context_row, config.cvr_tower, "cvr", cvr_seed)
    p_ctr = Probability(name="p_ctr")(ctr_logit)  # (batch,)
    p_cvr = Probability(name="p_cvr")(cvr_logit)  # (batch,)
    # CTCVR = CTR * CVR: in ESMM the only path by which the CVR tower learns.
    p_ctcvr = keras.layers.Multiply(name="p_ctcvr")([p_ctr, p_cvr])  # (batch,)
    return EsmmModel(
        inputs=fields.inputs,
        outputs={"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctcvr},
        name="esmm",
        variant=config.variant,
    )


# A tower's inputs: (user part per context, item part per impression).
_TowerInputs = tuple[keras.KerasTensor, keras.KerasTensor]


@dataclasses.dataclass
class _Fields:
    """The model's inputs and, per tower, its pooled fields (in ESMM both towers hold the
    same tensors). Rows are contexts for `COMMON_FIELDS`, impressions for the others."""

    # ids_F, wts_F of every field, then context_row
    inputs: dict[str, keras.KerasTensor] = dataclasses.field(default_factory=dict)
    # tower -> field -> (rows, embedding_dim), what the towers read
    bags: dict[str, dict[str, keras.KerasTensor]] = dataclasses.field(
        default_factory=lambda: {tower: {} for tower in _TOWERS}
    )
    # tower -> interest field -> (rows, embedding_dim), the tables' second half of columns
    interest_bags: dict[str, dict[str, keras.KerasTensor]] = dataclasses.field(
        default_factory=lambda: {tower: {} for tower in _TOWERS}
    )

    @property
    def context_row(self) -> keras.KerasTensor:
        return self.inputs[CONTEXT_ROW_KEY]  # (batch,)


def _separate(config: ModelConfig) -> bool:
    """Whether each tower has its own tables and inputs (ESMM-NS, BASE) or shares them."""
    return config.variant != "esmm"


def _list_pooling(config: ModelConfig) -> str:
    """How the behaviour lists (`HISTORY_FIELDS`) are pooled."""
    return config.list_pooling or config.pooling


def _embeddings(
    config: ModelConfig, vocabularies: Mapping[str, np.ndarray], seeds: Sequence[int]
) -> _Fields:
    """The inputs of every field, mapped to table rows by the field's `IntegerLookup` and
    pooled by its table: one read by both towers (ESMM) or one per tower; then the
    `context_row` input."""
    fields = _Fields()
    tables = (("ctr",), ("cvr",)) if _separate(config) else (_TOWERS,)
    for i, name in enumerate(ALL_FIELDS):
        ids = keras.Input(shape=(None,), dtype="int64", name=ids_key(name))
        weights = keras.Input(shape=(None,), dtype="float32", name=wts_key(name))
        fields.inputs[ids_key(name)] = ids
        fields.inputs[wts_key(name)] = weights
        lookup = keras.layers.IntegerLookup(
            vocabulary=vocabularies[name], num_oov_indices=_NUM_OOV_INDICES, name=f"lookup_{name}"
        )
        rows = lookup(ids)  # (rows, length) raw ids -> (rows, length) table rows
        for j, towers in enumerate(tables):
            prefix = f"{towers[0]}_" if _separate(config) else ""
            seed = seeds[i + j * len(ALL_FIELDS)]
            size = len(vocabularies[name]) + _NUM_OOV_INDICES
            bag, interest_bag = _pooled_field(config, name, rows, weights, size, prefix, seed)
            for tower in towers:
                fields.bags[tower][name] = bag
                if interest_bag is not None:
                    fields.interest_bags[tower][name] = interest_bag
    fields.inputs[CONTEXT_ROW_KEY] = keras.Input(shape=(), dtype="int32", name=CONTEXT_ROW_KEY)
    return fields


def _pooled_field(
    config: ModelConfig,
    name: str,
    rows: keras.KerasTensor,
    weights: keras.KerasTensor,
    table_rows: int,
    prefix: str,
    seed: int,
) -> tuple[keras.KerasTensor, keras.KerasTensor | None]:
    """One table of field `name`, looked up and pooled: `(rows, embedding_dim)` for the
    towers, and for an interest field under `model.interest_match` the match's
    `(rows, embedding_dim)` from a second half of the table's columns (else None)."""
    wide = config.interest_match and name in INTEREST_FIELDS
    embedding = EmbeddingBag(
        input_dim=table_rows,
        output_dim=config.embedding_dim * (2 if wide else 1),
        pooling=_list_pooling(config) if name in HISTORY_FIELDS else config.pooling,
        embeddings_initializer=keras.initializers.RandomUniform(-0.05, 0.05, seed=seed),
        name=f"{prefix}embedding_{name}",
        embeddings_regularizer=(
            keras.regularizers.L2(config.embedding_l2) if config.embedding_l2 else None
        ),
    )
    bag = embedding([rows, weights])  # (rows, embedding_dim), or twice as wide
    if not wide:
        return bag, None
    towers_half, interest_half = ColumnSplit(config.embedding_dim, name=f"{prefix}split_{name}")(
        bag
    )  # (rows, embedding_dim) each
    return towers_half, interest_half


def _tower_inputs(config: ModelConfig, fields: _Fields) -> dict[str, _TowerInputs]:
    """Per tower with inputs of its own (only `ctr` in ESMM, read by both), the user fields
    `(n_contexts, 13 * dim)` and the item fields `(batch, 10 * dim)`, in ALL_FIELDS order.

    With `weight_features`, each side also gets its fields' log1p weight total and entry
    count: `(n_contexts, 13 * dim + 26)` and `(batch, 10 * dim + 20)`.
    """
    stats = (
        {f: WeightStats(name=f"weight_stats_{f}")(fields.inputs[wts_key(f)]) for f in ALL_FIELDS}
        if config.weight_features
        else {}
    )  # field -> (rows, 2)
    towers = {}
    for tower in _TOWERS if _separate(config) else ("ctr",):
        prefix = f"{tower}_" if _separate(config) else "shared_"
        sides = []
        for is_user, side in ((True, "user"), (False, "item")):
            names = [f for f in ALL_FIELDS if (f in COMMON_FIELDS) == is_user]
            part = keras.layers.Concatenate(axis=-1, name=f"{prefix}{side}_embeddings")(
                [fields.bags[tower][f] for f in names]
            )
            if stats:
                part = keras.layers.Concatenate(axis=-1, name=f"{prefix}{side}_with_stats")(
                    [part] + [stats[f] for f in names]
                )
            sides.append(part)
        towers[tower] = (sides[0], sides[1])
    return towers


def _with_interactions(
    config: ModelConfig, fields: _Fields, towers: dict[str, _TowerInputs]
) -> dict[str, _TowerInputs]:
    """`towers` with the user x item dots of the format's crosses (`UserItemDot`,
    `(batch, len(CROSSES))`) joined to each item part."""
    separate = _separate(config)
    out = {}
    for tower, (user, item) in towers.items():
        histories = [fields.bags[tower][history] for history in HISTORY_FIELDS]
        if _list_pooling(config) == "sum":  # the dots take the lists' weighted means
            histories = [
                WeightedMean(name=f"{tower}_mean_{history}")([bag, fields.inputs[wts_key(history)]])
                for bag, history in zip(histories, HISTORY_FIELDS, strict=True)
            ]  # (n_contexts, dim) each
        items = [fields.bags[tower][item_field] for _, item_field in CROSSES.values()]
        dots = UserItemDot(name=f"{tower}_user_item_dots" if separate else "user_item_dots")(
            [histories, items, fields.context_row]
        )  # (batch, len(CROSSES))
        name = f"{tower}_item_inputs" if separate else "shared_item_inputs"
        out[tower] = (user, keras.layers.Concatenate(axis=-1, name=name)([item, dots]))
    return out


def _with_interest_match(
    config: ModelConfig, fields: _Fields, towers: dict[str, _TowerInputs]
) -> dict[str, _TowerInputs]:
    """`towers` with the match of the user's interest (history categories + profile
    category) and the item category (`InterestMatch`, `(batch, dim + 1)`), from the second
    halves of those fields' tables, joined to each item part."""
    separate = _separate(config)
    history, profile, category = INTEREST_FIELDS
    out = {}
    for tower, (user, item) in towers.items():
        own = fields.interest_bags[tower]
        prefix = f"{tower}_" if separate else ""
        history_mean = own[history]  # (n_contexts, dim)
        if _list_pooling(config) == "sum":  # the interest takes the history's weighted mean
            history_mean = WeightedMean(name=f"{prefix}interest_mean_{history}")(
                [history_mean, fields.inputs[wts_key(history)]]
            )
        user_interest = keras.layers.Add(name=f"{prefix}user_interest")(
            [history_mean, own[profile]]
        )  # (n_contexts, dim)
        match = InterestMatch(name=f"{prefix}interest_match")(
            [user_interest, own[category], fields.context_row]
        )  # (batch, dim + 1)
        name = f"{tower}_item_with_interest" if separate else "shared_item_with_interest"
        out[tower] = (user, keras.layers.Concatenate(axis=-1, name=name)([item, match]))
    return out


def _cvr_view_of_shared(config: ModelConfig, shared: _TowerInputs) -> _TowerInputs:
    """ESMM: the CVR tower's view of the shared inputs, the CTR tower's own tensors or, with
    `cvr_gradient_scale`, the same values with the CVR tower's pull on the tables scaled."""
    if config.cvr_gradient_scale == 1.0:
        return shared
    user, item = (
        GradientScale(config.cvr_gradient_scale, name=f"cvr_gradient_scale_{side}")(x)
        for side, x in zip(("user", "item"), shared, strict=True)
    )
    return user, item


def per_impression_inputs(features: Mapping[str, Any]) -> dict[str, Any]:
    """Model inputs for records that each carry their own user-side fields.

    Ingestion joined per impression and serving requests (one record = one context) give
    every row its own `ids_F`/`wts_F` for the user-side fields too; the model then needs
    `context_row = -1` (each impression's own row), which this adds. (Unlike
    `arange(batch)`, -1 stays right when Keras slices or shuffles the arrays into batches.)

    Args:
        features: `ids_F` and `wts_F` for every field, all with the same number of rows.

    Returns:
        A new dict: `features` plus `context_row` (int32, `(batch,)`, all -1).

    Raises:
        ValueError: `features` already has a `context_row`, or no `ids_F` of a field.
    """
    if CONTEXT_ROW_KEY in features:
        raise ValueError(f"features already have a {CONTEXT_ROW_KEY!r} input")
    key = ids_key(SKELETON_FIELDS[0])
    if key not in features:
        raise ValueError(f"features have no {key!r} input")
    n = int(np.shape(features[key])[0])
    return {**features, CONTEXT_ROW_KEY: np.full(n, -1, dtype=np.int32)}


def esmm_targets(click: Any, conversion: Any, variant: str = "esmm") -> dict[str, np.ndarray]:
    """Labels for a model compiled by `compile_esmm` with the same `variant`.

    Args:
        click: 0/1 click label per impression.
        conversion: 0/1 conversion label per impression; its value on unclicked rows is
            irrelevant, it is multiplied by the click label (or masked out, for BASE).
        variant: `model.variant`; `esmm` and `esmm_ns` share the ESMM labels.

    Returns:
        ESMM: `{"p_ctr": click, "p_ctcvr": click * conversion}`, with deliberately no
        `p_cvr` key: ESMM puts no loss on p_cvr. BASE: `{"p_ctr": click, "p_cvr":
        conversion where clicked, else -1}` (-1 = no CVR label). Float32 arrays, `(n,)`.

    Raises:
        ValueError: the two label arrays differ in length, or hold values other than 0/1.
    """
    click = np.asarray(click, dtype=np.float32).reshape(-1)
    conversion = np.asarray(conversion, dtype=np.float32).reshape(-1)
    if click.shape != conversion.shape:
        raise ValueError(
            f"click and conversion labels must have the same length, got {click.shape[0]} "
            f"and {conversion.shape[0]}"
        )
    for name, labels in (("click", click), ("conversion", conversion)):
        if not np.isin(labels, (0.0, 1.0)).all():
            raise ValueError(f"{name} labels must be 0 or 1, got {np.unique(labels)[:5]}")
    check_variant(variant)
    if variant == "base":
        return {"p_ctr": click, "p_cvr": np.where(click == 1, conversion, -1.0).astype(np.float32)}
    return {"p_ctr": click, "p_ctcvr": click * conversion}


def compile_esmm(model: keras.Model, config: CompileConfig) -> None:
    """Compile `model` with the loss of its variant and the CTR/CTCVR AUC metrics.

    ESMM and ESMM-NS: w_ctr * BCE(click, p_ctr) + w_ctcvr * BCE(click * conversion, p_ctcvr);
    p_cvr has no loss. BASE: w_ctr * BCE(click, p_ctr) + w_ctcvr * BCE(conversion, p_cvr)
    over clicked impressions only (`binary_crossentropy_clicked`); p_ctcvr has no loss.
    Fit/evaluate it with `y=esmm_targets(click, conversion, model.variant)`. Logged
    names: `loss`, `p_ctr_loss`, `p_ctcvr_loss`, `p_ctr_auc`, `p_ctcvr_auc`, and
    `p_cvr_auc_clicked` (see `EsmmModel`). The compile config is saved with the model, so a
    reloaded model can be evaluated or trained further as is.

    Args:
        model: a model from `build_esmm` (its `variant` picks the loss).
        config: Adam's learning rate, the loss weights w_ctr and w_ctcvr (BASE: of the
            clicked CVR term) and Keras's steps per execution (`train:` in params.yaml).

    Raises:
        TypeError: `model` was not built by `build_esmm`.
        ValueError: a non-positive learning rate, a negative weight, or both weights zero.
    """
    if not isinstance(model, EsmmModel):
        raise TypeError(
            f"compile_esmm needs a model from build_esmm (an EsmmModel), got "
            f"{type(model).__name__}: plain Keras models cannot score ESMM's two-key labels"
        )
    check_compile_config(config)
    # The loss mapping names only p_ctr and p_ctcvr and the labels carry only those keys:
    # on Keras 3.15.1 the compiled loss builds a term per named output and skips p_cvr
    # (multi-output partial mappings have had bugs, keras-team/keras#18959;
    # tests/models/test_esmm_training.py pins the behaviour). The compiled metrics do not
    # accept the partial labels; EsmmModel.compute_metrics works around that.
    check_variant(model.variant)
    base = model.variant == "base"
    second = "p_cvr" if base else "p_ctcvr"
    second_loss = binary_crossentropy_clicked if base else binary_crossentropy_per_row
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss={"p_ctr": binary_crossentropy_per_row, second: second_loss},
        loss_weights={"p_ctr": config.ctr_loss_weight, second: config.ctcvr_loss_weight},
        metrics={
            "p_ctr": [keras.metrics.AUC(name="auc")],
            "p_ctcvr": [keras.metrics.AUC(name="auc")],
        },
        steps_per_execution=config.steps_per_execution,
    )


def _tower(
    user: keras.KerasTensor,
    item: keras.KerasTensor,
    context_row: keras.KerasTensor,
    tower: TowerConfig,
    name: str,
    seed: int,
) -> keras.KerasTensor:
    """An MLP tower from the pooled user (per context) and item (per impression) embeddings
    to a `(batch, 1)` logit; the first layer is a `ContextDense`, the rest plain `Dense`."""
    layer_seeds = _derive_seeds(seed, 2 * len(tower.units) + 1)
    regularizer = keras.regularizers.L2(tower.l2) if tower.l2 > 0 else None
    x = None
    for i, units in enumerate(tower.units):
        # Batch norm sits between the affine map and the activation, and makes the bias
        # redundant.
        options = {
            "activation": None if tower.batch_norm else tower.activation,
            "use_bias": not tower.batch_norm,
            "kernel_initializer": keras.initializers.GlorotUniform(seed=layer_seeds[2 * i]),
            "kernel_regularizer": regularizer,
            "name": f"{name}_dense_{i}",
        }
        if x is None:
            x = ContextDense(units, **options)([user, item, context_row])  # (batch, units)
        else:
            x = keras.layers.Dense(units, **options)(x)  # (batch, units)
        if tower.batch_norm:
            x = keras.layers.BatchNormalization(name=f"{name}_batch_norm_{i}")(x)
            x = keras.layers.Activation(tower.activation, name=f"{name}_activation_{i}")(x)
        if tower.dropout > 0:
            x = keras.layers.Dropout(
                tower.dropout, seed=layer_seeds[2 * i + 1], name=f"{name}_dropout_{i}"
            )(x)
    options = {
        "kernel_initializer": keras.initializers.GlorotUniform(seed=layer_seeds[-1]),
        "kernel_regularizer": regularizer,
        "name": f"{name}_logit",
    }
    if x is None:  # no hidden layer: the logit layer is the first
        return ContextDense(1, **options)([user, item, context_row])  # (batch, 1)
    return keras.layers.Dense(1, **options)(x)  # (batch, 1)


def _derive_seeds(seed: int, n: int) -> list[int]:
    """`n` independent, reproducible seeds for initialisers and dropout, from one seed."""
    state = np.random.SeedSequence(seed).generate_state(n, dtype=np.uint32)
    return [int(s) % (2**31 - 1) for s in state]
