"""Serving: request records -> model inputs, the MLflow pyfunc served model, batch scoring of raw files."""
