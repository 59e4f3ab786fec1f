"""The `esmm` command's Typer application and what its commands share: the `--params`
option, loading params, and turning expected failures into one `error:` line with exit code 1.

The commands live in `flows.cli` (pipeline steps, data, the flow, scheduling) and
`flows.cli_serving` (serving, export, batch scoring).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import typer

from flows import preflight
from flows.stack import stack_app
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
app.add_typer(stack_app, name="stack")


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"esmm {metadata.version('esmm-pipeline')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """ESMM conversion-rate pipeline on Ali-CCP-format data."""


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


def _check(check, *args) -> None:
    """Run a `flows.preflight` check; its refusal is one line and exit code 1."""
    try:
        check(*args)
    except preflight.PreflightError as err:
        _fail(str(err))


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors that carry a message for the user rather than a traceback."""
    from tasks.champion import PromotionError
    from tasks.data import DataVersionError
    from tasks.evaluate import GateRefusedError
    from tasks.ingest import IngestError
    from tasks.steps import StepFailed
    from tasks.validate import DataValidationError

    return (
        ConfigError,
        IngestError,
        DataValidationError,
        DataVersionError,
        FileNotFoundError,
        StepFailed,
        GateRefusedError,
        PromotionError,
    )


def _run(step):
    """Run a step; expected failures print one clear message and exit 1."""
    try:
        return step()
    except _expected_errors() as err:
        _fail(str(err))
