"""The served ESMM model, as MLflow models-from-code: MLflow runs this file to load it.

`serving.serve.log_serving_model` logs this file (not a pickled object) with the trained
`.keras` file as its artifact; `mlflow.models.set_model` below names the model object. The
request format and its validation live in `serving.serve`.
"""

from __future__ import annotations

import gc
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel, PythonModelContext


class EsmmServingModel(PythonModel):
    """Raw records in (`{"features": {field: [[id, weight], ...]}}`), p_ctr/p_cvr/p_ctcvr out."""

    def load_context(self, context: PythonModelContext) -> None:
        import keras

        import models.esmm  # noqa: F401  (registers the custom layers for loading)
        from serving.serve import KERAS_ARTIFACT

        self.keras_model = keras.models.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        # The process now holds about 650k long-lived objects (TensorFlow, Keras, MLflow).
        # Exempt them from garbage collection, or every full collection that a request's
        # allocations trigger walks them all: measured in process on 2 cores, a request of
        # 100 records took 800 ms before and 144 ms after (benchmarks/serving.py).
        gc.freeze()

    # `model_input` is deliberately unannotated: MLflow would derive a signature from a type
    # hint and change how the scoring server parses requests; the logged signature rules.
    def predict(self, context: PythonModelContext, model_input, params: Any = None) -> Any:
        """One row of probabilities per record; a malformed record is a 400 naming it."""
        from mlflow.exceptions import MlflowException

        from serving.serve import InvalidRecordError, model_input_records, predict_records

        try:
            return predict_records(self.keras_model, model_input_records(model_input))
        except InvalidRecordError as err:
            # INVALID_PARAMETER_VALUE: the scoring server answers 400 with this message.
            raise MlflowException.invalid_parameter_value(str(err)) from None


mlflow.models.set_model(EsmmServingModel())
