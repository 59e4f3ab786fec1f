"""The functional graph of the ESMM model, wired from the layers of `models.layers`.

`esmm_graph` creates the inputs, the per-field lookups and embedding tables (shared by both
towers, or one per tower), the user x item crosses, the interest match, the two MLP towers
and the three probabilities, always in the same order (it fixes the saved graph and the
weight order). `models.esmm.build_esmm` checks its arguments and wraps this graph in an
`EsmmModel`; the semantics are written down once in `models.esmm`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from models.config import ModelConfig, TowerConfig
from models.features import (
    ALL_FIELDS,
    COMMON_FIELDS,
    CONTEXT_ROW_KEY,
    CROSSES,
    HISTORY_FIELDS,
    INTEREST_FIELDS,
    ids_key,
    wts_key,
)
from models.layers import (
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
_TOWERS = ("ctr", "cvr")  # the two towers, in build order


def esmm_graph(
    config: ModelConfig, vocabularies: Mapping[str, np.ndarray], seed: int
) -> tuple[dict[str, keras.KerasTensor], dict[str, keras.KerasTensor]]:
    """The model's graph for checked arguments (see `models.esmm.build_esmm`).

    Args:
        config: the `model:` section of params.yaml, checked.
        vocabularies: per raw field name, the vocabulary as a checked int64 array.
        seed: base seed; the tables and each tower get their own seeds derived from it.

    Returns:
        The inputs (`ids_F`, `wts_F` of every field, then `context_row`) and the outputs
        `p_ctr`, `p_cvr`, `p_ctcvr`, each `(batch,)`.
    """
    # ESMM's seeds come first and stay as they were; ESMM-NS and BASE add one more table
    # seed per field for the CVR tower's own embeddings.
    ctr_seed, cvr_seed, *embedding_seeds = _derive_seeds(seed, 2 + 2 * len(ALL_FIELDS))
    # The layers are created in this order (it fixes the saved graph and weight order).
    fields = _embeddings(config, vocabularies, embedding_seeds)
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
    return fields.inputs, {"p_ctr": p_ctr, "p_cvr": p_cvr, "p_ctcvr": p_ctcvr}


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
