"""The ESMM model's configuration: the `model:` section of `params.yaml`, and the optimiser
and loss settings of its `train:` section.

The model owns both: `models.esmm.build_esmm` takes a `ModelConfig`, `models.esmm.compile_esmm`
a `CompileConfig`; `tasks.config.Params` embeds the first and `tasks.config.TrainConfig` carries
the keys of the second. Unknown keys are errors; the defaults here are the shipped values of
`params.yaml` (tests/tasks/test_config.py checks that they stay equal).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TowerConfig(_Section):
    units: list[int] = [128, 64]
    activation: str = "relu"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    batch_norm: bool = False
    l2: float = Field(0.0, ge=0.0)


class ModelConfig(_Section):
    embedding_dim: int = Field(12, gt=0)
    pooling: Literal["mean", "sum"] = "mean"  # how weighted multi-valued fields are pooled
    # pooling of the behaviour lists 109_14, 110_14, 127_14, 150_14; null: `pooling`
    list_pooling: Literal["mean", "sum"] | None = "mean"
    embedding_l2: float = Field(0.0, ge=0.0)  # L2 penalty on every embedding table
    # Feed each tower the dot product of the user's pooled history (weighted mean) with the
    # item's embedding for each cross of the format (109_14 x 206, 110_14 x 207, ...)
    interactions: bool = True
    # Feed each tower the match of the user's interest (history categories 109_14 + profile
    # category 121) with the item category (206): the dot and the element-wise product
    # (embedding_dim + 1 inputs; models.layers.InterestMatch), from a second half of columns
    # of those three fields' tables, which then are 2 * embedding_dim wide
    interest_match: bool = True
    # Feed the towers each field's log1p(weight total) and log1p(entry count), e.g. the
    # history counts the crosses 508/509/702/853 carry, whatever the matched id
    weight_features: bool = True
    # Crosses (508 = 109_14 x 206, 509, 702, 853) whose history and item tables start from
    # a factorisation of their ids' co-occurrence in the training contexts
    # (tasks.cooccurrence); [] starts every table at random
    cooccurrence_init: tuple[Literal["508", "509", "702", "853"], ...] = ("508",)
    cooccurrence_scale: float = Field(0.3, gt=0.0)  # spread of those initial rows
    # ESMM: multiplies the gradient the CVR tower sends into the shared embedding tables
    # (the forward pass is unchanged; 1 = plain backpropagation). The click loss dominates
    # Adam's per-row step size of the shared tables, and the conversion-only effects reach
    # them only through p_ctr * p_cvr. No effect in esmm_ns and base (no shared tables).
    cvr_gradient_scale: float = Field(5.0, gt=0.0)
    ctr_tower: TowerConfig = TowerConfig()
    cvr_tower: TowerConfig = TowerConfig()
    # esmm: shared embeddings, ESMM loss; esmm_ns: each tower its own embeddings, ESMM loss;
    # base: own embeddings, CTR on all impressions and CVR on clicked ones (the paper's BASE).
    variant: Literal["esmm", "esmm_ns", "base"] = "esmm"


class CompileConfig(_Section):
    """What `models.esmm.compile_esmm` needs: Adam's step size, the ESMM loss weights and the
    steps per call into TF. Written in params.yaml as keys of `train:` of the same names."""

    learning_rate: float = Field(0.002, gt=0.0)  # Adam step size
    ctr_loss_weight: float = Field(1.0, ge=0.0)  # w_ctr in the ESMM loss
    ctcvr_loss_weight: float = Field(1.0, ge=0.0)  # w_ctcvr in the ESMM loss (BASE: clicked CVR)
    # Training steps per call into TF (Keras `steps_per_execution`): callbacks, the progress
    # bar and checkpoints run between calls. Changes speed only, never the weights.
    steps_per_execution: int = Field(10, ge=1)
