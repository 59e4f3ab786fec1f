"""The retraining flow: ingest -> validate -> train -> evaluate -> register (-> promote).

A thin recipe: every step is a plain function in `tasks.steps`, wrapped here as a Prefect task.
Retries are for I/O against external services only (the model registry), never for training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import steps
from tasks.config import load_params
from tasks.evaluate import GateRefusedError, format_metrics
from tasks.layout import Layout
from tasks.steps import StepFailed

P = ParamSpec("P")
R = TypeVar("R")


def _named(step: Callable[P, R]) -> Callable[P, R]:
    """`step` raising `StepFailed` (step name, error type, reason) for any error, so the
    failed task's and the flow run's state message say which step failed and why."""

    @functools.wraps(step)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return step(*args, **kwargs)
        except Exception as err:
            raise StepFailed(f"step {step.__name__} failed: {type(err).__name__}: {err}") from err

    return run


ingest = task(_named(steps.ingest), name="ingest", cache_policy=NO_CACHE)
validate = task(_named(steps.validate), name="validate", cache_policy=NO_CACHE)
train = task(_named(steps.train), name="train", cache_policy=NO_CACHE)
evaluate = task(_named(steps.evaluate), name="evaluate", cache_policy=NO_CACHE)
# Retries only where a remote service is involved (the registry), never for computation.
register = task(
    _named(steps.register),
    name="register",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
)


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
                f"MLflow UI         mlflow ui --backend-store-uri {self.tracking_uri}"
                "  (then open http://127.0.0.1:5000)",
            ]
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


@flow(name="esmm-retrain", log_prints=True)
def retrain(params_path: str = "params.yaml") -> RunSummary:
    """Retrain ESMM on the current raw data version and register the result."""
    params = load_params(params_path)

    # Ingest: raw Ali-CCP text -> split Parquet tables and id vocabularies.
    report = ingest(params)
    # Validate: TFDV statistics, schema, drift and skew; anomalies stop the flow here, after
    # the reports are attached to the run.
    try:
        validation = validate(params)
    finally:
        attach_validation_reports(Layout.from_config(params.paths))
    # Train: ESMM with shared embeddings and the weighted CTR + CTCVR loss.
    train(params, verbose=2)
    # Evaluate: candidate and champion on the test split; floors and no-regression gate.
    evaluation = evaluate(params)
    # Register: a new model version as `challenger`; promoted to `champion` if the gate passed.
    registration = register(params)

    summary = RunSummary(
        data_version=registration.data_version,
        impressions=report.split_rows,
        rows_quarantined=report.rows_quarantined,
        validation=validation.summary(),
        metrics=evaluation.metrics,
        oracle=evaluation.oracle,
        gate_passed=evaluation.verdict.passed,
        gate_reasons=evaluation.verdict.reasons,
        model_name=registration.model_name,
        model_version=registration.version,
        aliases=registration.aliases,
        tracking_uri=registration.tracking_uri,
        champion=evaluation.champion,
        previous_champion=registration.previous_champion,
    )
    create_markdown_artifact(
        summary.to_markdown(), key="esmm-retrain-summary", description="ESMM retraining run"
    )
    if not evaluation.verdict.passed:
        # Registered as challenger and summarised; the run still ends Failed.
        raise GateRefusedError(evaluation.verdict.reasons, detail=summary.to_text())
    return summary
