"""The retraining flow: ingest -> validate -> train -> evaluate -> register -> promote.

Each step is its `dvc.yaml` stage, run by a Prefect task as `dvc repro --single-item <stage>`
(flows/stages.py): the flow and `dvc repro` keep one pipeline state (`dvc.lock`, the run
cache), a stage whose inputs did not change is skipped, and the run summary is read from the
stages' outputs (the ingestion and validation reports, metrics.json, registration.json). The
register stage never moves `champion` by default (`register.promote: never`); this flow's
own `promote` task does, when the gate passed, through the function `esmm promote` uses.
Retries are for I/O against external services only (the model registry), never for training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from aliccp.format import SPLITS
from flows.stages import STAGES, failure_reason, run_stage
from tasks import steps
from tasks.champion import CHAMPION, PromotionError, champion_history, champion_version
from tasks.config import ConfigError, Params, load_params
from tasks.evaluate import GateRefusedError, format_metrics, read_metrics
from tasks.layout import Layout
from tasks.steps import StepFailed, read_oracle
from tasks.tracking import resolve_tracking_uri


def _stage_task(name: str):
    """The Prefect task that runs stage `name`, named like it."""

    def run(layout: Layout) -> bool:
        """Run the stage with its output in this task's log; True when it ran (not skipped).

        Raises:
            StepFailed: the stage failed; the message names it and gives the command's error
                (a refused gate is not a failure here: `register` records it, and the flow
                fails after its summary).
        """
        logger = get_run_logger()
        result = run_stage(name, log=logger.info)
        if result.returncode and not (name == "register" and _refused(layout.registration_path)):
            raise StepFailed(f"step {name} failed: {failure_reason(result)}")
        return result.ran

    # Retries only where a remote service is involved (the registry), never for computation.
    retries = {"retries": 2, "retry_delay_seconds": 5} if name == "register" else {}
    return task(run, name=name, cache_policy=NO_CACHE, **retries)


def _refused(path: Path) -> bool:
    """The register stage exits 1 after registering a model whose gate failed."""
    return path.is_file() and not json.loads(path.read_text()).get("gate_passed", True)


stage_tasks = {name: _stage_task(name) for name in STAGES}


@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def promote_on_gate(params: Params, registration: dict) -> str | None:
    """Make the registered version `champion` when its gate passed (as `esmm promote` would);
    returns the previous champion, or None when nothing moved.

    A version that was champion before is not promoted again: a run on unchanged inputs must
    not undo an `esmm rollback` (or an `esmm promote` of another version) made since.
    """
    cfg = params.register_
    uri = resolve_tracking_uri(cfg.tracking_uri)
    version = registration["version"]
    if not registration["gate_passed"] or champion_version(uri, cfg.model_name) == version:
        return None  # refused, or promoted already (register.promote: gate)
    if any(event.version == version for event in champion_history(uri, cfg.model_name)):
        get_run_logger().info(f"version {version} was champion before: not promoted again")
        return None
    try:
        event = steps.promote(params, version, reason="gate passed in the retraining flow")
    except PromotionError as err:
        raise StepFailed(f"step promote failed: {err}") from err
    return event.previous or "none"


@dataclass(frozen=True)
class RunSummary:
    data_version: str
    impressions: dict[str, int]  # per split, as ingested
    rows_quarantined: int
    validation: str
    metrics: dict[str, float]
    oracle: dict[str, float] | None
    gate_passed: bool
    gate_reasons: list[str]
    model_name: str
    model_version: str
    aliases: list[str]
    tracking_uri: str
    champion: dict | None = None  # the champion's metrics on the same test split (+ version)
    previous_champion: str | None = None  # the champion this run replaced, if it was promoted

    def _verdict(self) -> str:
        against = (
            f"against champion version {self.champion['version']}"
            if self.champion
            else "no champion yet: floors only"
        )
        if self.gate_passed:
            return f"passed ({against})"
        return "FAILED: " + "; ".join(self.gate_reasons) + f" ({against}; champion unchanged)"

    def _registered(self) -> str:
        text = f"{self.model_name} version {self.model_version} as {', '.join(self.aliases)}"
        if self.previous_champion:
            text += f" (champion was version {self.previous_champion})"
        return text

    def to_text(self) -> str:
        """The summary `esmm retrain` prints."""
        split_rows = ", ".join(f"{split} {n:,}" for split, n in self.impressions.items())
        return "\n".join(
            [
                f"data version      {self.data_version}",
                f"impressions       {split_rows} ({self.rows_quarantined:,} raw lines quarantined)",
                f"validation        {self.validation}",
                format_metrics(self.metrics, self.oracle, self.champion),
                f"gate              {self._verdict()}",
                f"registered        {self._registered()}",
                f"MLflow UI         {self._mlflow_ui()}",
            ]
        )

    def _mlflow_ui(self) -> str:
        if self.tracking_uri.startswith(("http://", "https://")):  # a tracking server's own UI
            return self.tracking_uri
        return (
            f"mlflow ui --backend-store-uri {self.tracking_uri}  (then open http://127.0.0.1:5000)"
        )

    def to_markdown(self) -> str:
        lines = [
            f"**data version** `{self.data_version}`: impressions "
            + ", ".join(f"{split} {n:,}" for split, n in self.impressions.items())
            + f"; {self.rows_quarantined:,} raw lines quarantined",
            f"**validation** {self.validation}",
            "",
            "| metric | model | oracle |" + (" champion | delta |" if self.champion else ""),
            "|---|---|---|" + ("---|---|" if self.champion else ""),
        ]
        for name in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked"):
            oracle = f"{self.oracle[name]:.4f}" if self.oracle and name in self.oracle else "n/a"
            row = f"| {name} | {self.metrics[name]:.4f} | {oracle} |"
            if self.champion:
                champ = self.champion[name]
                row += f" {champ:.4f} | {self.metrics[name] - champ:+.4f} |"
            lines.append(row)
        lines += [
            "",
            f"**gate** {self._verdict()}",
            f"**registered** `{self.model_name}` {self._registered()}",
        ]
        return "\n".join(lines)


def attach_validation_reports(layout: Layout) -> None:
    """The validation text summary as a markdown artefact and a link to the HTML report."""
    if not layout.validate_report_text.is_file():
        return
    create_markdown_artifact(
        "```\n" + layout.validate_report_text.read_text() + "```",
        key="esmm-validation-report",
        description="Data validation: statistics, anomalies, drift and skew",
    )
    create_link_artifact(
        layout.validate_report_html.resolve().as_uri(),
        link_text="validation report (HTML, self-contained)",
        key="esmm-validation-report-html",
        description=str(layout.validate_report_html.resolve()),
    )


def _check_params_path(params_path: str) -> Params:
    """The stages read the repository's params.yaml (as `dvc repro` does): so must the flow."""
    if Path(params_path).resolve() != Path("params.yaml").resolve():
        raise ConfigError(
            f"{params_path}: the retraining flow runs the dvc.yaml stages, which read "
            "params.yaml in the working directory; edit that file (or use dvc exp run -S)"
        )
    return load_params(params_path)


def summarise(params: Params, layout: Layout, previous_champion: str | None) -> RunSummary:
    """The run summary, read from the stages' outputs (whether this run or an earlier one
    made them: a skipped stage's outputs are the current ones)."""
    ingested = json.loads(layout.ingest_report_path.read_text())
    validation = json.loads(layout.validate_summary_path.read_text())
    metrics, champion, verdict = read_metrics(layout.metrics_path)
    registration = json.loads(layout.registration_path.read_text())
    aliases = [a for a in registration["aliases"] if a != CHAMPION]
    uri = resolve_tracking_uri(params.register_.tracking_uri)
    if champion_version(uri, registration["model_name"]) == registration["version"]:
        aliases.append(CHAMPION)
    rows = ", ".join(f"{k} {v:,}" for k, v in validation["num_examples"].items())
    passed = (
        "passed" if validation["passed"] else f"FAILED ({len(validation['anomalies'])} anomalies)"
    )
    return RunSummary(
        data_version=registration["data_version"],
        impressions={s: ingested["split_rows"][s] for s in SPLITS if s in ingested["split_rows"]},
        rows_quarantined=ingested["rows_quarantined"],
        validation=f"validation {passed}; rows profiled: {rows}",
        metrics=metrics,
        oracle=read_oracle(layout.oracle_path),
        gate_passed=verdict.passed,
        gate_reasons=verdict.reasons,
        model_name=registration["model_name"],
        model_version=registration["version"],
        aliases=aliases,
        tracking_uri=registration["tracking_uri"],
        champion=champion,
        previous_champion=(None if previous_champion in (None, "none") else previous_champion)
        or registration.get("previous_champion"),
    )


@flow(name="esmm-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml") -> RunSummary:
    """Bring every stage of the current raw data version and params.yaml up to date (as
    `dvc repro` would), register the model and promote it to `champion` on a passed gate."""
    params = _check_params_path(params_path)
    layout = Layout.from_config(params.paths)

    # Ingest: raw Ali-CCP text -> split Parquet tables and id vocabularies.
    stage_tasks["ingest"](layout)
    # Validate: TFDV statistics, schema, drift and skew; anomalies stop the flow here, after
    # the reports are attached to the run.
    try:
        stage_tasks["validate"](layout)
    finally:
        attach_validation_reports(layout)
    # Train: ESMM with shared embeddings and the weighted CTR + CTCVR loss.
    stage_tasks["train"](layout)
    # Evaluate: candidate and champion on the test split; floors and no-regression gate.
    stage_tasks["evaluate"](layout)
    # Register: a new model version as `challenger` (skipped when nothing upstream changed).
    stage_tasks["register"](layout)
    registration = json.loads(layout.registration_path.read_text())
    # Promote: `champion` moves to it when the gate passed.
    previous = promote_on_gate(params, registration)

    summary = summarise(params, layout, previous)
    create_markdown_artifact(
        summary.to_markdown(), key="esmm-retrain-summary", description="ESMM retraining run"
    )
    if not summary.gate_passed:
        # Registered as challenger and summarised; the run still ends Failed.
        raise GateRefusedError(summary.gate_reasons, detail=summary.to_text())
    return summary
