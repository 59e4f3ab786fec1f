"""The served MLflow pyfunc model: its signature, logging it, loading it back, serving it.

The served model is MLflow models-from-code: `serving/serving_model.py` (the file MLflow
runs to load it) wraps the trained `.keras` file, which is logged as its artifact; requests
are records in the format of `serving.records` (`mlflow models serve` serves it so; `esmm
serve` loads the same model into its own server, `serving.app`). MLflow is imported inside
the functions that need it: importing MLflow takes seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models.features import ALL_FIELDS, OUTPUT_KEYS
from serving.records import EXAMPLE_RECORD, FEATURES_KEY

KERAS_ARTIFACT = "keras_model"  # the logged model's artifact key of the `.keras` file
SERVING_MODEL_CODE = Path(__file__).with_name("serving_model.py")
# What the logged model needs to be loaded again; pinned like requirements.lock (the serving
# code also imports pandas, pyarrow, pydantic and yaml through tasks/ and models/).
SERVING_REQUIREMENTS = [
    "mlflow==3.17.2",
    "tensorflow==2.16.2",
    "keras==3.15.1",
    "numpy==1.26.4",
    "pandas==1.5.3",
    "pyarrow==10.0.1",
    "pydantic==2.14.4",
    "pyyaml==6.0.4",
]


def serving_signature() -> Any:
    """Input: a `features` object whose optional properties are the 23 fields; output: the
    three probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Object, Property, Schema

    features = Object([Property(f, AnyType(), required=False) for f in ALL_FIELDS])
    return ModelSignature(
        inputs=Schema([ColSpec(features, name=FEATURES_KEY)]),
        outputs=Schema([ColSpec("double", name=k) for k in OUTPUT_KEYS]),
    )


def log_serving_model(
    model_path: Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Log a trained `.keras` model as the served pyfunc model (MLflow models-from-code).

    The model's code is `serving/serving_model.py` (not a pickle); the `.keras` file is its
    artifact (`artifacts/model.keras` in the logged model, so `**/*.keras` finds it), and the
    `models/`, `tasks/`, `aliccp/` and `serving/` packages ship with it, so it loads
    without this project installed. Call it inside an active MLflow run.

    Args:
        model_path: the trained model (`artifacts/train/model.keras`).
        name: the logged model's name within the run.
        registered_model_name: also register it under this name (a new version).
        **kwargs: passed on to `mlflow.pyfunc.log_model` (e.g. `input_example`).

    Returns:
        MLflow's `ModelInfo` (`model_uri`, `registered_model_version`, ...).
    """
    import mlflow

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"trained model not found: {model_path}")
    repo = Path(__file__).resolve().parents[1]
    options: dict[str, Any] = {
        "signature": serving_signature(),
        "input_example": [{FEATURES_KEY: EXAMPLE_RECORD}],
        "pip_requirements": SERVING_REQUIREMENTS,
        "code_paths": [str(repo / pkg) for pkg in ("models", "tasks", "aliccp", "serving")],
        **kwargs,
    }
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(SERVING_MODEL_CODE),
        artifacts={KERAS_ARTIFACT: str(model_path)},
        registered_model_name=registered_model_name,
        **options,
    )


def load_keras_model(model_uri: str) -> Any:
    """The Keras model inside a served pyfunc model (e.g. `models:/esmm@champion`)."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().keras_model
