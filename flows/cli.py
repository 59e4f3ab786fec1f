"""`esmm`: the command line. One subcommand per pipeline step (the `dvc.yaml` stages), the
Prefect retraining flow, the data generator and data versioning.

Heavy imports (TensorFlow, TFDV, MLflow, Prefect) happen inside the commands that need them,
so `esmm --help` and light commands start fast.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import typer

from tasks.config import ConfigError, Params, load_params

app = typer.Typer(
    help="ESMM conversion-rate pipeline on Ali-CCP-format data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Raw-data versioning with DVC.", no_args_is_help=True)
app.add_typer(data_app, name="data")
schema_app = typer.Typer(help="The committed TFDV schemas (schema/*.pbtxt).", no_args_is_help=True)
app.add_typer(schema_app, name="schema")

PARAMS = typer.Option(
    Path("params.yaml"), "--params", "-p", help="Parameters file (one section per step)."
)


def _params(path: Path) -> Params:
    try:
        return load_params(path)
    except ConfigError as err:
        _fail(str(err))


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors that carry a message for the user rather than a traceback."""
    from tasks.data import DataVersionError
    from tasks.ingest import IngestError
    from tasks.validate import DataValidationError

    return (ConfigError, IngestError, DataValidationError, DataVersionError, FileNotFoundError)


@app.command()
def synth(
    out: Path = typer.Option(None, "--out", help="Output folder [default: paths.raw_dir]."),
    train: int = typer.Option(None, "--train", help="Train impressions [default: synth.train]."),
    test: int = typer.Option(None, "--test", help="Test impressions [default: synth.test]."),
    seed: int = typer.Option(None, "--seed", help="Random seed [default: synth.seed]."),
    profile: str = typer.Option(
        None, "--profile", help="Data profile: default or realistic [default: synth.profile]."
    ),
    defect_rate: float = typer.Option(
        0.0,
        "--defect-rate",
        min=0.0,
        max=1.0,
        help="Share of lines written with a defect, listed in defects.csv [default: 0].",
    ),
    defects: str = typer.Option(
        None,
        "--defects",
        help="Comma-separated defect kinds (e.g. truncated,empty,crlf) [default: every "
        "defect kind, not crlf].",
    ),
    params: Path = PARAMS,
) -> None:
    """Generate seeded Ali-CCP-format raw data with ground truth and oracle AUCs."""
    from tasks.synth import synthesize_ali_ccp

    p = _params(params)
    try:
        summary = synthesize_ali_ccp(
            out or Path(p.paths.raw_dir),
            train or p.synth.train,
            test or p.synth.test,
            p.synth.seed if seed is None else seed,
            profile=profile or p.synth.profile,
            defect_rate=defect_rate,
            defects=defects,
        )
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"wrote {summary.out_dir}")
    for split, auc in summary.oracle.items():
        if isinstance(auc, dict):
            typer.echo(
                f"  oracle {split}: "
                + ", ".join(
                    f"{k} {'n/a' if v is None else f'{v:.4f}'}"
                    for k, v in auc.items()
                    if k.endswith("auc") or k.endswith("clicked")
                )
            )
    if summary.defects:
        typer.echo(
            f"  defects.csv: {sum(summary.defects.values()):,} lines ("
            + ", ".join(f"{k} {n:,}" for k, n in sorted(summary.defects.items()))
            + ")"
        )


@data_app.command("pull")
def data_pull(params: Path = PARAMS) -> None:
    """Make the raw data named by data.dvc present: as is, `dvc pull`, or regenerated."""
    from tasks.data import ensure_raw_data

    p = _params(params)
    raw_dir = Path(p.paths.raw_dir)
    raw = _run(lambda: ensure_raw_data(Path.cwd(), raw_dir, p.synth))
    origin = {
        "workspace": "already present",
        "remote": "pulled from the DVC remote",
        "generator": f"regenerated with the seeded generator (synth: {p.synth.train:,}/{p.synth.test:,}, seed {p.synth.seed})",
    }[raw.source]
    typer.echo(f"raw data {raw_dir}/ at data version {raw.version}: {origin}")


@data_app.command("add")
def data_add(
    source: Path = typer.Argument(
        ..., help="Folder with the four raw files (plain or .gz) or the two archives."
    ),
    link: bool = typer.Option(False, "--link", help="Hard-link the files instead of copying them."),
    params: Path = PARAMS,
) -> None:
    """Version a new raw batch: it replaces paths.raw_dir, `dvc add`, and is pushed to the remote."""
    from tasks.data import add_raw_data

    p = _params(params)
    raw = _run(lambda: add_raw_data(Path.cwd(), Path(p.paths.raw_dir), source, link=link))
    typer.echo(f"{p.paths.raw_dir}/ is now data version {raw.version}")
    typer.echo(
        f"record it in git: git add {p.paths.raw_dir}.dvc && git commit -m 'data: new raw batch'"
    )


def _propose_schemas(params: Path) -> tuple[Path, Path, dict[str, str]]:
    """Infer schemas from the ingested training split and save them under
    <artifacts>/validate/proposed; returns (the committed schema dir, that folder, the texts)."""
    from tasks.layout import Layout
    from tasks.validate import propose_schemas, write_schemas

    p = _params(params)
    proposed_dir = Layout.from_config(p.paths).validate_dir / "proposed"
    proposed = propose_schemas(Layout.from_config(p.paths).ingest_dir, proposed_dir, p.validate_)
    write_schemas(proposed_dir, proposed)
    return Path(p.validate_.schema_dir), proposed_dir, proposed


@schema_app.command("infer")
def schema_infer(params: Path = PARAMS) -> None:
    """Propose schemas from the ingested training split and show the diff to the committed ones."""
    from tasks.validate import schema_diff

    schema_dir, proposed_dir, proposed = _propose_schemas(params)
    typer.echo(schema_diff(schema_dir, proposed) or "the proposed schemas equal the committed ones")
    typer.echo(f"proposed schemas: {proposed_dir}; accept them with `esmm schema update`")


@schema_app.command("update")
def schema_update(params: Path = PARAMS) -> None:
    """Accept a deliberate change: write the proposed schemas over schema_dir, showing the diff."""
    from tasks.validate import schema_diff, write_schemas

    schema_dir, _, proposed = _propose_schemas(params)
    typer.echo(schema_diff(schema_dir, proposed) or "no change")
    write_schemas(schema_dir, proposed)
    typer.echo(f"wrote {schema_dir}/; review and commit it")


@app.command()
def ingest(params: Path = PARAMS) -> None:
    """Parse raw files into split Parquet tables, vocabularies and a quarantine report."""
    from tasks import steps

    report = _run(lambda: steps.ingest(_params(params)))
    typer.echo(report.summary())


@app.command()
def validate(params: Path = PARAMS) -> None:
    """TFDV statistics and schema checks; exits non-zero on anomalies, naming each feature."""
    from tasks import steps

    typer.echo(_run(lambda: steps.validate(_params(params))).summary())


@app.command()
def train(
    params: Path = PARAMS,
    resume: bool = typer.Option(
        True,
        "--resume/--no-resume",
        help="Continue from the checkpoint of an interrupted run with the same config and "
        "data, if there is one; --no-resume starts over.",
    ),
) -> None:
    """Train ESMM on the ingested train split (early stopping on the validation split)."""
    from tasks import steps

    result = _run(lambda: steps.train(_params(params), resume=None if resume else False))
    if result.resumed_from is not None:
        epoch, step = result.resumed_from
        typer.echo(f"resumed from the checkpoint at epoch {epoch + 1}, step {step}")
    typer.echo(f"saved {result.model_path} after {result.epochs_run} epochs")


@app.command()
def evaluate(params: Path = PARAMS) -> None:
    """Masked AUCs and loglosses on the test split; writes metrics.json with the gate verdict."""
    from tasks import steps
    from tasks.evaluate import format_metrics

    evaluation = _run(lambda: steps.evaluate(_params(params)))
    typer.echo(format_metrics(evaluation.metrics, evaluation.oracle))
    typer.echo(
        "gate: "
        + (
            "passed"
            if evaluation.verdict.passed
            else "FAILED\n  " + "\n  ".join(evaluation.verdict.reasons)
        )
    )


@app.command()
def register(params: Path = PARAMS) -> None:
    """Register the evaluated model in MLflow: `challenger`, and `champion` if the gate passed."""
    from tasks import steps

    reg = _run(lambda: steps.register(_params(params)))
    typer.echo(
        f"registered {reg.model_name} version {reg.version} ({', '.join(reg.aliases)}), data version {reg.data_version}"
    )


@app.command()
def retrain(params: Path = PARAMS) -> None:
    """Run the Prefect retraining flow end to end and print its summary."""
    _params(params)  # a bad params file fails here, before Prefect starts
    from flows.retrain import retrain as retrain_flow

    summary = _run(lambda: retrain_flow(params_path=str(params)))
    typer.echo("\n" + summary.to_text())


def _run(step):
    """Run a step; expected failures print one clear message and exit 1."""
    try:
        return step()
    except _expected_errors() as err:
        _fail(str(err))


def _quiet_third_party() -> None:
    """Silence start-up noise that says nothing about this run (CUDA probing on a CPU
    machine, Google client deprecation notices, a Keras notice about tf.data shuffling)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\..*")
    warnings.filterwarnings("ignore", message=r"`shuffle=True` was passed", category=UserWarning)


def main() -> None:
    _quiet_third_party()
    app()


if __name__ == "__main__":
    sys.exit(main())
