"""Shared fixtures of the step tests: the small raw data ingested, and a small ESMM trained
on it without interruption (the reference of the training and checkpoint tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.config import ModelConfig, TowerConfig
from tasks.config import IngestConfig, TrainConfig

MODEL = ModelConfig(
    embedding_dim=4,
    ctr_tower=TowerConfig(units=[16]),
    cvr_tower=TowerConfig(units=[16], dropout=0.1),
)
TRAIN = TrainConfig(batch_size=128, epochs=2, learning_rate=0.01, seed=1)


@pytest.fixture(scope="session")
def ingested(small_raw, tmp_path_factory) -> Path:
    """small_raw ingested, 15% of training contexts held out (read-only for tests)."""
    from tasks.ingest import ingest_ali_ccp

    out = tmp_path_factory.mktemp("ingest")
    ingest_ali_ccp(small_raw, out, IngestConfig(valid_fraction=0.15, min_count=1))
    return out


@pytest.fixture(scope="session")
def uninterrupted(ingested, tmp_path_factory) -> tuple[Path, object]:
    """Two epochs of MODEL/TRAIN without interruption: (output folder, TrainResult)."""
    from tasks.train import train_esmm

    out = tmp_path_factory.mktemp("train")
    cfg = TRAIN.model_copy(update={"early_stopping": None, "tensorboard": True})
    return out, train_esmm(ingested, out, MODEL, cfg, verbose=0)
