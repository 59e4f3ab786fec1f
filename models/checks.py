"""Argument checks of the model builder: messages that name the setting and the fix.

Pydantic validates `params.yaml`, but the builder is also called directly (benchmarks, tests,
notebooks), so `models.esmm` checks what it is given before building anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import numpy as np

from models.config import CompileConfig, ModelConfig
from models.features import ALL_FIELDS

VARIANTS = ("esmm", "esmm_ns", "base")  # model.variant, see models.esmm.build_esmm
_PADDING_ID = 0  # models.features: padding is id 0 with weight 0


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"model.variant must be one of {list(VARIANTS)}, got {variant!r}")


def check_compile_config(config: CompileConfig) -> None:
    """Reject compile settings the model cannot use (pydantic checks are bypassable)."""
    if config.learning_rate <= 0:
        raise ValueError(
            f"learning_rate must be > 0 (train.learning_rate), got {config.learning_rate}"
        )
    weights = (config.ctr_loss_weight, config.ctcvr_loss_weight)
    if min(weights) < 0:
        raise ValueError(
            "loss weights must be >= 0 (train.ctr_loss_weight, train.ctcvr_loss_weight), got "
            f"{weights[0]} and {weights[1]}"
        )
    if max(weights) == 0:
        raise ValueError(
            "at least one of train.ctr_loss_weight and train.ctcvr_loss_weight must be > 0"
        )


def check_config(config: ModelConfig) -> None:
    """Reject config values the model cannot use (pydantic checks are bypassable)."""
    check_variant(config.variant)
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


def check_vocabularies(
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
