"""Validation step: TFDV statistics over Apache Beam, schema checks, anomalies stop the run.

Statistics are computed by TFDV's Beam transform over record batches read straight from the
ingested Parquet files, for the impression table and the user-side table separately (the
denormalised join is never built). The runner is named explicitly: Beam's default local
runner tries to download a binary, which fails offline. Any Beam flags (Flink, Spark,
Dataflow) pass through `validate.beam_options`.

Each table has a schema in `validate.schema_dir` (`impressions.pbtxt`, `common.pbtxt`). When a
schema file is absent one is inferred from the training statistics and relaxed to what the
Ali-CCP format promises (any field may be absent from a line; labels are 0 or 1), written
there for review, and used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from models.features import COMMON_INDEX_KEY, LABEL_KEYS, SAMPLE_ID_KEY
from tasks.config import ValidateConfig
from tasks.ingest import SPLITS

TRAINING, SERVING = "TRAINING", "SERVING"  # schema environments
TABLES: dict[str, str] = {"impressions": "impressions.parquet", "common": "common.parquet"}
# Keys identify rows; they are not features.
_NOT_FEATURES = (SAMPLE_ID_KEY, COMMON_INDEX_KEY)


class DataValidationError(RuntimeError):
    """TFDV found anomalies; the message names each feature and the reason."""


@dataclass(frozen=True)
class ValidationResult:
    passed: bool
    anomalies: list[str]  # "split/table: feature 'f': reason"
    num_examples: dict[str, int]  # "split/table" -> rows profiled

    def summary(self) -> str:
        rows = ", ".join(f"{k} {v:,}" for k, v in self.num_examples.items())
        verdict = "passed" if self.passed else f"FAILED ({len(self.anomalies)} anomalies)"
        return f"validation {verdict}; rows profiled: {rows}"


def to_tfdv_batch(table: pa.Table) -> pa.RecordBatch:
    """TFDV reads list-typed columns: scalars become one-element lists, keys are dropped."""
    columns, names = [], []
    for name in table.column_names:
        if name in _NOT_FEATURES:
            continue
        col = table[name].combine_chunks()
        if not pa.types.is_list(col.type):
            col = pa.ListArray.from_arrays(
                pa.array(range(len(col) + 1), pa.int32()), col.cast(pa.int64())
            )
        columns.append(col)
        names.append(name)
    return pa.RecordBatch.from_arrays(columns, names=names)


def pipeline_options(cfg: ValidateConfig):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions([f"--runner={cfg.beam_runner}", *cfg.beam_options])


def generate_statistics(tables: dict[str, Path], out_dir: Path, cfg: ValidateConfig) -> dict:
    """TFDV statistics of several Parquet tables, computed in ONE Beam pipeline (one runner
    start-up, one branch per table); each saved as `out_dir/<name>.stats.binpb`.

    Returns:
        {name: DatasetFeatureStatisticsList}.
    """
    import apache_beam as beam
    import tensorflow_data_validation as tfdv
    from apache_beam.io.parquetio import ReadFromParquetBatched

    out_dir = Path(out_dir)
    paths = {name: out_dir / f"{name}.stats.binpb" for name in tables}
    with beam.Pipeline(options=pipeline_options(cfg)) as pipeline:
        for name, parquet_path in tables.items():
            _ = (
                pipeline
                | f"Read[{name}]" >> ReadFromParquetBatched(str(parquet_path))
                | f"ToRecordBatch[{name}]" >> beam.Map(to_tfdv_batch)
                | f"Statistics[{name}]" >> tfdv.GenerateStatistics(tfdv.StatsOptions())
                | f"Write[{name}]" >> tfdv.WriteStatisticsToBinaryFile(str(paths[name]))
            )
    return {name: tfdv.load_stats_binary(str(path)) for name, path in paths.items()}


def infer_schema(statistics):
    """A schema from training statistics, relaxed to the guarantees of the raw format.

    Environments: TRAINING (the default for pipeline data) and SERVING, where records carry
    no labels.
    """
    import tensorflow_data_validation as tfdv

    schema = tfdv.infer_schema(statistics, infer_feature_shape=False)
    schema.default_environment.extend([TRAINING, SERVING])
    for feature in schema.feature:
        if feature.name in LABEL_KEYS:
            feature.not_in_environment.append(SERVING)
            feature.presence.min_fraction = 1.0
            feature.value_count.min = feature.value_count.max = 1
            feature.int_domain.min, feature.int_domain.max = 0, 1
        else:
            # A field may be absent from a line, or carry any number of entries.
            feature.presence.min_fraction = 0.0
            feature.ClearField("value_count")
    return schema


def validate_data(
    ingest_dir: Path, out_dir: Path, schema_dir: Path, cfg: ValidateConfig
) -> ValidationResult:
    """Profile every split and table, check each against its schema, write the reports.

    Raises:
        DataValidationError: anomalies were found (after the reports are written).
    """
    import tensorflow_data_validation as tfdv

    out_dir, schema_dir = Path(out_dir), Path(schema_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    anomalies: list[str] = []
    num_examples: dict[str, int] = {}
    inputs = {
        f"{split}_{table}": Path(ingest_dir) / split / filename
        for table, filename in TABLES.items()
        for split in SPLITS
    }
    statistics = generate_statistics(inputs, out_dir, cfg)
    for table in TABLES:
        schema_path = schema_dir / f"{table}.pbtxt"
        schema = tfdv.load_schema_text(str(schema_path)) if schema_path.is_file() else None
        for split in SPLITS:
            stats = statistics[f"{split}_{table}"]
            num_examples[f"{split}/{table}"] = sum(d.num_examples for d in stats.datasets)
            if schema is None:  # first run: propose a schema from the training split
                schema = infer_schema(stats)
                schema_dir.mkdir(parents=True, exist_ok=True)
                tfdv.write_schema_text(schema, str(schema_path))
            if not num_examples[f"{split}/{table}"]:
                continue  # an empty split (e.g. no validation contexts) has nothing to check
            found = tfdv.validate_statistics(stats, schema, environment=TRAINING)
            for name, info in sorted(found.anomaly_info.items()):
                anomalies.append(
                    f"{split}/{table}: feature '{name}': {info.short_description} ({info.description})"
                )
    result = ValidationResult(not anomalies, anomalies, num_examples)
    (out_dir / "report.json").write_text(
        json.dumps(
            {"passed": result.passed, "anomalies": anomalies, "num_examples": num_examples},
            indent=2,
        )
    )
    if anomalies:
        raise DataValidationError("data validation failed:\n  " + "\n  ".join(anomalies))
    return result


def propose_schemas(ingest_dir: Path, out_dir: Path, cfg: ValidateConfig) -> dict[str, str]:
    """Infer a schema per table from the training split; returns {table: pbtxt text}."""
    from google.protobuf import text_format

    inputs = {
        f"train_{table}": Path(ingest_dir) / "train" / filename
        for table, filename in TABLES.items()
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    statistics = generate_statistics(inputs, Path(out_dir), cfg)
    return {
        table: text_format.MessageToString(infer_schema(statistics[f"train_{table}"]))
        for table in TABLES
    }


def write_schemas(folder: Path, schemas: dict[str, str]) -> None:
    """Write {table: pbtxt text} as folder/<table>.pbtxt."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    for table, text in schemas.items():
        (Path(folder) / f"{table}.pbtxt").write_text(text)


def schema_diff(schema_dir: Path, proposed: dict[str, str]) -> str:
    """Unified diff from the committed schemas to the proposed ones ("" when identical)."""
    import difflib

    chunks = []
    for table, text in proposed.items():
        path = Path(schema_dir) / f"{table}.pbtxt"
        old = path.read_text() if path.is_file() else ""
        chunks.extend(
            difflib.unified_diff(
                old.splitlines(keepends=True),
                text.splitlines(keepends=True),
                str(path),
                f"{path} (proposed)",
            )
        )
    return "".join(chunks)


def validate_records(
    records: pa.Table, schema_path: Path, cfg: ValidateConfig, environment: str = SERVING
) -> list[str]:
    """Anomalies of in-memory records (by default serving records, which carry no labels)
    against one environment of a schema."""
    import tempfile

    import apache_beam as beam
    import tensorflow_data_validation as tfdv

    schema = tfdv.load_schema_text(str(schema_path))
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "serving.stats.binpb"
        with beam.Pipeline(options=pipeline_options(cfg)) as pipeline:
            _ = (
                pipeline
                | beam.Create([to_tfdv_batch(records)])
                | tfdv.GenerateStatistics(tfdv.StatsOptions())
                | tfdv.WriteStatisticsToBinaryFile(str(stats_path))
            )
        stats = tfdv.load_stats_binary(str(stats_path))
    found = tfdv.validate_statistics(stats, schema, environment=environment)
    return [
        f"feature '{name}': {info.short_description}"
        for name, info in sorted(found.anomaly_info.items())
    ]
