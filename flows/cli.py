"""`esmm`: the command line. One subcommand per pipeline step (the `dvc.yaml` stages), the
Prefect retraining flow, the data generator and data versioning; the serving commands are in
`flows.cli_serving`, the shared application and helpers in `flows.cli_base`.

Heavy imports (TensorFlow, TFDV, MLflow, Prefect) happen inside the commands that need them,
so `esmm --help` and light commands start fast.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer

from flows import preflight
from flows.cli_base import (
    PARAMS,
    _check,
    _fail,
    _params,
    _run,
    app,
    data_app,
    schema_app,
)
from flows.quiet import quiet_this_process
from flows.stack import deploy_to_pool, server_errors
from flows.stages import FLOW_ENV
from stack.settings import load_settings
from tasks.layout import Layout


@app.command()
def synth(
    out: Path = typer.Option(None, "--out", help="Output folder (default: paths.raw_dir)."),
    train: int = typer.Option(None, "--train", help="Train impressions (default: synth.train)."),
    test: int = typer.Option(None, "--test", help="Test impressions (default: synth.test)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: synth.seed)."),
    profile: str = typer.Option(
        None, "--profile", help="Data profile: default or realistic (default: synth.profile)."
    ),
    defect_rate: float = typer.Option(
        0.0,
        "--defect-rate",
        min=0.0,
        max=1.0,
        help="Share of lines written with a defect, listed in defects.csv (default: 0).",
    ),
    defects: str = typer.Option(
        None,
        "--defects",
        help="Comma-separated defect kinds (e.g. truncated,empty,crlf) (default: every "
        "defect kind, not crlf).",
    ),
    days: int = typer.Option(
        None,
        "--days",
        min=1,
        help="Write a drifting series of N days instead (OUT/day-01, ...; --train/--test per "
        "day; default OUT: days). See docs/nightly.md.",
    ),
    churn: float = typer.Option(
        0.05, "--churn", min=0.0, max=0.99, help="--days: share of items and users replaced daily."
    ),
    drift: float = typer.Option(
        0.1, "--drift", min=0.0, help="--days: daily random-walk step of item effects (logits)."
    ),
    bad_day: int = typer.Option(None, "--bad-day", help="--days: the day written broken."),
    bad_kind: str = typer.Option(
        "click_shift", "--bad-kind", help="--days: click_shift or defects (see docs/nightly.md)."
    ),
    params: Path = PARAMS,
) -> None:
    """Generate seeded Ali-CCP-format raw data with ground truth and oracle AUCs."""
    from aliccp.synth import synthesize_ali_ccp

    p = _params(params)
    if days is not None:
        from aliccp.synth.days import synthesize_days

        try:
            synthesize_days(
                out or Path("days"),
                days,
                train or p.synth.train,
                test or p.synth.test,
                p.synth.seed if seed is None else seed,
                profile=profile or p.synth.profile,
                churn=churn,
                drift=drift,
                bad_day=bad_day,
                bad_kind=bad_kind,
                progress=typer.echo,
            )
        except ValueError as err:
            _fail(str(err))
        typer.echo(f"wrote {out or Path('days')}/ ({days} days, days.json)")
        return
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
    from tasks.validate_schema import propose_schemas, write_schemas

    p = _params(params)
    proposed_dir = Layout.from_config(p.paths).validate_dir / "proposed"
    proposed = propose_schemas(Layout.from_config(p.paths).ingest_dir, proposed_dir, p.validate_)
    write_schemas(proposed_dir, proposed)
    return Path(p.validate_.schema_dir), proposed_dir, proposed


@schema_app.command("infer")
def schema_infer(params: Path = PARAMS) -> None:
    """Propose schemas from the ingested training split and show the diff to the committed ones."""
    from tasks.validate_schema import schema_diff

    schema_dir, proposed_dir, proposed = _propose_schemas(params)
    typer.echo(schema_diff(schema_dir, proposed) or "the proposed schemas equal the committed ones")
    typer.echo(f"proposed schemas: {proposed_dir}; accept them with `esmm schema update`")


@schema_app.command("update")
def schema_update(params: Path = PARAMS) -> None:
    """Accept a deliberate change: write the proposed schemas over schema_dir, showing the diff."""
    from tasks.validate_schema import schema_diff, write_schemas

    schema_dir, _, proposed = _propose_schemas(params)
    typer.echo(schema_diff(schema_dir, proposed) or "no change")
    write_schemas(schema_dir, proposed)
    typer.echo(f"wrote {schema_dir}/; review and commit it")


@app.command()
def ingest(params: Path = PARAMS) -> None:
    """Parse raw files into split Parquet tables, vocabularies and a quarantine report."""
    p = _params(params)
    _check(preflight.require_inputs, Layout.from_config(p.paths), "ingest")
    from tasks import steps

    report = _run(lambda: steps.ingest(p))
    typer.echo(report.summary())


@app.command()
def validate(params: Path = PARAMS) -> None:
    """TFDV statistics, schema, drift and skew checks; exits non-zero on anomalies, naming
    each feature; writes report.txt and report.html either way."""
    p = _params(params)
    layout = Layout.from_config(p.paths)
    _check(preflight.require_inputs, layout, "validate")
    from tasks import steps

    try:
        typer.echo(_run(lambda: steps.validate(p)).summary())
    finally:
        if layout.validate_report_html.is_file():
            typer.echo(f"reports: {layout.validate_report_text} and {layout.validate_report_html}")


@app.command()
def train(
    params: Path = PARAMS,
    resume: bool = typer.Option(
        True,
        "--resume/--no-resume",
        help="Continue from the checkpoint of an interrupted run with the same config and "
        "data, if there is one; --no-resume starts over.",
    ),
    worker_index: int = typer.Option(
        None,
        "--worker-index",
        min=0,
        help="With train.distribute: multi_worker, start worker N of train.workers (0 is the "
        "chief, which alone writes files). TF_CONFIG, when set, gives the cluster instead.",
    ),
) -> None:
    """Train ESMM on the ingested train split (early stopping on the validation split)."""
    p = _params(params)
    _check(preflight.require_inputs, Layout.from_config(p.paths), "train")
    from tasks import steps
    from tasks.distribute import configure_worker

    _run(lambda: configure_worker(p.train, worker_index))
    result = _run(lambda: steps.train(p, resume=None if resume else False))
    if result.resumed_from is not None:
        epoch, step = result.resumed_from
        typer.echo(f"resumed from the checkpoint at epoch {epoch + 1}, step {step}")
    if not result.chief:
        typer.echo(f"worker done after {result.epochs_run} epochs; the chief saved the model")
        return
    typer.echo(f"saved {result.model_path} after {result.epochs_run} epochs")


@app.command()
def evaluate(params: Path = PARAMS) -> None:
    """Score the model and the champion on the test split; metrics, plots, gate verdict.

    Exits 0 on a refused model so that DVC records its metrics; `esmm register` is the
    step that fails on it.
    """
    p = _params(params)
    _check(preflight.require_inputs, Layout.from_config(p.paths), "evaluate")
    from tasks import steps
    from tasks.evaluate import format_metrics

    evaluation = _run(lambda: steps.evaluate(p))
    typer.echo(format_metrics(evaluation.metrics, evaluation.oracle, evaluation.champion))
    if evaluation.champion is None:
        typer.echo("no champion yet: gate on the floors only")
    typer.echo(
        "gate: "
        + (
            "passed"
            if evaluation.verdict.passed
            else "FAILED (esmm register will refuse to promote it)\n  "
            + "\n  ".join(evaluation.verdict.reasons)
        )
    )


@app.command()
def register(params: Path = PARAMS) -> None:
    """Register the model as `challenger`; with `register.promote: gate`, also `champion`
    if the gate passed (the default, never, leaves that to `esmm promote` or `esmm retrain`).

    On a failed gate the champion stays and the command exits 1 listing the failed checks.
    """
    p = _params(params)
    _check(preflight.require_inputs, Layout.from_config(p.paths), "register")
    from tasks import steps
    from tasks.evaluate import GateRefusedError

    reg = _run(lambda: steps.register(p))
    typer.echo(
        f"registered {reg.model_name} version {reg.version} ({', '.join(reg.aliases)}), data version {reg.data_version}"
    )
    if not reg.gate_passed:
        _fail(f"{GateRefusedError(list(reg.gate_reasons))}\nthe champion is unchanged")
    if "champion" not in reg.aliases and not os.environ.get(FLOW_ENV):
        typer.echo(
            f"champion unchanged (register.promote: {p.register_.promote}); make this version "
            f"the champion with: esmm promote {reg.version}"
        )


@app.command()
def promote(
    version: str = typer.Argument(..., help="Registered model version to make `champion`."),
    reason: str = typer.Option("", "--reason", help="Why (recorded in the registry)."),
    force: bool = typer.Option(
        False, "--force", help="Override a failed gate (needs --reason; recorded as an override)."
    ),
    params: Path = PARAMS,
) -> None:
    """Move `champion` to VERSION; refused unless its gate passed (or --force --reason)."""
    from tasks import steps

    event = _run(lambda: steps.promote(_params(params), version, reason, override=force))
    typer.echo(
        f"champion: version {event.previous or '-'} -> {event.version}"
        + (" (gate OVERRIDDEN)" if event.override else "")
    )


@app.command()
def rollback(
    reason: str = typer.Option("", "--reason", help="Why (recorded in the registry)."),
    params: Path = PARAMS,
) -> None:
    """Move `champion` back to the previous champion."""
    from tasks import steps

    event = _run(lambda: steps.rollback(_params(params), reason))
    typer.echo(f"champion: version {event.previous} -> {event.version} (rolled back)")


@app.command()
def champions(params: Path = PARAMS) -> None:
    """The history of `champion`, oldest first, as recorded in the registry."""
    from tasks import steps

    events = _run(lambda: steps.champions(_params(params)))
    typer.echo(" seq  at                         action   move       user  reason")
    for event in events:
        typer.echo(event.to_text())
    if not events:
        typer.echo("no champion yet")


@app.command()
def retrain(params: Path = PARAMS) -> None:
    """Run the Prefect retraining flow end to end and print its summary."""
    p = _params(params)  # a bad params file fails here, before Prefect starts
    _check(preflight.require_inputs, Layout.from_config(p.paths), "ingest")
    from flows.retrain import retrain as retrain_flow

    summary = _run(lambda: retrain_flow(params_path=str(params)))
    typer.echo("\n" + summary.to_text())
    typer.echo("pipeline state: dvc.lock (record it with git add dvc.lock; dvc push)")


@app.command()
def nightly(
    series: Path = typer.Argument(..., help="A day series written by esmm synth --days N."),
    days: str = typer.Option(None, "--days", help="Days to run, e.g. 1-4 or 2,3 (default: all)."),
    params: Path = PARAMS,
) -> None:
    """Run a day series night by night: esmm data add, then the retraining flow (see
    docs/nightly.md). Refused nights keep the champion; the loop goes on."""
    _params(params)
    from flows.nightly import parse_days, run_nightly

    try:
        wanted = parse_days(days) if days else None
    except ValueError as err:
        _fail(str(err))
    try:
        nights = run_nightly(series, wanted, params_path=str(params), log=typer.echo)
    except ValueError as err:
        _fail(str(err))
    except FileNotFoundError as err:
        _fail(str(err))
    refused = sum(n.outcome == "refused" for n in nights)
    typer.echo(f"{len(nights)} nights, {refused} refused; champion now {nights[-1].champion_after}")


@app.command()
def schedule(
    params: Path = PARAMS,
    cron: str = typer.Option(None, help="Cron expression; default schedule.cron in params.yaml."),
    port: int = typer.Option(None, help="Port of the local server; default schedule.port."),
) -> None:
    """Serve the retraining flow as a scheduled Prefect deployment (until Ctrl-C).

    With PREFECT_API_URL unset, a Prefect server (API and UI) is started on 127.0.0.1 for as
    long as this runs; set PREFECT_API_URL to use an existing server instead.
    """
    p = _params(params)
    cfg = p.schedule.model_copy(
        update={k: v for k, v in {"cron": cron, "port": port}.items() if v is not None}
    )
    from flows.schedule import check_schedule, deployment_name, local_server

    try:  # before a server or a deployment starts
        check_schedule(cfg)
    except ValueError as err:
        _fail(str(err))
    if (name := deploy_to_pool(cfg, params)) is not None:
        typer.echo(f"registered {name} (cron '{cfg.cron}') with the work pool; workers run it")
        return
    # A service manager stops us with SIGTERM: shut down like Ctrl-C, server included.
    signal.signal(signal.SIGTERM, _interrupt)
    if os.environ.get("PREFECT_API_URL"):
        typer.echo(f"deploying to the Prefect server at {os.environ['PREFECT_API_URL']}")
        _serve(cfg, params)
        return
    log = Layout.from_config(p.paths).artifacts / "prefect-server.log"
    typer.echo(f"starting a Prefect server on {cfg.host}:{cfg.port} (log: {log})")
    with local_server(cfg.host, cfg.port, log) as url:
        os.environ["PREFECT_API_URL"] = url
        typer.echo(f"Prefect UI: {url.removesuffix('/api')}")
        typer.echo(
            f"run now:    PREFECT_API_URL={url} prefect deployment run {deployment_name(cfg)}"
        )
        _serve(cfg, params)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _serve(cfg, params: Path) -> None:
    from flows.schedule import serve_retraining

    typer.echo(f"serving {cfg.deployment} on cron '{cfg.cron}' ({cfg.timezone}); Ctrl-C stops it")
    serve_retraining(cfg, str(params))


# The commands that use a registered model (serve, export, score) register themselves on `app`.
import flows.cli_serving  # noqa: E402, F401


def main() -> None:
    quiet_this_process()
    # With PREFECT_API_URL unset, a flow starts Prefect's temporary local server and waits
    # 20 s for it by default; on 2 busy cores (training beside it, a first database
    # migration) that timed out. Waiting longer costs nothing when it starts at once.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    load_settings()  # the team stack's settings file, when there is one (flows/stack.py)
    with server_errors():
        app()


if __name__ == "__main__":
    sys.exit(main())
