"""The served model and how it changes: load a registered model, and follow an alias.

`ModelSource` holds the model a server answers with, as one immutable `LoadedModel` (URI,
registry version, Keras model). A request reads it once, so its predictions and the version
it reports always come from one model. With an alias to follow (`esmm serve --follow
champion`) a background thread looks the alias up every `interval` seconds; when it has
moved, the new version is loaded and warmed up beside the old one, then swapped in with one
assignment: requests in flight finish on the old model, later ones get the new, and none
fails or mixes the two. A registry that cannot be reached keeps the current model serving
(the failure is logged and the lookup retried).
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass
from typing import Any

from models.features import COMMON_FIELDS
from serving.candidates import candidates_to_inputs
from serving.records import EXAMPLE_RECORD, records_to_inputs

log = logging.getLogger("esmm.serve")


@dataclass(frozen=True)
class LoadedModel:
    """One loaded model: what was asked for, the registry version it is, and the model."""

    uri: str  # the URI loaded, pinned to a version where there is one (models:/esmm/3)
    version: str | None  # the registry version; None for a model outside the registry
    keras_model: Any


def registry_uri(model_name: str, alias: str) -> str:
    """`models:/NAME@ALIAS`."""
    return f"models:/{model_name}@{alias}"


def resolve_alias(tracking_uri: str, model_name: str, alias: str) -> str:
    """The version `alias` points to now."""
    from tasks.tracking import mlflow_client  # MLflow: seconds to import

    return str(mlflow_client(tracking_uri).get_model_version_by_alias(model_name, alias).version)


def load_model(model_uri: str, version: str | None, tracking_uri: str) -> LoadedModel:
    """Load a served pyfunc model's Keras model and trace its prediction once.

    The pyfunc model is loaded by MLflow (`mlflow.pyfunc.load_model`, the registered
    model's own code and `.keras` artifact); it is warmed up on the example record in both
    request forms, so the first real request does not pay for tracing.
    """
    from serving.pyfunc import load_keras_model  # MLflow: seconds to import
    from tasks.tracking import mlflow_uris

    with mlflow_uris(tracking_uri):
        keras_model = load_keras_model(model_uri)
    keras_model.predict_batch(records_to_inputs([EXAMPLE_RECORD]))
    context = {f: v for f, v in EXAMPLE_RECORD.items() if f in COMMON_FIELDS}
    items = {f: v for f, v in EXAMPLE_RECORD.items() if f not in COMMON_FIELDS}
    keras_model.predict_batch(candidates_to_inputs(context, [items, items]))
    return LoadedModel(model_uri, version, keras_model)


class ModelSource:
    """The model a server answers with, following a registry alias if asked to.

    Args:
        tracking_uri: the MLflow tracking/registry URI.
        model_uri: a fixed model to serve (any MLflow model URI); None with `follow`.
        model_name: the registered model whose alias is followed.
        follow: the alias to follow (e.g. `champion`), or None to serve `model_uri` only.
        interval: seconds between lookups of the alias.
    """

    def __init__(
        self,
        tracking_uri: str,
        model_uri: str | None,
        model_name: str,
        follow: str | None = None,
        interval: float = 10.0,
    ) -> None:
        if (model_uri is None) == (follow is None):
            raise ValueError("serve either a fixed model_uri or follow an alias, not both")
        self.tracking_uri = tracking_uri
        self.model_uri = model_uri
        self.model_name = model_name
        self.follow = follow
        self.interval = interval
        self.current: LoadedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> LoadedModel:
        """Load the model to serve now and, when following, start watching the alias."""
        if self.follow is None:
            version = _pinned_version(self.model_uri, self.model_name, self.tracking_uri)
            uri = self.model_uri if version is None else f"models:/{self.model_name}/{version}"
            self._swap(load_model(uri, version, self.tracking_uri))
        else:
            self.refresh()
            self._thread = threading.Thread(target=self._watch, name="follow", daemon=True)
            self._thread.start()
        return self.current

    def refresh(self) -> bool:
        """Look the alias up; load and swap in the version it points to if it moved."""
        version = resolve_alias(self.tracking_uri, self.model_name, self.follow)
        if self.current is not None and self.current.version == version:
            return False
        uri = f"models:/{self.model_name}/{version}"  # pinned: the alias may move meanwhile
        loaded = load_model(uri, version, self.tracking_uri)
        previous = self.current.version if self.current else None
        self._swap(loaded)
        log.info(
            "serving %s version %s (%s was %s)",
            self.model_name,
            version,
            self.follow,
            previous or "not loaded",
        )
        return True

    def stop(self) -> None:
        """Stop following (the current model keeps serving until the process ends)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001  (a registry outage must not stop serving)
                log.exception("following %s@%s failed; retrying", self.model_name, self.follow)

    def _swap(self, loaded: LoadedModel) -> None:
        self.current = loaded  # one assignment: a request sees the old model or the new
        # Loading allocates hundreds of thousands of long-lived objects (the pyfunc loader
        # freezes the collector's view of them). Let the old model's go, then exempt the
        # survivors from collection again, or every full collection walks them all and
        # requests get several times slower (benchmarks/serving.md).
        gc.unfreeze()
        gc.collect()
        gc.freeze()


def _pinned_version(model_uri: str, model_name: str, tracking_uri: str) -> str | None:
    """The registry version a fixed URI names: `models:/N/3` is 3, `models:/N@a` is looked up."""
    prefix = f"models:/{model_name}"
    if model_uri.startswith(prefix + "@"):
        return resolve_alias(tracking_uri, model_name, model_uri[len(prefix) + 1 :])
    if model_uri.startswith(prefix + "/") and model_uri[len(prefix) + 1 :].isdigit():
        return model_uri[len(prefix) + 1 :]
    return None
