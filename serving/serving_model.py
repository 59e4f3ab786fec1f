"""The served ESMM model, as MLflow models-from-code: MLflow runs this file to load it.

`serving.pyfunc.log_serving_model` logs this file (not a pickled object) with the trained
`.keras` file as its artifact; `mlflow.models.set_model` below names the model object. The
request format and its validation live in `serving.records`.
"""

from __future__ import annotations

import gc
from typing import Any

import keras
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel, PythonModelContext

import models.esmm  # noqa: F401  (registers the custom layers for loading)
from serving.pyfunc import KERAS_ARTIFACT
from serving.records import InvalidRecordError, model_input_records, predict_records


class EsmmServingModel(PythonModel):
    """Raw records in (`{"features": {field: [[id, weight], ...]}}`), p_ctr/p_cvr/p_ctcvr out."""

    def load_context(self, context: PythonModelContext) -> None:
        self.keras_model = keras.models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        # The process now holds hundreds of thousands of long-lived objects (TensorFlow,
        # Keras, MLflow). Exempt them from garbage collection, or every full collection that
        # a request's allocations trigger walks them all, which made requests several times
        # slower (see benchmarks/serving.md).
        gc.freeze()

    # `model_input` is deliberately unannotated: MLflow would derive a signature from a type
    # hint and change how the scoring server parses requests; the logged signature rules.
    def predict(self, context: PythonModelContext, model_input, params: Any = None) -> Any:
        """One row of probabilities per record; a malformed record is a 400 naming it."""
        try:
            return predict_records(self.keras_model, model_input_records(model_input))
        except InvalidRecordError as err:
            # INVALID_PARAMETER_VALUE: the scoring server answers 400 with this message.
            raise MlflowException.invalid_parameter_value(str(err)) from None


mlflow.models.set_model(EsmmServingModel())
