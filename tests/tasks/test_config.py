"""The typed configuration: params.yaml loads, its values are the code defaults, and bad
keys fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.config import CompileConfig
from tasks.config import ConfigError, Params, TrainConfig, load_params

REPO = Path(__file__).resolve().parents[2]


def test_repository_params_load():
    """The committed params.yaml is valid and every section is typed."""
    params = load_params(REPO / "params.yaml")
    assert params.model.ctr_tower.units and params.model.cvr_tower.units
    assert params.train.ctr_loss_weight >= 0 and params.train.ctcvr_loss_weight >= 0


def _differences(shipped: object, code: object, key: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumps, with both values."""
    if isinstance(shipped, dict) and isinstance(code, dict):
        return [
            difference
            for name in sorted(set(shipped) | set(code))
            for difference in _differences(
                shipped.get(name, "<absent>"), code.get(name, "<absent>"), f"{key}.{name}"
            )
        ]
    return [] if shipped == code else [f"{key[1:]}: params.yaml {shipped!r}, code {code!r}"]


def test_code_defaults_are_the_shipped_params():
    """One source of defaults: every key of every section (nested ones too) of the shipped
    params.yaml has the value the code gives it when the key is left out."""
    shipped = load_params(REPO / "params.yaml").model_dump(by_alias=True)
    assert _differences(shipped, Params().model_dump(by_alias=True)) == []


def test_train_section_carries_the_models_compile_settings():
    """The optimiser and loss keys of `train:` are the model's `CompileConfig`, same values."""
    train = TrainConfig(learning_rate=0.01, ctr_loss_weight=0.5, steps_per_execution=3)
    assert train.compile_config == CompileConfig(
        learning_rate=0.01, ctr_loss_weight=0.5, ctcvr_loss_weight=1.0, steps_per_execution=3
    )
    assert TrainConfig().compile_config == CompileConfig()


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
