"""Statistics of the validation step: what TFDV sees of a row, and the Beam pipeline.

Statistics are computed by TFDV's Beam transform over record batches read straight from the
ingested Parquet files, for the impression table and the user-side table separately (the
denormalised join is never built). The runner is named explicitly: Beam's default local
runner tries to download a binary, which fails offline. Any Beam flags (Flink, Spark,
Dataflow) pass through `validate.beam_options`.

What TFDV sees of a row (`to_tfdv_batch`): ids as categorical strings (`ids_F`), weights as
floats (`wts_F`), an absent field (an empty list) as a missing value, the labels, and the
derived `clicked_conversion` = click * conversion, from which the statistics alone give the
conversions without a click and the conversion rate given a click (`label_rates`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.features import (
    CLICK_LABEL_KEY,
    COMMON_INDEX_KEY,
    CONVERSION_LABEL_KEY,
    LABEL_KEYS,
    SAMPLE_ID_KEY,
)
from tasks.beam_staging import Staging
from tasks.config import ValidateConfig
from tasks.progress import FileProgress, record

TABLES: dict[str, str] = {"impressions": "impressions.parquet", "common": "common.parquet"}
CLICKED_CONVERSION_KEY = "clicked_conversion"  # derived: click * conversion
# Label columns as TFDV sees them: absent when serving, never compared for drift (the label
# rates are checked on their own).
LABEL_COLUMNS: tuple[str, ...] = (*LABEL_KEYS, CLICKED_CONVERSION_KEY)
# Keys identify rows; they are not features.
_NOT_FEATURES = (SAMPLE_ID_KEY, COMMON_INDEX_KEY)


@dataclass(frozen=True)
class LabelRates:
    impressions: int
    clicks: int
    conversions: int
    clicked_conversions: int

    @property
    def ctr(self) -> float:
        return self.clicks / self.impressions if self.impressions else float("nan")

    @property
    def cvr(self) -> float:
        """Conversion rate given a click."""
        return self.clicked_conversions / self.clicks if self.clicks else float("nan")


def _as_lists(col: pa.Array, value_type: pa.DataType) -> pa.Array:
    """A list column with its values cast, and empty lists (an absent field) as nulls."""
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = pc.list_flatten(col).cast(value_type)
    # A null offset marks a null list.
    return pa.ListArray.from_arrays(pa.array(offsets, mask=np.append(lengths == 0, False)), values)


def to_tfdv_batch(table: pa.Table | pa.RecordBatch) -> pa.RecordBatch:
    """The record batch TFDV profiles: list columns, ids as strings, empty lists missing,
    keys dropped, and `clicked_conversion` added when both labels are there."""
    columns, names = [], []
    for name in table.column_names:
        if name in _NOT_FEATURES:
            continue
        col = table.column(name)
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        if name.startswith("ids_"):
            col = _as_lists(col, pa.string())  # ids are categories, not quantities
        elif name.startswith("wts_"):
            col = _as_lists(col, pa.float32())
        else:  # a label: one int per row
            col = pa.ListArray.from_arrays(
                pa.array(np.arange(len(col) + 1, dtype=np.int32)), col.cast(pa.int64())
            )
        columns.append(col)
        names.append(name)
    if CLICK_LABEL_KEY in names and CONVERSION_LABEL_KEY in names:
        click = pc.list_flatten(columns[names.index(CLICK_LABEL_KEY)])
        conversion = pc.list_flatten(columns[names.index(CONVERSION_LABEL_KEY)])
        both = pc.multiply(click, conversion)
        columns.append(
            pa.ListArray.from_arrays(pa.array(np.arange(len(both) + 1, dtype=np.int32)), both)
        )
        names.append(CLICKED_CONVERSION_KEY)
    return pa.RecordBatch.from_arrays(columns, names=names)


def pipeline_options(cfg: ValidateConfig):
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions([f"--runner={cfg.beam_runner}", *cfg.beam_options])


def import_tfdv():
    """TFDV, imported without its notice that IPython is missing (its display helpers are
    for notebooks; the reports here are built without them). TFDV is imported only where it
    is used: it takes seconds and `esmm --help` must not wait for it."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        import tensorflow_data_validation as tfdv
    return tfdv


def _counted(table: pa.Table, progress_path: str) -> pa.RecordBatch:
    """`to_tfdv_batch`, counting the rows for the progress line (runs in Beam's workers)."""
    record(progress_path, table.num_rows)
    return to_tfdv_batch(table)


def generate_statistics(tables: dict[str, Path], out_dir: Path, cfg: ValidateConfig) -> dict:
    """TFDV statistics of several Parquet tables, computed in ONE Beam pipeline (one runner
    start-up, one branch per table); each saved as `out_dir/<name>.stats.binpb`.

    Returns:
        {name: DatasetFeatureStatisticsList}.
    """
    import apache_beam as beam

    tfdv = import_tfdv()
    from apache_beam.io.parquetio import ReadFromParquetBatched

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.stats.binpb" for name in tables}
    for path in paths.values():  # a fresh run, not Beam's warning about overwriting
        path.unlink(missing_ok=True)
    rows = sum(pq.ParquetFile(path).metadata.num_rows for path in tables.values())
    progress = FileProgress("validate: statistics", rows, "rows", out_dir / ".progress")
    # Remote workers read and write through Beam's filesystems (validate.beam_staging).
    with Staging(cfg.beam_staging) as staging:
        with progress, beam.Pipeline(options=pipeline_options(cfg)) as pipeline:
            for name, parquet_path in tables.items():
                _ = (
                    pipeline
                    | f"Read[{name}]" >> ReadFromParquetBatched(staging.put(parquet_path, name))
                    | f"ToRecordBatch[{name}]" >> beam.Map(_counted, str(progress.path))
                    | f"Statistics[{name}]" >> tfdv.GenerateStatistics(tfdv.StatsOptions())
                    | f"Write[{name}]"
                    >> tfdv.WriteStatisticsToBinaryFile(staging.path(paths[name]))
                )
        for path in paths.values():
            staging.get(staging.path(path), path)
    return {name: tfdv.load_stats_binary(str(path)) for name, path in paths.items()}


def records_statistics(records: pa.Table, cfg: ValidateConfig):
    """TFDV statistics of in-memory records (one Beam pipeline over one batch)."""
    import tempfile

    import apache_beam as beam

    tfdv = import_tfdv()
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = Path(tmp) / "serving.stats.binpb"
        with beam.Pipeline(options=pipeline_options(cfg)) as pipeline:
            _ = (
                pipeline
                | beam.Create([to_tfdv_batch(records)])
                | tfdv.GenerateStatistics(tfdv.StatsOptions())
                | tfdv.WriteStatisticsToBinaryFile(str(stats_path))
            )
        return tfdv.load_stats_binary(str(stats_path))


def feature_stats(statistics) -> dict:
    """{feature name: FeatureNameStatistics} of a one-dataset statistics list."""
    if not statistics.datasets:
        return {}
    return {f.path.step[0]: f for f in statistics.datasets[0].features}


def num_examples(statistics) -> int:
    """Rows profiled in a statistics list."""
    return sum(d.num_examples for d in statistics.datasets)


def label_rates(statistics) -> LabelRates:
    """Impressions, clicks, conversions and clicked conversions from impression statistics."""
    feats = feature_stats(statistics)

    def total(key: str) -> int:
        if key not in feats:
            return 0
        num = feats[key].num_stats
        return round(num.mean * num.common_stats.num_non_missing)

    return LabelRates(
        num_examples(statistics),
        total(CLICK_LABEL_KEY),
        total(CONVERSION_LABEL_KEY),
        total(CLICKED_CONVERSION_KEY),
    )
