"""The custom Keras layers of the ESMM model (`models.esmm.build_esmm` wires them).

Each layer is registered serialisable under the package `PACKAGE` (`esmm>EmbeddingBag`,
...), the names saved `.keras` files refer to: they must not change. Shapes use `batch` for
impressions and `n_contexts` for user contexts (see `models.esmm` for the semantics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

PACKAGE = "esmm"  # registered names: esmm>EmbeddingBag, esmm>EsmmModel, ...


@keras.saving.register_keras_serializable(package=PACKAGE)
class EmbeddingBag(keras.layers.Layer):
    """One field's embedding table, looked up and pooled with the entries' weights.

    `sum`: sum_l w_l * E[i_l]. `mean`: sum_l w_l * E[i_l] / max(sum_l w_l, epsilon), which is
    a zero vector when every weight is zero (padding, absent field).

    On TensorFlow the lookup and pooling are one sparse-dense matmul over the nonzero-weight
    entries, W @ E with W the (batch, input_dim) matrix of weights. Its gradient is
    W^T @ dpooled, produced densely; the plain `take` + weighted sum has a gather gradient
    that Adam densifies through an unsorted segment sum over every padded entry, several
    times slower on long behaviour lists (see benchmarks/train.md). Zero-weight entries are
    dropped, so the cost follows the real entries, not the padding.
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
        import tensorflow as tf  # only on the TensorFlow backend (the layer is backend-neutral)

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


@keras.saving.register_keras_serializable(package=PACKAGE)
class ContextDense(keras.layers.Layer):
    """A tower's first Dense layer over [user part per context, item part per impression].

    Equals `Dense(units)` applied to `concat([take(user, context_row), item])`, with one
    `(user_dim + item_dim, units)` kernel, but multiplies the user part once per context:
    `take(user @ K[:user_dim], context_row) + item @ K[user_dim:] + b`. With many
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


@keras.saving.register_keras_serializable(package=PACKAGE)
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


@keras.saving.register_keras_serializable(package=PACKAGE)
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


@keras.saving.register_keras_serializable(package=PACKAGE)
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


@keras.saving.register_keras_serializable(package=PACKAGE)
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


@keras.saving.register_keras_serializable(package=PACKAGE)
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


@keras.saving.register_keras_serializable(package=PACKAGE)
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


@keras.saving.register_keras_serializable(package=PACKAGE)
class Probability(keras.layers.Layer):
    """Turns a tower's `(batch, 1)` logit into a `(batch,)` probability."""

    def call(self, logits: Any) -> Any:
        return ops.sigmoid(ops.squeeze(logits, axis=-1))  # (batch,)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return tuple(input_shape[:-1])


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
