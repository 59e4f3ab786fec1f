"""`esmm serve`, `esmm export` and `esmm score`: the commands that use a registered model.

MLflow, TensorFlow, uvicorn and Beam load inside the commands, after the fail-fast checks.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from flows import preflight
from flows.cli_base import PARAMS, _check, _fail, _params, _run, app


@app.command()
def serve(
    model_uri: str = typer.Option(
        None,
        "--model-uri",
        help="Model to serve (default: models:/NAME@champion, NAME = register.model_name).",
    ),
    follow: str = typer.Option(
        None,
        "--follow",
        metavar="ALIAS",
        help="Serve whatever ALIAS (e.g. champion) points to, switching when it moves.",
    ),
    follow_interval: float = typer.Option(
        None,
        "--follow-interval",
        min=0.1,
        help="Seconds between alias lookups (default: serve.follow_interval_s).",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes it to the network."
    ),
    port: int = typer.Option(5001, "--port", help="Port to listen on."),
    workers: int = typer.Option(
        None, "--workers", min=1, help="Server processes (default: serve.workers)."
    ),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
    params: Path = PARAMS,
) -> None:
    """Serve a registered model over HTTP: candidate and record requests (docs/serving.md).

    POST /invocations takes {"context": {...}, "candidates": [...]} (one user, many
    candidates) or {"dataframe_records": [{"features": {...}}, ...]}; every answer names the
    model version. GET /ping, GET /health.
    """
    from tasks.tracking import resolve_tracking_uri

    p = _params(params)
    cfg = p.register_
    if model_uri is not None and follow is not None:
        _fail("give --model-uri or --follow, not both")
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)  # a team stack's server, if set
    if model_uri is None:  # before MLflow (seconds) and a server start
        _check(preflight.require_registry, tracking_uri, cfg.model_name)
        _check(preflight.require_alias, tracking_uri, cfg.model_name, follow or "champion")
    import uvicorn

    from serving.app import SETTINGS_ENV, ServeSettings

    settings = ServeSettings(
        tracking_uri=tracking_uri,
        model_name=cfg.model_name,
        model_uri=None if follow else (model_uri or f"models:/{cfg.model_name}@champion"),
        follow=follow,
        follow_interval_s=follow_interval or p.serve.follow_interval_s,
        max_candidates=p.serve.max_candidates,
        max_body_bytes=p.serve.max_body_bytes,
    )
    os.environ[SETTINGS_ENV] = settings.to_env()  # read by each server process
    if p.serve.tf_threads:  # read when TensorFlow starts its thread pools; a user's own wins
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(p.serve.tf_threads))
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", str(p.serve.tf_threads))
    what = f"{follow} of {cfg.model_name} (followed)" if follow else settings.model_uri
    typer.echo(f"serving {what} on http://{host}:{port}/invocations (Ctrl-C stops it)", err=True)
    uvicorn.run(
        "serving.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers or p.serve.workers,
        access_log=access_log,
        timeout_graceful_shutdown=10,
    )


@app.command()
def export(
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist)."),
    fmt: str = typer.Option(
        "savedmodel", "--format", help="Export format: savedmodel (TensorFlow Serving)."
    ),
    model_uri: str = typer.Option(
        None,
        "--model-uri",
        help="Model to export (default: models:/NAME@champion, NAME = register.model_name).",
    ),
    params: Path = PARAMS,
) -> None:
    """Export a registered model as a TensorFlow SavedModel (for TensorFlow Serving).

    Its `serving_default` signature takes one context and its candidates (docs/serving.md).
    """
    if fmt != "savedmodel":
        _fail(f"unknown --format {fmt!r}: the one export format is savedmodel")
    if out.exists():
        _fail(f"{out} exists: give a new folder to export to")
    from tasks.tracking import mlflow_uris, resolve_tracking_uri

    cfg = _params(params).register_
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    if model_uri is None:
        _check(preflight.require_registry, tracking_uri, cfg.model_name)
        _check(preflight.require_alias, tracking_uri, cfg.model_name, "champion")
    from mlflow.exceptions import MlflowException

    from serving.export import export_saved_model
    from serving.pyfunc import load_keras_model

    uri = model_uri or f"models:/{cfg.model_name}@champion"
    try:
        with mlflow_uris(tracking_uri):
            model = load_keras_model(uri)
    except MlflowException as err:
        _fail(f"cannot load {uri} (tracking URI {tracking_uri}): {err.message}")
    export_saved_model(model, out, source=uri)
    typer.echo(f"exported {uri} as a TensorFlow SavedModel to {out} (signature serving_default)")


@app.command()
def score(
    raw_dir: Path = typer.Argument(
        ..., help="Folder with sample_skeleton_X.csv[.gz] + common_features_X.csv[.gz] pairs."
    ),
    out: Path = typer.Option(Path("predictions.parquet"), "--out", help="Predictions file."),
    model_uri: str = typer.Option(
        None,
        "--model-uri",
        help="Model to score with (default: models:/NAME@champion, NAME = register.model_name).",
    ),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Impressions per model call."),
    max_bad_fraction: float = typer.Option(
        None,
        "--max-bad-fraction",
        min=0.0,
        max=1.0,
        help="Fail when a larger share of impressions cannot be scored "
        "(default: ingest.max_quarantine_fraction).",
    ),
    beam_options: str = typer.Option(
        None,
        "--beam-options",
        help="Score as a Beam pipeline (RunInference) with these flags, e.g. '--runner="
        "PortableRunner --job_endpoint=HOST:PORT --environment_type=EXTERNAL "
        "--environment_config=HOST:PORT' (no --runner: the DirectRunner). See docs/scale.md.",
    ),
    beam_staging: str = typer.Option(
        "",
        "--beam-staging",
        help="With --beam-options: a folder every Beam worker reaches (gs://, s3://, hdfs://, "
        "a shared mount) where the raw files and the model are copied (default: none).",
    ),
    params: Path = PARAMS,
) -> None:
    """Score raw Ali-CCP files in batch: sample_id, labels and p_ctr/p_cvr/p_ctcvr to Parquet.

    Exits 1 when nothing could be scored, or a larger share of impressions than
    --max-bad-fraction (the predictions and the bad-lines list are written either way).
    """
    p = _params(params)
    if not raw_dir.is_dir():  # before MLflow and TensorFlow load (seconds)
        _fail(f"no folder {raw_dir}: give a folder of sample_skeleton_*.csv[.gz] files")
    if not any(raw_dir.glob("sample_skeleton_*.csv*")):
        _fail(
            f"no sample_skeleton_*.csv (or .csv.gz) in {raw_dir}: scoring reads raw Ali-CCP "
            "skeleton files, each with its common_features_*.csv"
        )
    from tasks.tracking import mlflow_uris, resolve_tracking_uri

    cfg = p.register_
    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)  # a team stack's server, if set
    if model_uri is None:
        _check(preflight.require_registry, tracking_uri, cfg.model_name)
    from mlflow.exceptions import MlflowException

    from serving.pyfunc import load_keras_model
    from serving.score import score_raw
    from tasks.champion import CHAMPION

    uri = model_uri or f"models:/{cfg.model_name}@{CHAMPION}"
    if model_uri is None:
        _check(preflight.require_alias, tracking_uri, cfg.model_name, "champion")
    try:
        with mlflow_uris(tracking_uri):
            model = load_keras_model(uri)
    except MlflowException as err:
        _fail(f"cannot load {uri} (tracking URI {tracking_uri}): {err.message}")
    if beam_options is None:
        report = _run(lambda: score_raw(raw_dir, out, model, batch_size=batch_size))
    else:
        report = _run(
            lambda: _beam_score(raw_dir, out, model, beam_options, beam_staging, batch_size)
        )
    typer.echo(report.summary())
    limit = p.ingest.max_quarantine_fraction if max_bad_fraction is None else max_bad_fraction
    _check(
        preflight.check_scored, report.rows_scored, report.rows_read, limit, report.bad_lines_path
    )


def _beam_score(raw_dir: Path, out: Path, model, options: str, staging: str, batch_size: int):
    """`esmm score --beam-options`: the loaded model saved as a file the workers load."""
    import shlex
    import tempfile

    from serving.beam_score import score_raw_beam

    with tempfile.TemporaryDirectory(prefix="esmm-score-") as tmp:
        model_path = Path(tmp) / "model.keras"
        model.save(model_path)
        return score_raw_beam(
            raw_dir,
            out,
            model_path,
            shlex.split(options),
            staging=staging,
            batch_size=batch_size,
        )
