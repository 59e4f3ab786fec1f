"""Fixtures of the model tests: one set of vocabularies, one batch, one uncompiled model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from models.esmm import build_esmm
from tests.models.esmm_data import SMALL_CONFIG, make_batch, make_vocabularies


@pytest.fixture(scope="module")
def vocabularies() -> dict[str, np.ndarray]:
    return make_vocabularies()


@pytest.fixture(scope="module")
def model(vocabularies: dict[str, np.ndarray]) -> keras.Model:
    """One uncompiled model shared by the read-only tests."""
    return build_esmm(SMALL_CONFIG, vocabularies, seed=3)


@pytest.fixture(scope="module")
def batch(vocabularies: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return make_batch(32, vocabularies, seed=1)
