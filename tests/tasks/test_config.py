"""The typed configuration: params.yaml loads, and bad keys fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError, load_params

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_load():
    """The committed params.yaml is valid and every section is typed."""
    params = load_params(REPO / "params.yaml")
    assert params.model.ctr_tower.units and params.model.cvr_tower.units
    assert params.train.ctr_loss_weight >= 0 and params.train.ctcvr_loss_weight >= 0


def test_mistyped_key_is_named(tmp_path):
    """A typo is an error naming the dotted key, not a silent default."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch: unknown key"):
        load_params(path)


def test_wrong_type_is_named(tmp_path):
    """A value of the wrong type names its key."""
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  ctr_tower:\n    units: [64, wide]\n")
    with pytest.raises(ConfigError, match=r"model\.ctr_tower\.units\.1"):
        load_params(path)


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"trian: unknown key"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_empty_section_means_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\nmodel:\n  embedding_dim: 8\n")
    params = load_params(path)
    assert params.train.epochs == type(params.train)().epochs
    assert params.model.embedding_dim == 8
