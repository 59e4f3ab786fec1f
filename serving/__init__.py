"""Serving: `records` (request records -> model inputs), `pyfunc` (the served MLflow pyfunc
model; `serving_model.py` is the file MLflow runs to load it) and `score` (batch scoring of
raw files)."""
