"""The project's one typed configuration, loaded from `params.yaml`.

Each pipeline step reads its own section. Unknown or mistyped keys fail loudly with the
key's dotted path, never fall back to a default. Loading has no side effects. The code
defaults are the shipped values of `params.yaml` (tests/tasks/test_config.py); the model's
own settings are defined in `models.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from models.config import CompileConfig, ModelConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PathsConfig(_Section):
    raw_dir: str = "data"  # raw Ali-CCP files, tracked by data.dvc
    artifacts_dir: str = "artifacts"  # every stage output lives here, outside data/


class SynthConfig(_Section):
    train: int = Field(500_000, gt=0)  # impressions in the train split
    test: int = Field(100_000, gt=0)  # impressions in the test split
    seed: int = 2018
    profile: Literal["default", "realistic"] = "default"  # a aliccp.synth.PROFILES name


class IngestConfig(_Section):
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # of train contexts, by hash of the key
    min_count: int = Field(2, ge=1)  # ids seen fewer times in train map to the OOV bucket
    # bytes of raw text parsed per chunk (peak memory a multiple of it: benchmarks/ingest.md)
    chunk_bytes: int = Field(16 << 20, gt=0)
    workers: int = Field(0, ge=0)  # parsing threads; 0 = one per core
    max_quarantine_fraction: float = Field(0.01, ge=0.0, le=1.0)  # fail above this share
    # Training data = the train files of this many most recent data versions (1 = the
    # latest batch only); the test split is always the latest version's.
    window: int = Field(1, ge=1)


class ComparatorConfig(_Section):
    """One feature's thresholds; a key left out keeps the section default, null turns it off."""

    jensen_shannon: float | None = Field(None, gt=0.0, le=1.0)
    infinity_norm: float | None = Field(None, gt=0.0, le=1.0)


class DriftConfig(_Section):
    """TFDV comparator thresholds for every feature (labels excepted), with overrides."""

    jensen_shannon: float | None = Field(0.1, gt=0.0, le=1.0)  # id features
    # Weights (wts_F), on TFDV's quantile histograms: set between the distance of two samples
    # of one distribution of counts and that of a change of unit (counts to log counts, or
    # doubled); see benchmarks/foreign.md.
    weight_jensen_shannon: float | None = Field(0.25, gt=0.0, le=1.0)
    infinity_norm: float | None = Field(0.1, gt=0.0, le=1.0)  # id features only
    features: dict[str, ComparatorConfig] = {}  # per-feature overrides, e.g. {ids_301: {...}}
    # Compare only when both sides have this many rows: on small samples both measures are
    # dominated by sampling noise (too few rows is noted in the report, not an anomaly).
    min_examples: int = Field(5000, ge=1)

    def thresholds(self, feature: str) -> tuple[float | None, float | None]:
        """(Jensen-Shannon, L-infinity) thresholds of one feature; None = not checked."""
        override = self.features.get(feature)
        set_keys = override.model_fields_set if override else set()
        default = self.weight_jensen_shannon if feature.startswith("wts_") else self.jensen_shannon
        return (
            override.jensen_shannon if "jensen_shannon" in set_keys else default,
            override.infinity_norm if "infinity_norm" in set_keys else self.infinity_norm,
        )


class LabelDriftConfig(_Section):
    """Largest relative change of a label rate from the previous data version (checked when
    both versions have at least `drift.min_examples` impressions)."""

    max_ctr_change: float | None = Field(0.2, gt=0.0)  # |CTR_new / CTR_old - 1|
    max_cvr_change: float | None = Field(0.3, gt=0.0)  # conversion rate given click


class ValidateConfig(_Section):
    schema_dir: str = "schema"  # impressions.pbtxt and common.pbtxt; inferred when absent
    beam_runner: str = "DirectRunner"
    # Extra Beam flags (Flink, Spark, Dataflow...); the default is one worker process per core.
    beam_options: list[str] = ["--direct_running_mode=multi_processing", "--direct_num_workers=0"]
    # A folder on a filesystem every Beam worker reaches (gs://, s3://, hdfs://, a shared
    # mount): inputs are copied there and statistics written there. Empty: this machine's paths
    beam_staging: str = ""
    # `esmm schema infer`: id fields with at most this many distinct values get a bound on it
    max_domain_size: int = Field(100, gt=0)
    # ... and their training values as a domain (off: synthetic ids depend on the seed)
    value_domains: bool = False
    drift: DriftConfig = DriftConfig()  # new training data against the previous data version
    skew: DriftConfig = DriftConfig()  # test split against the training split
    label_drift: LabelDriftConfig = LabelDriftConfig()


class EarlyStoppingConfig(_Section):
    # a Keras log name: val_p_ctr_auc, val_p_ctcvr_auc, val_loss, ... The default is the
    # densest ranking metric: on realistic-profile data val_loss kept falling into an
    # over-fit second epoch whose validation CTR AUC had dropped (see benchmarks/quality.md)
    monitor: str = "val_p_ctr_auc"
    patience: int = Field(1, ge=0)  # epochs without improvement before stopping
    mode: Literal["auto", "min", "max"] = "auto"  # auto: max for *auc*, min otherwise
    min_delta: float = Field(0.0, ge=0.0)
    restore_best_weights: bool = True


# The optimiser and loss keys are the model's (`CompileConfig`): defined there once, written
# flat under `train:` and in this order (run fingerprints hash the dump).
_COMPILE = CompileConfig.model_fields


class TrainConfig(_Section):
    batch_size: int = Field(1024, gt=0)
    epochs: int = Field(2, gt=0)
    learning_rate: float = _COMPILE["learning_rate"]
    ctr_loss_weight: float = _COMPILE["ctr_loss_weight"]
    ctcvr_loss_weight: float = _COMPILE["ctcvr_loss_weight"]
    seed: int = 42  # builds the model's initial weights and orders the batches
    early_stopping: EarlyStoppingConfig | None = EarlyStoppingConfig()  # null: no stopping
    checkpoint_every_steps: int = Field(0, ge=0)  # 0: checkpoint at the end of each epoch only
    steps_per_execution: int = _COMPILE["steps_per_execution"]
    resume: bool = True  # resume from a checkpoint of the same config and data, if any
    tensorboard: bool = False  # TensorBoard logs under <train dir>/tensorboard
    deterministic: bool = True  # tf op determinism: same seed, same weights
    # After training, shift each tower's logit bias so that on the validation split the mean
    # p_ctr is the click rate and the mean p_ctcvr the conversion rate (rankings unchanged)
    recalibrate: bool = True
    # none: one process, TF's own threads; mirrored: tf.distribute.MirroredStrategy over this
    # machine's devices (its GPUs), each replica fed whole per-context batches; multi_worker:
    # tf.distribute.MultiWorkerMirroredStrategy over worker processes (docs/scale.md)
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    # multi_worker without TF_CONFIG: host:port of every worker, the chief first; each is
    # started with `esmm train --worker-index N`
    workers: list[str] = []
    # none: a random start; champion: start from the registry's champion, its vocabularies
    # grown by today's ids (tasks/warm_start.py, docs/nightly.md)
    warm_start: Literal["none", "champion"] = "none"
    # with warm_start: drop ids absent from this many consecutive nights' vocabularies (0: never)
    warm_start_retire_after: int = Field(0, ge=0)

    @property
    def compile_config(self) -> CompileConfig:
        """This section's optimiser and loss settings, as `models.esmm.compile_esmm` takes them."""
        return CompileConfig(**{key: getattr(self, key) for key in CompileConfig.model_fields})


GateableMetric = Literal[
    "ctr_auc",
    "ctcvr_auc",
    "cvr_auc_clicked",
    "ctr_gauc",
    "ctcvr_gauc",
    "cvr_gauc_clicked",
    "ctr_logloss",
    "ctcvr_logloss",
    "cvr_logloss_clicked",
]


class EvaluateConfig(_Section):
    # Gate floors: the candidate is refused when a metric is below its floor.
    min_ctr_auc: float = Field(0.55, ge=0.0, le=1.0)
    min_ctcvr_auc: float = Field(0.55, ge=0.0, le=1.0)
    min_cvr_auc_clicked: float = Field(0.5, ge=0.0, le=1.0)
    # No regression against the champion (scored on the same test split) by more than this;
    # AUCs and GAUCs must not drop, loglosses must not rise, beyond the tolerance.
    max_regression: dict[GateableMetric, Annotated[float, Field(ge=0.0)]] = {
        "ctr_auc": 0.005,
        "ctcvr_auc": 0.005,
        "cvr_auc_clicked": 0.01,
    }
    reliability_bins: int = Field(10, ge=2)  # quantile bins of the reliability diagrams
    position_min_impressions: int = Field(1000, ge=1)  # rarer positions pooled as "other"


class RegisterConfig(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "esmm"
    model_name: str = "esmm"
    # What `esmm register` (the dvc.yaml stage) does with a model that passed the gate:
    # never: `challenger` only (experiments never move `champion`); gate: also `champion`.
    # The retraining flow promotes on the gate itself (flows/retrain.py).
    promote: Literal["gate", "never"] = "never"


class ScheduleConfig(_Section):
    cron: str = "0 2 * * *"  # when the retraining deployment runs (nightly at 02:00)
    timezone: str = "UTC"
    deployment: str = "nightly"  # deployment name: esmm-retrain/<deployment>
    host: str = "127.0.0.1"  # where `esmm schedule` starts a server when PREFECT_API_URL is unset
    port: int = Field(4200, gt=0, lt=65536)


class ServeConfig(_Section):
    # A candidate request's candidates, or a record request's records; more is a 422.
    max_candidates: int = Field(2000, ge=1)
    max_body_bytes: int = Field(16 * 2**20, ge=1024)  # a larger request body is a 413
    # `esmm serve --follow ALIAS`: how often the alias is looked up in the registry; a move
    # is served within this (plus the new model's load time, seconds).
    follow_interval_s: float = Field(10.0, gt=0, le=3600)
    workers: int = Field(1, ge=1)  # server processes, each with its own copy of the model
    # TensorFlow threads per op and between ops in a server process (0: TF's default, one per
    # core). 1 serves many concurrent clients faster, one client slower (benchmarks/serving.md).
    tf_threads: int = Field(0, ge=0)


# Named presets (`preset: paper` at the top of params.yaml): values applied under the
# file's own keys, so a key written in params.yaml overrides the preset's value.
_PAPER_TOWER = {"units": [360, 200, 80], "activation": "relu"}
PRESETS: dict[str, dict] = {
    # ESMM paper (Ma et al. 2018, section 4.2): embedding size 18, towers 360-200-80 with
    # ReLU, Adam (the only optimiser here), equal loss weights.
    "paper": {
        "model": {"embedding_dim": 18, "ctr_tower": _PAPER_TOWER, "cvr_tower": _PAPER_TOWER},
        "train": {"ctr_loss_weight": 1.0, "ctcvr_loss_weight": 1.0},
    },
}


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_preset(raw: dict) -> dict:
    """`raw` params with its named `preset` filled in under the explicit keys.

    Raises:
        ValueError: the preset name is not one of `PRESETS`.
    """
    name = raw.get("preset")
    if name is None:
        return raw
    if name not in PRESETS:
        raise ValueError(f"preset: unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    explicit = {k: ({} if v is None else v) for k, v in raw.items()}
    return _deep_merge(PRESETS[name], explicit)


class Params(_Section):
    preset: str | None = None  # a PRESETS name, applied under the explicit keys
    paths: PathsConfig = PathsConfig()
    synth: SynthConfig = SynthConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    schedule: ScheduleConfig = ScheduleConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: object) -> object:
        return apply_preset(data) if isinstance(data, dict) else data

    @field_validator("*", mode="before")
    @classmethod
    def _none_is_default(cls, value: object, info: ValidationInfo) -> object:
        if info.field_name == "preset":
            return value
        # An empty section in YAML (`train:`) means "all defaults".
        return {} if value is None else value


class ConfigError(ValueError):
    """A params file that cannot be used, with the offending keys named."""


def monitor_names(variant: str) -> list[str]:
    """The names Keras logs for a model variant, which `train.early_stopping.monitor` may name."""
    second = "p_cvr" if variant == "base" else "p_ctcvr"
    names = ["loss", "p_ctr_loss", f"{second}_loss", "p_ctr_auc", "p_ctcvr_auc"]
    names.append("p_cvr_auc_clicked")
    return names + [f"val_{name}" for name in names]


def _yaml(path: Path) -> object:
    """The parsed file; broken YAML is a ConfigError naming the file, line and problem."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix that line") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Load and validate `params.yaml`.

    Raises:
        ConfigError: the file is missing, is not YAML or not a mapping, has unknown or invalid
            keys (each named by its dotted path), or an early-stopping metric Keras never logs.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    raw = _yaml(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if raw.get("preset") is not None and raw["preset"] not in PRESETS:
        raise ConfigError(
            f"{path}: preset: unknown preset {raw['preset']!r}; known presets: {sorted(PRESETS)}"
        )
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            reason = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
            problems.append(f"  {key}: {reason}")
        raise ConfigError(f"{path}: invalid parameters\n" + "\n".join(problems)) from None
    stop = params.train.early_stopping
    if stop is not None and stop.monitor not in monitor_names(params.model.variant):
        raise ConfigError(
            f"{path}: train.early_stopping.monitor: {stop.monitor!r} is not a metric training "
            f"logs; use one of {', '.join(monitor_names(params.model.variant))}"
        )
    return params
