"""Named presets in params.yaml (`preset: paper`): filled in under the file's explicit keys."""

from __future__ import annotations

import pytest

from tasks.config import PRESETS, ConfigError, Params, load_params


def test_paper_preset_is_the_papers_model(tmp_path):
    """`preset: paper` alone gives embedding 18, towers 360-200-80 ReLU, equal loss weights."""
    path = tmp_path / "params.yaml"
    path.write_text("preset: paper\n")
    params = load_params(path)

    assert params.preset == "paper"
    assert params.model.embedding_dim == 18
    for tower in (params.model.ctr_tower, params.model.cvr_tower):
        assert tower.units == [360, 200, 80]
        assert tower.activation == "relu"
    assert params.train.ctr_loss_weight == params.train.ctcvr_loss_weight == 1.0


def test_explicit_keys_override_the_preset_and_the_rest_is_kept(tmp_path):
    """A key in params.yaml wins over the preset; sibling keys keep the preset's values."""
    path = tmp_path / "params.yaml"
    path.write_text(
        "preset: paper\nmodel:\n  embedding_dim: 8\n  cvr_tower:\n    units: [16]\n"
        "train:\n  epochs: 1\n"
    )
    params = load_params(path)

    assert params.model.embedding_dim == 8
    assert params.model.cvr_tower.units == [16]
    assert params.model.cvr_tower.activation == "relu"
    assert params.model.ctr_tower.units == [360, 200, 80]
    assert params.train.epochs == 1


def test_unknown_preset_is_a_config_error_naming_the_known_ones(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("preset: papre\n")
    with pytest.raises(ConfigError, match=r"preset: unknown preset 'papre'.*\['paper'\]"):
        load_params(path)
    with pytest.raises(ValueError, match="unknown preset"):
        Params.model_validate({"preset": "papre"})


def test_no_preset_changes_nothing(tmp_path):
    """Without a preset (or `preset: null`) the defaults apply, and presets are valid params."""
    path = tmp_path / "params.yaml"
    path.write_text("preset:\nmodel:\n  embedding_dim: 8\n")
    assert load_params(path).model == Params(model={"embedding_dim": 8}).model
    for name in PRESETS:
        Params.model_validate({"preset": name})
