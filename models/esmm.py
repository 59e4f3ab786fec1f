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

This module owns the model (`EsmmModel`, which stores its variant), its losses,
`build_esmm`, `compile_esmm`, the targets and `per_impression_inputs`; the graph `build_esmm`
wraps is wired in `models.graph`, the layers are in `models.layers`, the checks of the
arguments in `models.checks`, the configuration in `models.config`. No file reading, no
orchestration: callers pass the vocabularies in and own all I/O.
"""

from __future__ import annotations

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
from models.config import CompileConfig, ModelConfig
from models.features import CONTEXT_ROW_KEY, SKELETON_FIELDS, ids_key

# models.graph imports the layers, so importing this module registers every custom object
# a saved `.keras` file names (the layers, and the model and losses below).
from models.graph import esmm_graph
from models.layers import PACKAGE

_LOG_FLOOR = 1e-30  # smallest probability the loss takes the log of (float32 safe)
_MAX_PROBABILITY = 1.0 - 1e-7  # largest p in log(1 - p): 1 - p underflows above it


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
    inputs, outputs = esmm_graph(config, vocab_arrays, seed)
    return EsmmModel(inputs=inputs, outputs=outputs, name="esmm", variant=config.variant)


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
