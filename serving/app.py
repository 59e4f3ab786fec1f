"""The scoring server: a FastAPI application, run by uvicorn, answering both request forms.

`esmm serve` runs `create_app` under uvicorn. `POST /invocations` takes either form:

- a candidate request, `{"context": {...}, "candidates": [{...}, ...]}`
  (`serving.candidates`): one user context and its candidates, the user side computed once;
- a record request, `{"dataframe_records": [{"features": {...}}, ...]}` or the same list
  under `"inputs"` (`serving.records`): whole impressions, MLflow's scoring-server form.

The answer is `{"predictions": [{"p_ctr": ..., "p_cvr": ..., "p_ctcvr": ...}, ...],
"model_version": "3"}`, one prediction per candidate or record in order, and the header
`X-Model-Version` names the version too. Errors are `{"error_code": ..., "message": ...}`:
400 for a malformed request (the message names the candidate or record, field, entry and
problem), 413 for a body over `serve.max_body_bytes`, 422 for more than
`serve.max_candidates` candidates or records. `GET /ping` answers 200 once a model is loaded
and `GET /health` says which. The model comes from `serving.follow.ModelSource`: a fixed
model, or whatever an alias points to (`--follow champion`).

MLflow's own `mlflow models serve` still serves the registered model in the record form;
this server adds the candidate form, the limits, the version and following the registry, at
a fraction of the latency (benchmarks/serving.md).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from models.features import OUTPUT_KEYS
from serving.candidates import CANDIDATES_KEY, CONTEXT_KEY, candidates_to_inputs
from serving.follow import LoadedModel, ModelSource
from serving.records import (
    FEATURES_KEY,
    InvalidRecordError,
    model_input_records,
    records_to_inputs,
)

SETTINGS_ENV = "ESMM_SERVE_SETTINGS"  # how `esmm serve` hands settings to each worker
VERSION_HEADER = "X-Model-Version"
RECORD_KEYS = ("dataframe_records", "inputs")
log = logging.getLogger("esmm.serve")


@dataclass(frozen=True)
class ServeSettings:
    """What a server process serves and its request limits (`serve` in params.yaml)."""

    tracking_uri: str
    model_name: str
    model_uri: str | None = None  # a fixed model, or None to follow `follow`
    follow: str | None = None  # an alias to follow, e.g. "champion"
    follow_interval_s: float = 10.0
    max_candidates: int = 2000
    max_body_bytes: int = 16 * 2**20

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        if SETTINGS_ENV not in os.environ:
            raise RuntimeError(f"{SETTINGS_ENV} is not set: start the server with `esmm serve`")
        return cls(**json.loads(os.environ[SETTINGS_ENV]))


class RequestError(Exception):
    """A request the server refuses: an HTTP status and a message for the caller."""

    def __init__(self, status: int, message: str, code: str = "INVALID_PARAMETER_VALUE"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """The server application (uvicorn's `--factory` target; settings from the environment)."""
    settings = settings or ServeSettings.from_env()
    source = ModelSource(
        settings.tracking_uri,
        settings.model_uri,
        settings.model_name,
        follow=settings.follow,
        interval=settings.follow_interval_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loaded = await run_in_threadpool(source.start)  # no connections until it is loaded
        log.info("serving %s (version %s)", loaded.uri, loaded.version or "-")
        yield
        source.stop()

    app = FastAPI(title="ESMM scoring server", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.get("/ping")
    def ping() -> Response:
        return Response(status_code=200 if source.current else 503)

    @app.get("/health")
    def health() -> Response:
        current = source.current
        return _json(
            {
                "status": "ok" if current else "loading",
                "model_uri": current.uri if current else None,
                "model_version": current.version if current else None,
                "follow": settings.follow,
                "follow_interval_s": settings.follow_interval_s if settings.follow else None,
            }
        )

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        try:
            body = await _read_body(request, settings.max_body_bytes)
            loaded = source.current  # once: predictions and version from the same model
            predictions = await run_in_threadpool(_score, loaded, body, settings.max_candidates)
        except RequestError as err:
            return _json({"error_code": err.code, "message": err.message}, err.status)
        return _json(
            {"predictions": predictions, "model_version": loaded.version},
            headers={VERSION_HEADER: loaded.version or "unregistered"},
        )

    return app


def parse_request(payload: Any, max_candidates: int) -> dict[str, np.ndarray]:
    """Model inputs from a decoded request body of either form.

    Raises:
        RequestError: 400 for a malformed request, 422 for too many candidates or records.
    """
    try:
        if not isinstance(payload, Mapping):
            raise InvalidRecordError(f"the request must be a JSON object, {_FORMS}")
        keys = set(payload)
        if keys == {CONTEXT_KEY, CANDIDATES_KEY}:
            _check_count(payload[CANDIDATES_KEY], "candidates", max_candidates)
            return candidates_to_inputs(payload[CONTEXT_KEY], payload[CANDIDATES_KEY])
        if len(keys) == 1 and keys <= set(RECORD_KEYS):
            items = payload[keys.pop()]
            _check_count(items, "records", max_candidates)
            return records_to_inputs(model_input_records(items))
        raise InvalidRecordError(f"the request has the keys {sorted(keys)}; {_FORMS}")
    except InvalidRecordError as err:
        raise RequestError(400, str(err)) from None


def _check_count(items: Any, label: str, limit: int) -> None:
    """A 422 for more candidates (or records) than `limit`; other shapes are checked later."""
    if isinstance(items, list) and len(items) > limit:
        raise RequestError(
            422,
            f"the request holds {len(items)} {label}, more than this server accepts "
            f"({limit}, serve.max_candidates); split it",
            "RESOURCE_LIMIT_EXCEEDED",
        )


_FORMS = (
    f'send either {{"{CONTEXT_KEY}": {{...}}, "{CANDIDATES_KEY}": [{{...}}, ...]}} or '
    f'{{"dataframe_records": [{{"{FEATURES_KEY}": {{...}}}}, ...]}} (docs/serving.md)'
)


def _score(loaded: LoadedModel, body: bytes, max_candidates: int) -> list[dict[str, float]]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as err:
        raise RequestError(400, f"the request body is not valid JSON: {err}") from None
    outputs = loaded.keras_model.predict_batch(parse_request(payload, max_candidates))
    columns = [np.asarray(outputs[k], dtype=np.float64).reshape(-1).tolist() for k in OUTPUT_KEYS]
    return [dict(zip(OUTPUT_KEYS, row, strict=True)) for row in zip(*columns, strict=True)]


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit`."""
    too_large = RequestError(
        413,
        f"the request body is larger than this server accepts ({limit} bytes, "
        "serve.max_body_bytes); send fewer candidates per request",
        "RESOURCE_LIMIT_EXCEEDED",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # orjson writes a non-finite float as null (a weight large enough to overflow pooling).
    return Response(orjson.dumps(payload), status, headers, media_type="application/json")
