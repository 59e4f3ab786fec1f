"""Validation step: profile every split and table, run every check, write the reports.

`validate_data` is the gate of the pipeline: any anomaly stops the run (after the reports
are written). Statistics come from TFDV over Apache Beam (`tasks.validate_stats`), each
table's schema is the committed one or a first-run proposal (`tasks.validate_schema`), and
the checks are schema anomalies, label checks, drift from the previous data version and
skew of the test split from the training split (`tasks.validate_checks`). Training
statistics of each data version that passed are kept in a history folder, which is how the previous
version is found. `validate_records` checks in-memory records against one environment of a
schema.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from aliccp.format import SPLITS
from models.features import ALL_FIELDS, ids_key, wts_key
from tasks.config import ValidateConfig
from tasks.validate_checks import (
    Comparison,
    compare,
    label_drift,
    schema_anomalies,
    too_few_rows_note,
)
from tasks.validate_report import write_reports
from tasks.validate_schema import SERVING, load_or_infer_schema
from tasks.validate_stats import (
    TABLES,
    LabelRates,
    generate_statistics,
    import_tfdv,
    label_rates,
    num_examples,
    records_statistics,
)

_REPORTS = ("report.json", "report.txt", "report.html")


class DataValidationError(RuntimeError):
    """Anomalies were found; the message names each feature and the reason."""


@dataclass(frozen=True)
class ValidationResult:
    passed: bool
    anomalies: list[str]  # "where: feature 'f': reason"
    num_examples: dict[str, int]  # "split/table" -> rows profiled
    data_version: str | None = None
    previous_version: str | None = None  # the version drift was measured against
    comparisons: list[Comparison] = field(default_factory=list)
    label_rates: dict[str, LabelRates] = field(default_factory=dict)  # split or "previous"
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rows = ", ".join(f"{k} {v:,}" for k, v in self.num_examples.items())
        verdict = "passed" if self.passed else f"FAILED ({len(self.anomalies)} anomalies)"
        return f"validation {verdict}; rows profiled: {rows}"

    def to_json(self) -> dict:
        return {
            "passed": self.passed,
            "anomalies": self.anomalies,
            "num_examples": self.num_examples,
            "data_version": self.data_version,
            "previous_version": self.previous_version,
            "comparisons": [{**asdict(c), "passed": c.passed} for c in self.comparisons],
            "label_rates": {
                k: {**asdict(r), "ctr": r.ctr, "cvr_given_click": r.cvr}
                for k, r in self.label_rates.items()
            },
            "notes": self.notes,
        }


@dataclass
class _Findings:
    """What the checks found so far, in the order they ran (the reports keep that order)."""

    anomalies: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    num_examples: dict[str, int] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    rates: dict[str, LabelRates] = field(default_factory=dict)

    def add(self, anomalies: list[str], comparisons: list[Comparison], notes: list[str]) -> None:
        self.anomalies += anomalies
        self.comparisons += comparisons
        self.notes += notes


def _save_history(history_dir: Path, version: str, out_dir: Path) -> None:
    """Keep this version's training statistics (overwriting an earlier run of it)."""
    folder = history_dir / version
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for table in TABLES:
        shutil.copy2(out_dir / f"train_{table}.stats.binpb", folder)
    created = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    (folder / "version.json").write_text(json.dumps({"version": version, "created": created}))


def previous_version(history_dir: Path, version: str | None) -> str | None:
    """The most recently saved version in the history other than `version`."""
    saved = []
    for meta in Path(history_dir).glob("*/version.json"):
        info = json.loads(meta.read_text())
        if info["version"] != version:
            saved.append((info["created"], info["version"]))
    return max(saved)[1] if saved else None


def _check_comparator_features(cfg: ValidateConfig) -> None:
    """Raise ValueError when a per-feature drift or skew override names no known feature."""
    known = {key(f) for f in ALL_FIELDS for key in (ids_key, wts_key)}
    for kind, section in (("drift", cfg.drift), ("skew", cfg.skew)):
        unknown = sorted(set(section.features) - known)
        if unknown:
            raise ValueError(f"validate.{kind}.features: unknown feature(s) {unknown}")


def _drift_baseline(
    found: _Findings, data_version: str | None, history_dir: Path | None
) -> str | None:
    """The data version drift is measured against; None (with a note saying why) when none."""
    if not (data_version and history_dir):
        found.notes.append("no data version given: drift not checked, history not updated")
        return None
    previous = previous_version(history_dir, data_version)
    if previous is None:
        found.notes.append("no earlier data version in the statistics history: drift not checked")
    return previous


def _check_splits(found: _Findings, table: str, statistics: dict, schema) -> None:
    """Schema and label checks of `table`, split by split; the label rates of impressions."""
    for split in SPLITS:
        stats = statistics[f"{split}_{table}"]
        where = f"{split}/{table}"
        found.num_examples[where] = num_examples(stats)
        if not found.num_examples[where]:
            found.notes.append(f"{where} is empty: not checked")
            continue
        found.anomalies += schema_anomalies(where, stats, schema)
        if table == "impressions":
            found.rates[split] = label_rates(stats)


def _check_skew(
    found: _Findings, table: str, statistics: dict, schema, cfg: ValidateConfig
) -> None:
    """Skew: the test split of `table` against its training split."""
    rows = min(found.num_examples[f"test/{table}"], found.num_examples[f"train/{table}"])
    too_few = too_few_rows_note("skew", table, rows, cfg.skew)
    if too_few:
        found.notes += too_few
        return
    train, test = statistics[f"train_{table}"], statistics[f"test_{table}"]
    where = f"skew test vs train/{table}"
    found.add(*compare("skew", where, table, schema, cfg.skew, train, test))


def _check_drift(
    found: _Findings,
    table: str,
    statistics: dict,
    schema,
    cfg: ValidateConfig,
    history_dir: Path,
    previous: str,
) -> None:
    """Drift: this training split of `table` against the previous version's, and (for
    impressions) the drift of the label rates."""
    tfdv = import_tfdv()
    old = tfdv.load_stats_binary(str(history_dir / previous / f"train_{table}.stats.binpb"))
    rows = min(num_examples(old), found.num_examples[f"train/{table}"])
    if table == "impressions":
        found.rates["previous"] = label_rates(old)
    too_few = too_few_rows_note("drift", table, rows, cfg.drift)
    if too_few:
        found.notes += too_few
        return
    train = statistics[f"train_{table}"]
    where = f"drift train/{table} vs {previous}"
    found.add(*compare("drift", where, table, schema, cfg.drift, train, old))
    if table == "impressions":
        found.anomalies += label_drift(
            found.rates["previous"], found.rates["train"], cfg.label_drift
        )


def validate_data(
    ingest_dir: Path,
    out_dir: Path,
    schema_dir: Path,
    cfg: ValidateConfig,
    data_version: str | None = None,
    history_dir: Path | None = None,
) -> ValidationResult:
    """Profile every split and table and run every check; write the statistics and reports.

    Args:
        data_version: names this data in the statistics history; without it (or without
            `history_dir`) there is no drift check.
        history_dir: training statistics per data version (`<version>/*.stats.binpb`).

    Raises:
        DataValidationError: anomalies were found (after the reports are written).
        ValueError: a per-feature drift or skew override names an unknown feature.
    """
    _check_comparator_features(cfg)
    out_dir, schema_dir = Path(out_dir), Path(schema_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in _REPORTS:  # never show an old verdict
        (out_dir / stale).unlink(missing_ok=True)
    inputs = {
        f"{split}_{table}": Path(ingest_dir) / split / filename
        for table, filename in TABLES.items()
        for split in SPLITS
    }
    statistics = generate_statistics(inputs, out_dir, cfg)
    found = _Findings()
    previous = _drift_baseline(found, data_version, history_dir)
    for table in TABLES:
        train = statistics[f"train_{table}"]
        schema, inferred = load_or_infer_schema(schema_dir, table, train, cfg)
        found.notes += [inferred] if inferred else []
        _check_splits(found, table, statistics, schema)
        _check_skew(found, table, statistics, schema, cfg)
        if previous is not None:
            _check_drift(found, table, statistics, schema, cfg, Path(history_dir), previous)
    # A refused version never becomes the baseline: the next version's drift is measured
    # against the last one that passed (else a bad night would also refuse the good next one).
    if data_version and history_dir and not found.anomalies:
        _save_history(Path(history_dir), data_version, out_dir)
    result = ValidationResult(
        not found.anomalies,
        found.anomalies,
        found.num_examples,
        data_version,
        previous,
        found.comparisons,
        found.rates,
        found.notes,
    )
    (out_dir / "report.json").write_text(json.dumps(result.to_json(), indent=2))
    write_reports(result, statistics, out_dir)
    if result.anomalies:
        raise DataValidationError("data validation failed:\n  " + "\n  ".join(result.anomalies))
    return result


def validate_records(
    records: pa.Table, schema_path: Path, cfg: ValidateConfig, environment: str = SERVING
) -> list[str]:
    """Anomalies of in-memory records (by default serving records, which carry no labels)
    against one environment of a schema."""
    tfdv = import_tfdv()
    schema = tfdv.load_schema_text(str(schema_path))
    stats = records_statistics(records, cfg)
    found = tfdv.validate_statistics(stats, schema, environment=environment)
    return [
        f"feature '{name}': {info.short_description}"
        for name, info in sorted(found.anomaly_info.items())
    ]
