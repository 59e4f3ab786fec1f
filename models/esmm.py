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
- Ablations of the paper (`model.variant`): `esmm_ns` gives each tower its own embedding
  tables (two per field) with the same loss; `base` also has separate tables and trains
  the CTR tower with BCE(click, p_ctr) on all impressions and the CVR tower with
  BCE(conversion, p_cvr) on clicked impressions only; p_ctcvr = p_ctr * p_cvr is formed
  from the two. All variants have the same inputs and the same three outputs.
- CTR and CTCVR AUC are measured on all impressions; CVR AUC only on clicked ones
  (`p_cvr_auc_clicked`). The compiled AUCs are Keras' thresholded approximations, for
  monitoring training; gate decisions belong to the evaluation step.

No file reading, no orchestration: callers pass the vocabularies in and own all I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from models.config import ModelConfig, TowerConfig
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

_PACKAGE = "esmm"
_NUM_OOV_INDICES = 1  # index 0 of every lookup is the bucket for ids outside the vocabulary
_PADDING_ID = 0  # models.features: padding is id 0 with weight 0
_LOG_FLOOR = 1e-30  # smallest probability the loss takes the log of (float32 safe)
_MAX_PROBABILITY = 1.0 - 1e-7  # largest p in log(1 - p): 1 - p underflows above it
VARIANTS = ("esmm", "esmm_ns", "base")  # model.variant, see build_esmm


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EmbeddingBag(keras.layers.Layer):
    """One field's embedding table, looked up and pooled with the entries' weights.

    `sum`: sum_l w_l * E[i_l]. `mean`: sum_l w_l * E[i_l] / max(sum_l w_l, epsilon), which is
    a zero vector when every weight is zero (padding, absent field).

    On TensorFlow the lookup and pooling are one sparse-dense matmul over the nonzero-weight
    entries, W @ E with W the (batch, input_dim) matrix of weights. Its gradient is
    W^T @ dpooled, produced densely; the plain `take` + weighted sum has a gather gradient
    that Adam densifies through an unsorted segment sum over every padded entry (measured
    on 2 CPU cores: 17 ms vs 2.8 ms forward + backward for one field of 1024 x 200
    entries; 2.3x the whole model's training throughput with 100-200 behaviour entries).
    Zero-weight entries are dropped, so the cost follows the real entries, not the padding.
    Other backends use the plain formulation; both give the same values.

    Call args:
        inputs: `[indices, weights]`, both `(batch, length)`: row indices into the table
            (already mapped by the field's IntegerLookup) and their weights.

    Returns:
        `(batch, output_dim)` pooled embeddings.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        pooling: str = "mean",
        embeddings_initializer: Any = "uniform",
        epsilon: float = 1e-8,
        embeddings_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if input_dim <= 0 or output_dim <= 0:
            raise ValueError(
                f"EmbeddingBag needs input_dim > 0 and output_dim > 0, got {input_dim} and "
                f"{output_dim}"
            )
        if pooling not in ("mean", "sum"):
            raise ValueError(f"EmbeddingBag pooling must be 'mean' or 'sum', got {pooling!r}")
        if epsilon <= 0:
            raise ValueError(f"EmbeddingBag epsilon must be > 0, got {epsilon}")
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.pooling = pooling
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self.epsilon = epsilon
        self.embeddings_regularizer = keras.regularizers.get(embeddings_regularizer)
        self.supports_jit = False  # the sparse path has no XLA kernel

    def build(self, input_shape: Sequence[tuple]) -> None:
        self.embeddings = self.add_weight(
            shape=(self.input_dim, self.output_dim),
            initializer=self.embeddings_initializer,
            regularizer=self.embeddings_regularizer,
            name="embeddings",
        )

    def call(self, inputs: Sequence[Any]) -> Any:
        indices, weights = inputs
        weights = ops.cast(weights, self.embeddings.dtype)
        if keras.backend.backend() == "tensorflow":
            pooled = self._weighted_sum_sparse(indices, weights)
        else:
            pooled = self._weighted_sum_dense(indices, weights)
        if self.pooling == "sum":
            return pooled
        return _weighted_mean(pooled, weights, self.epsilon)  # (batch, output_dim)

    def _weighted_sum_dense(self, indices: Any, weights: Any) -> Any:
        embedded = ops.take(self.embeddings, ops.cast(indices, "int32"), axis=0)
        # (batch, length, output_dim) -> (batch, output_dim)
        return ops.sum(embedded * ops.expand_dims(weights, -1), axis=1)

    def _weighted_sum_sparse(self, indices: Any, weights: Any) -> Any:
        import tensorflow as tf

        indices = tf.cast(indices, tf.int64)
        keep = tf.not_equal(weights, 0.0)  # (batch, length); padding drops out here
        rows = tf.where(keep)[:, 0]  # (nnz,), row-major order as sparse matmul prefers
        matrix = tf.SparseTensor(
            indices=tf.stack([rows, tf.boolean_mask(indices, keep)], axis=1),  # (nnz, 2)
            values=tf.boolean_mask(weights, keep),  # (nnz,)
            dense_shape=tf.stack([tf.shape(weights, out_type=tf.int64)[0], self.input_dim]),
        )  # (batch, input_dim); a repeated id in a row is summed, as in the dense form
        return tf.sparse.sparse_dense_matmul(matrix, self.embeddings)  # (batch, output_dim)

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        indices_shape, _ = input_shape
        return (indices_shape[0], self.output_dim)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "pooling": self.pooling,
            "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            "epsilon": self.epsilon,
            "embeddings_regularizer": keras.regularizers.serialize(self.embeddings_regularizer),
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ContextDense(keras.layers.Layer):
    """A tower's first Dense layer over [user part per context, item part per impression].

    Equals `Dense(units)` applied to `concat([take(user, context_row), item])`, with one
    `(user_dim + item_dim, units)` kernel, but multiplies the user part once per context:
    `take(user @ K[:user_dim], context_row) + item @ K[user_dim:] + b`. With ~15-25
    impressions per context that removes most of the first layer's work on the user side.

    Call args:
        inputs: `[user, item, context_row]`: `(n_contexts, user_dim)`,
            `(batch, item_dim)` and `(batch,)` int row of each impression's context
            (-1: the impression's own row, when user fields come per impression).

    Returns:
        `(batch, units)`.
    """

    def __init__(
        self,
        units: int,
        activation: Any = None,
        use_bias: bool = True,
        kernel_initializer: Any = "glorot_uniform",
        kernel_regularizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.units = units
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)

    def build(self, input_shape: Sequence[tuple]) -> None:
        user_shape, item_shape, _ = input_shape
        self.user_dim = int(user_shape[-1])
        self.kernel = self.add_weight(
            shape=(self.user_dim + int(item_shape[-1]), self.units),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            name="kernel",
        )
        self.bias = (
            self.add_weight(shape=(self.units,), initializer="zeros", name="bias")
            if self.use_bias
            else None
        )

    def call(self, inputs: Sequence[Any]) -> Any:
        user, item, context_row = inputs
        per_context = ops.matmul(user, self.kernel[: self.user_dim])  # (n_contexts, units)
        # -1: the impression's own row (user fields given per impression)
        x = ops.take(per_context, _context_rows(context_row), axis=0)  # (batch, units)
        x = x + ops.matmul(item, self.kernel[self.user_dim :])  # (batch, units)
        if self.bias is not None:
            x = x + self.bias
        return self.activation(x)

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        return (input_shape[1][0], self.units)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "units": self.units,
            "activation": keras.activations.serialize(self.activation),
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": keras.regularizers.serialize(self.kernel_regularizer),
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class UserItemDot(keras.layers.Layer):
    """Dot products of the user's history fields (weighted means) with the item's fields.

    For each user x item pair (the format's crosses, e.g. history categories 109_14 x item
    category 206), `<mean_h, e>`: the weighted mean of the history field's embeddings
    against the item field's pooled embedding, i.e. the mean over the history entries of an
    FM-style inner product. A tower's MLP only approximates such a bilinear match of two
    embeddings; here it gets it directly, per impression, for the price of one dot of
    `embedding_dim` per pair.

    Call args:
        inputs: `[histories, items, context_row]`: lists (one per pair) of
            `(n_contexts, dim)` history means and `(batch, dim)` item embeddings, and
            `(batch,)` int rows as in `ContextDense`.

    Returns:
        `(batch, pairs)`.
    """

    def call(self, inputs: Sequence[Any]) -> Any:
        histories, items, context_row = inputs
        # (batch, pairs, dim) each: one gather of all histories' rows
        user = ops.take(ops.stack(histories, axis=1), _context_rows(context_row), axis=0)
        return ops.sum(user * ops.stack(items, axis=1), axis=-1)  # (batch, pairs)

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple:
        return (input_shape[1][0][0], len(input_shape[0]))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ColumnSplit(keras.layers.Layer):
    """`(rows, 2 * size)` -> the first `size` columns and the rest."""

    def __init__(self, size: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.size = int(size)

    def call(self, inputs: Any) -> tuple[Any, Any]:
        return inputs[:, : self.size], inputs[:, self.size :]

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple:
        rest = None if input_shape[-1] is None else input_shape[-1] - self.size
        return (input_shape[0], self.size), (input_shape[0], rest)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "size": self.size}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class InterestMatch(keras.layers.Layer):
    """The user's interest vector against the item's: their dot and element-wise product.

    Call args:
        inputs: `[user, item, context_row]`: `(n_contexts, dim)` interest vectors,
            `(batch, dim)` item vectors and `(batch,)` int rows as in `ContextDense`.

    Returns:
        `(batch, dim + 1)`: the dot, then the `dim` products.
    """

    def call(self, inputs: Sequence[Any]) -> Any:
        user, item, context_row = inputs
        product = ops.take(user, _context_rows(context_row), axis=0) * item
        return ops.concatenate([ops.sum(product, axis=-1, keepdims=True), product], axis=-1)

    def compute_output_shape(self, input_shape: Sequence[Any]) -> tuple:
        return (input_shape[1][0], input_shape[1][-1] + 1)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GradientScale(keras.layers.Layer):
    """The identity forward; backward, the incoming gradient times `factor`.

    Put between the shared embeddings and one task's tower, it sets how strongly that task
    moves the shared tables without changing the model, its loss or the tower's own
    updates (the balancing of task gradients on shared parameters of MetaBalance, He et
    al., WWW 2022, with a fixed factor).
    """

    def __init__(self, factor: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, inputs: Any) -> Any:
        factor = self.factor

        @ops.custom_gradient
        def scaled(x: Any) -> Any:
            def grad(*args: Any, upstream: Any = None) -> Any:
                if upstream is None:  # the TensorFlow backend passes it positionally
                    (upstream,) = args
                return ops.multiply(upstream, factor)

            return ops.multiply(x, 1.0), grad  # x * 1.0: exactly x, as a new tensor

        return scaled(inputs)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WeightStats(keras.layers.Layer):
    """A field's weights -> `[log1p(sum of weights), log1p(number of entries)]` per row.

    The format's crosses (508, 509, 702, 853) carry the user's history count of the item's
    category, shop, brand or node as the entry's weight: "how much has this user engaged
    with what this item is". A weighted embedding sum gives it to the towers only through
    the matched id's own embedding, which a rare shop or brand has barely learnt; these
    two numbers give every field's amount of signal to the towers whatever its ids.

    Call args:
        inputs: `(rows, length)` weights (0: padding).

    Returns:
        `(rows, 2)` float32.
    """

    def call(self, weights: Any) -> Any:
        weights = ops.cast(weights, "float32")
        total = ops.sum(ops.maximum(weights, 0.0), axis=1, keepdims=True)
        count = ops.sum(ops.cast(ops.not_equal(weights, 0.0), "float32"), axis=1, keepdims=True)
        return ops.log1p(ops.concatenate([total, count], axis=-1))

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], 2)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class WeightedMean(keras.layers.Layer):
    """A summed bag and its weights -> the weighted mean (a zero vector for zero weights)."""

    def __init__(self, epsilon: float = 1e-8, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, inputs: Sequence[Any]) -> Any:
        pooled, weights = inputs  # (rows, dim), (rows, length)
        return _weighted_mean(pooled, ops.cast(weights, pooled.dtype), self.epsilon)

    def compute_output_shape(self, input_shape: Sequence[tuple]) -> tuple:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}


def _weighted_mean(pooled: Any, weights: Any, epsilon: float) -> Any:
    """`(rows, dim)` weighted sums and their `(rows, length)` weights -> weighted means."""
    total = ops.sum(weights, axis=1, keepdims=True)  # (rows, 1)
    return pooled / ops.maximum(total, epsilon)


def _context_rows(context_row: Any) -> Any:
    """`context_row` with -1 ("the impression's own row") replaced by the row's index."""
    context_row = ops.cast(context_row, "int32")
    # Unlike arange(n) passed in, -1 survives Keras slicing and shuffling into batches.
    own = ops.arange(ops.shape(context_row)[0], dtype="int32")
    return ops.where(context_row < 0, own, context_row)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Probability(keras.layers.Layer):
    """Turns a tower's `(batch, 1)` logit into a `(batch,)` probability."""

    def call(self, logits: Any) -> Any:
        return ops.sigmoid(ops.squeeze(logits, axis=-1))  # (batch,)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape[:-1])


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EsmmModel(keras.Model):
    """The functional ESMM graph (built by `build_esmm`) plus ESMM-aware metric updates.

    ESMM labels only two of its three outputs (`esmm_targets` has no `p_cvr` key), but the
    compiled metrics of Keras 3.15.1 index the labels by every output name of a dict-output
    model and fail with `KeyError: 'p_cvr'` (`CompileMetrics._flatten_y`), although the
    compiled loss accepts the partial mapping. `compute_metrics` therefore scores only the
    labelled outputs, and adds `p_cvr_auc_clicked`: the AUC of p_cvr over clicked rows
    only, using the click label as sample weight and click * conversion, which equals
    conversion on clicked rows, as the label.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # (*args, **kwargs) keeps the model revivable as a Functional from its config.
        super().__init__(*args, **kwargs)
        self.cvr_auc_clicked = keras.metrics.AUC(name="p_cvr_auc_clicked")
        self._predict_any_shape = None

    def predict_batch(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The outputs on one batch of raw inputs (`ids_F`, `wts_F`, `context_row`), as
        numpy arrays.

        Keras's `predict_on_batch` traces again for each new combination of list widths
        until TF has relaxed the shapes one input at a time: dozens of traces over a test
        split (4.0 s against 1.1 s to score 100k impressions the first time). This is
        traced once, for any batch size and list widths.
        """
        if self._predict_any_shape is None:
            import tensorflow as tf

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
        if "p_ctr" in y and "p_cvr" in y and "p_ctcvr" not in y:
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
        import tensorflow as tf

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


@keras.saving.register_keras_serializable(package=_PACKAGE)
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


@keras.saving.register_keras_serializable(package=_PACKAGE)
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
) -> keras.Model:
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
        A functional `keras.Model` taking a dict with `ids_F` (int64) and `wts_F` (float32)
        for every field `F`, `(n_contexts, None)` for user-side fields and `(batch, None)`
        for the others, and `context_row` (int32, `(batch,)`), and returning a dict with
        `p_ctr`, `p_cvr`, `p_ctcvr`, each float32 of shape `(batch,)`.

    Raises:
        ValueError: a bad config value or a missing, unknown or malformed vocabulary; the
            message names the field or key to fix.
    """
    _check_config(config)
    vocab_arrays = _check_vocabularies(vocabularies)
    n_fields = len(ALL_FIELDS)
    # ESMM's seeds come first and stay as they were; ESMM-NS and BASE add one more table
    # seed per field for the CVR tower's own embeddings.
    ctr_seed, cvr_seed, *embedding_seeds = _derive_seeds(seed, 2 + 2 * n_fields)
    separate = config.variant != "esmm"

    inputs: dict[str, keras.KerasTensor] = {}
    # user (per context) and item (per impression) pooled fields, per tower
    bags: dict[str, dict[str, keras.KerasTensor]] = {"ctr": {}, "cvr": {}}  # pooled fields
    interest_bags: dict[str, dict[str, keras.KerasTensor]] = {"ctr": {}, "cvr": {}}
    for i, field in enumerate(ALL_FIELDS):
        ids = keras.Input(shape=(None,), dtype="int64", name=ids_key(field))
        weights = keras.Input(shape=(None,), dtype="float32", name=wts_key(field))
        inputs[ids_key(field)] = ids
        inputs[wts_key(field)] = weights

        lookup = keras.layers.IntegerLookup(
            vocabulary=vocab_arrays[field],
            num_oov_indices=_NUM_OOV_INDICES,
            name=f"lookup_{field}",
        )
        rows = lookup(ids)  # (rows, length) raw ids -> (rows, length) table rows
        tables = (("ctr", "cvr"),) if not separate else (("ctr",), ("cvr",))
        # model.interest_match: the interest fields' tables have a second half of columns
        wide = config.interest_match and field in INTEREST_FIELDS
        for j, towers in enumerate(tables):
            embedding = EmbeddingBag(
                input_dim=len(vocab_arrays[field]) + _NUM_OOV_INDICES,
                output_dim=config.embedding_dim * (2 if wide else 1),
                pooling=(
                    config.list_pooling
                    if field in HISTORY_FIELDS and config.list_pooling
                    else config.pooling
                ),
                embeddings_initializer=keras.initializers.RandomUniform(
                    -0.05, 0.05, seed=embedding_seeds[i + j * n_fields]
                ),
                name=f"embedding_{field}" if not separate else f"{towers[0]}_embedding_{field}",
                embeddings_regularizer=(
                    keras.regularizers.L2(config.embedding_l2) if config.embedding_l2 else None
                ),
            )
            bag = embedding([rows, weights])  # (rows, embedding_dim), or twice as wide
            interest_bag = None
            if wide:
                bag, interest_bag = ColumnSplit(
                    config.embedding_dim,
                    name=f"split_{field}" if not separate else f"{towers[0]}_split_{field}",
                )(bag)
            for tower in towers:
                bags[tower][field] = bag
                if interest_bag is not None:
                    interest_bags[tower][field] = interest_bag
    context_row = keras.Input(shape=(), dtype="int32", name=CONTEXT_ROW_KEY)
    inputs[CONTEXT_ROW_KEY] = context_row

    # Per tower: user fields (n_contexts, 13 * dim) and item fields (batch, 10 * dim),
    # in ALL_FIELDS order. In ESMM both towers read the same tensors.
    # With `weight_features`, each side also gets its fields' log1p weight total and entry
    # count (user fields: (n_contexts, 13 * dim + 26); item fields: (batch, 10 * dim + 20)).
    stats = (
        {f: WeightStats(name=f"weight_stats_{f}")(inputs[wts_key(f)]) for f in ALL_FIELDS}
        if config.weight_features
        else {}
    )
    towers = {}
    for tower in ("ctr", "cvr") if separate else ("ctr",):
        prefix = f"{tower}_" if separate else "shared_"
        sides = []
        for is_user, side in ((True, "user"), (False, "item")):
            fields = [f for f in ALL_FIELDS if (f in COMMON_FIELDS) == is_user]
            part = keras.layers.Concatenate(axis=-1, name=f"{prefix}{side}_embeddings")(
                [bags[tower][f] for f in fields]
            )
            if stats:
                part = keras.layers.Concatenate(axis=-1, name=f"{prefix}{side}_with_stats")(
                    [part] + [stats[f] for f in fields]
                )
            sides.append(part)
        towers[tower] = tuple(sides)
    if config.interactions:
        # Per tower (once in ESMM, shared): the user x item dots of the format's crosses,
        # joining the item (per impression) part of the tower's input.
        list_pooling = config.list_pooling or config.pooling
        for tower in towers:
            histories = [bags[tower][history] for history in HISTORY_FIELDS]
            if list_pooling == "sum":  # the dots take the lists' weighted means
                histories = [
                    WeightedMean(name=f"{tower}_mean_{history}")([bag, inputs[wts_key(history)]])
                    for bag, history in zip(histories, HISTORY_FIELDS, strict=True)
                ]
            dots = UserItemDot(name=f"{tower}_user_item_dots" if separate else "user_item_dots")(
                [histories, [bags[tower][item] for _, item in CROSSES.values()], context_row]
            )  # (batch, len(CROSSES))
            user, item = towers[tower]
            name = f"{tower}_item_inputs" if separate else "shared_item_inputs"
            item = keras.layers.Concatenate(axis=-1, name=name)([item, dots])
            towers[tower] = (user, item)
    if config.interest_match:
        # Per tower (once in ESMM, shared): history categories + profile category against
        # the item category, from the second halves of those fields' tables.
        history, profile, category = INTEREST_FIELDS
        summed = (config.list_pooling or config.pooling) == "sum"
        for tower in towers:
            own = interest_bags[tower]
            prefix = f"{tower}_" if separate else ""
            history_mean = own[history]
            if summed:  # the interest takes the history's weighted mean, as the dots do
                history_mean = WeightedMean(name=f"{prefix}interest_mean_{history}")(
                    [history_mean, inputs[wts_key(history)]]
                )
            user_interest = keras.layers.Add(name=f"{prefix}user_interest")(
                [history_mean, own[profile]]
            )
            match = InterestMatch(name=f"{prefix}interest_match")(
                [user_interest, own[category], context_row]
            )
            user, item = towers[tower]
            name = f"{tower}_item_with_interest" if separate else "shared_item_with_interest"
            towers[tower] = (user, keras.layers.Concatenate(axis=-1, name=name)([item, match]))
    if not separate:
        towers["cvr"] = towers["ctr"]
        if config.cvr_gradient_scale != 1.0:  # the CVR tower's pull on the shared tables
            towers["cvr"] = tuple(
                GradientScale(config.cvr_gradient_scale, name=f"cvr_gradient_scale_{side}")(x)
                for side, x in zip(("user", "item"), towers["ctr"], strict=True)
            )

    ctr_logit = _tower(*towers["ctr"], context_row, config.ctr_tower, "ctr", ctr_seed)
    cvr_logit = _tower(*towers["cvr"], context_row, config.cvr_tower, "cvr", cvr_seed)
    p_ctr = Probability(name="p_ctr")(ctr_logit)
    p_cvr = Probability(name="p_cvr")(cvr_logit)
    # CTCVR = CTR * CVR: in ESMM the only path by which the CVR tower learns.
    p_ctcvr = keras.layers.Multiply(name="p_ctcvr")([p_ctr, p_cvr])  # (batch,)

    return EsmmModel(
        inputs=inputs,
        outputs={"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctcvr},
        name="esmm",
    )


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
    _check_variant(variant)
    if variant == "base":
        return {"p_ctr": click, "p_cvr": np.where(click == 1, conversion, -1.0).astype(np.float32)}
    return {"p_ctr": click, "p_ctcvr": click * conversion}


def compile_esmm(
    model: keras.Model,
    *,
    learning_rate: float,
    ctr_loss_weight: float,
    ctcvr_loss_weight: float,
    variant: str = "esmm",
    steps_per_execution: int = 1,
) -> None:
    """Compile `model` with the loss of its variant and the CTR/CTCVR AUC metrics.

    ESMM and ESMM-NS: w_ctr * BCE(click, p_ctr) + w_ctcvr * BCE(click * conversion, p_ctcvr);
    p_cvr has no loss. BASE: w_ctr * BCE(click, p_ctr) + w_ctcvr * BCE(conversion, p_cvr)
    over clicked impressions only (`binary_crossentropy_clicked`); p_ctcvr has no loss.
    Fit/evaluate it with `y=esmm_targets(click, conversion, variant)`. Logged
    names: `loss`, `p_ctr_loss`, `p_ctcvr_loss`, `p_ctr_auc`, `p_ctcvr_auc`, and
    `p_cvr_auc_clicked` (see `EsmmModel`). The compile config is saved with the model, so a
    reloaded model can be evaluated or trained further as is.

    Args:
        model: a model from `build_esmm`.
        learning_rate: Adam step size.
        ctr_loss_weight: weight w_ctr of the CTR term.
        ctcvr_loss_weight: weight w_ctcvr of the CTCVR term (BASE: of the clicked CVR term).
        variant: `model.variant` the model was built with (`esmm`, `esmm_ns`, `base`).
        steps_per_execution: training steps per call into TF (Keras's setting).

    Raises:
        TypeError: `model` was not built by `build_esmm`.
        ValueError: a non-positive learning rate, a negative weight, or both weights zero.
    """
    if not isinstance(model, EsmmModel):
        raise TypeError(
            f"compile_esmm needs a model from build_esmm (an EsmmModel), got "
            f"{type(model).__name__}: plain Keras models cannot score ESMM's two-key labels"
        )
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0 (train.learning_rate), got {learning_rate}")
    if ctr_loss_weight < 0 or ctcvr_loss_weight < 0:
        raise ValueError(
            "loss weights must be >= 0 (train.ctr_loss_weight, train.ctcvr_loss_weight), got "
            f"{ctr_loss_weight} and {ctcvr_loss_weight}"
        )
    if ctr_loss_weight == 0 and ctcvr_loss_weight == 0:
        raise ValueError(
            "at least one of train.ctr_loss_weight and train.ctcvr_loss_weight must be > 0"
        )
    # The loss mapping names only p_ctr and p_ctcvr and the labels carry only those keys:
    # on Keras 3.15.1 the compiled loss builds a term per named output and skips p_cvr
    # (multi-output partial mappings have had bugs, keras-team/keras#18959;
    # tests/models/test_esmm.py pins the behaviour). The compiled metrics do not accept
    # the partial labels; EsmmModel.compute_metrics works around that.
    _check_variant(variant)
    second = "p_cvr" if variant == "base" else "p_ctcvr"
    second_loss = binary_crossentropy_clicked if variant == "base" else binary_crossentropy_per_row
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss={"p_ctr": binary_crossentropy_per_row, second: second_loss},
        loss_weights={"p_ctr": ctr_loss_weight, second: ctcvr_loss_weight},
        metrics={
            "p_ctr": [keras.metrics.AUC(name="auc")],
            "p_ctcvr": [keras.metrics.AUC(name="auc")],
        },
        steps_per_execution=steps_per_execution,
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


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"model.variant must be one of {list(VARIANTS)}, got {variant!r}")


def _check_config(config: ModelConfig) -> None:
    """Reject config values the model cannot use (pydantic checks are bypassable)."""
    _check_variant(config.variant)
    if config.embedding_dim <= 0:
        raise ValueError(f"model.embedding_dim must be > 0, got {config.embedding_dim}")
    if config.pooling not in ("mean", "sum"):
        raise ValueError(f"model.pooling must be 'mean' or 'sum', got {config.pooling!r}")
    for key, tower in (
        ("model.ctr_tower", config.ctr_tower),
        ("model.cvr_tower", config.cvr_tower),
    ):
        bad_units = [u for u in tower.units if u <= 0]
        if bad_units:
            raise ValueError(f"{key}.units must all be > 0, got {list(tower.units)}")
        if not 0 <= tower.dropout < 1:
            raise ValueError(f"{key}.dropout must be in [0, 1), got {tower.dropout}")
        if tower.l2 < 0:
            raise ValueError(f"{key}.l2 must be >= 0, got {tower.l2}")
        try:
            keras.activations.get(tower.activation)
        except ValueError:
            raise ValueError(
                f"{key}.activation {tower.activation!r} is not a Keras activation name "
                "(e.g. 'relu', 'gelu', 'tanh')"
            ) from None


def _check_vocabularies(
    vocabularies: Mapping[str, Sequence[int] | np.ndarray],
) -> dict[str, np.ndarray]:
    """Per field, the vocabulary as a 1-D int64 array of unique ids, or a ValueError."""
    missing = [f for f in ALL_FIELDS if f not in vocabularies]
    if missing:
        hint = ""
        if any(str(k).startswith(("ids_", "wts_")) for k in vocabularies):
            hint = " (key vocabularies by raw field name, e.g. '205', not 'ids_205')"
        raise ValueError(f"vocabularies has no entry for fields {missing}{hint}")
    unknown = sorted(set(vocabularies) - set(ALL_FIELDS))
    if unknown:
        raise ValueError(
            f"vocabularies has entries for unknown fields {unknown}; expected only the fields "
            "of models.features.ALL_FIELDS"
        )
    arrays = {}
    for field in ALL_FIELDS:
        vocab = np.asarray(vocabularies[field])
        if vocab.size == 0:
            # IntegerLookup refuses an empty vocabulary. The padding id stands in for it:
            # padding always has weight 0, so every real id of the field still lands in
            # the OOV bucket and the field behaves as "all unknown".
            vocab = np.array([_PADDING_ID], dtype=np.int64)
        if vocab.ndim != 1 or not np.issubdtype(vocab.dtype, np.integer):
            raise ValueError(
                f"vocabulary of field {field!r} must be a 1-D sequence of integer ids, got "
                f"dtype {vocab.dtype} and shape {vocab.shape}"
            )
        vocab = vocab.astype(np.int64)
        if len(np.unique(vocab)) != len(vocab):
            raise ValueError(f"vocabulary of field {field!r} has duplicate ids; deduplicate it")
        if (vocab < 0).any():
            raise ValueError(
                f"vocabulary of field {field!r} has negative ids; raw Ali-CCP ids are >= 0 "
                "and -1 is the lookup's OOV token"
            )
        arrays[field] = vocab
    return arrays
