"""Batch scoring as a Beam pipeline: `esmm score --beam-options ...`.

The same inputs, outputs and bad-line report as the local scorer (`serving.score`), whose
parsing, joining and bad-line code it runs: one element per raw file pair is parsed and
joined with its user contexts (`_ParsePair`), its batches are spread over the workers and
scored by Beam's `RunInference` with `EsmmModelHandler` (our saved `.keras` model, loaded
once per worker process), and the predictions, bad lines and counts are written as shards.
The launcher then puts the shards back in the local scorer's order (file pair, then line)
into one predictions file and one bad-lines CSV.

Workers reach every file through Beam's filesystems: with a staging folder (`gs://`,
`s3://`, `hdfs://`, a shared mount) the raw files and the model are copied there first and
the shards written there (`tasks.beam_staging`); without one, this machine's paths are used
(the DirectRunner, or workers on this machine).
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import ModelHandler

from serving.score import (
    _BAD_LINES_HEADER,
    _PREDICTIONS_SCHEMA,
    ScoreReport,
    _BadLines,
    _joined_block,
    _parsed_blocks,
    _read_contexts,
    _scored,
    find_score_files,
)
from tasks.beam_staging import Staging
from tasks.ingest import RawSource

_ORDER = (pa.field("_pair", pa.int32()), pa.field("_row", pa.int64()))  # sort keys, dropped
_SHARD_SCHEMA = pa.schema([*_PREDICTIONS_SCHEMA, *_ORDER])


def score_raw_beam(
    raw_dir: Path,
    out_path: Path,
    model_path: Path,
    beam_options: Sequence[str],
    *,
    staging: str = "",
    batch_size: int = 4096,
    chunk_bytes: int = 16 * 2**20,
) -> ScoreReport:
    """Score every raw skeleton file of a folder in a Beam pipeline, as `score_raw` does.

    Args:
        raw_dir: folder of `sample_skeleton_X.csv[.gz]` + `common_features_X.csv[.gz]` pairs.
        out_path: the predictions file (the local scorer's columns and row order); the bad
            lines go to `<out>.bad_lines.csv`.
        model_path: the saved `.keras` model.
        beam_options: Beam flags; without `--runner`, the DirectRunner.
        staging: a folder every worker reaches (see the module docstring); empty: none.
        batch_size: impressions per model call (and per element scored).
        chunk_bytes: raw bytes parsed at a time.

    Returns:
        Counts of lines read, scored and bad (by reason).
    """
    from apache_beam.ml.inference.base import RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bad_path = out_path.with_name(out_path.name.removesuffix(".parquet") + ".bad_lines.csv")
    pairs = find_score_files(raw_dir)
    options = list(beam_options)
    if not any(o.startswith("--runner") for o in options):
        options.insert(0, "--runner=DirectRunner")  # never Beam's default (a download)
    with Staging(staging) as stage, tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        shards = stage.folder or tmp  # where the pipeline writes
        specs = [
            (
                i,
                stage.put(s.path, f"{i}-{s.name}"),
                s.name,
                stage.put(c.path, f"{i}-{c.name}"),
                c.name,
            )
            for i, (s, c) in enumerate(pairs)
        ]
        handler = EsmmModelHandler(stage.put(Path(model_path), "model.keras"))
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            parsed = (
                pipeline
                | "Pairs" >> beam.Create(specs)
                | "Parse"
                >> beam.ParDo(ParsePair(batch_size, chunk_bytes)).with_outputs(
                    "bad", "counts", main="batches"
                )
            )
            _ = (
                parsed.batches
                | "Spread" >> beam.Reshuffle()
                | "Score" >> RunInference(handler)
                | "WritePredictions"
                >> beam.io.WriteToParquetBatched(f"{shards}/predictions", schema=_SHARD_SCHEMA)
            )
            _ = parsed.bad | "WriteBad" >> beam.io.WriteToText(f"{shards}/bad")
            _ = parsed.counts | "WriteCounts" >> beam.io.WriteToText(f"{shards}/counts")
        local = Path(tmp)
        fetched = {
            kind: [
                stage.get(p, local / f"{kind}-{n}") if stage.folder else Path(p)
                for n, p in enumerate(stage.match(f"{shards}/{kind}*"))
            ]
            for kind in ("predictions", "bad", "counts")
        }
        _write_predictions(fetched["predictions"], out_path, batch_size)
        report = ScoreReport(out_path, bad_path, files=[str(s) for s, _ in pairs])
        _write_bad_lines(fetched["bad"], bad_path, report)
        _add_counts(fetched["counts"], report)
    return report


class EsmmModelHandler(ModelHandler):
    """Beam `ModelHandler` of our saved Keras model: one element is one batch of joined
    impressions, `(file name, table, pair, first row)`, scored as the local scorer does."""

    def __init__(self, model_path: str):
        super().__init__()
        self.model_path = model_path

    def load_model(self) -> Any:
        return _load_keras(self.model_path)

    def run_inference(
        self, batch: Sequence[tuple], model: Any, inference_args: dict | None = None
    ) -> Iterable[pa.Table]:
        for file_name, table, pair, row in batch:
            n = table.num_rows
            scored = _scored(table, model, file_name)
            scored = scored.append_column(_ORDER[0], pa.array([pair] * n, pa.int32()))
            yield scored.append_column(_ORDER[1], pa.array(range(row, row + n), pa.int64()))

    def batch_elements_kwargs(self) -> dict[str, int]:
        return {"min_batch_size": 1, "max_batch_size": 1}  # an element is already a batch


def _load_keras(path: str) -> Any:
    """The Keras model at a local or Beam-filesystem path (copied to a temporary file)."""
    import keras

    import models.esmm  # noqa: F401  (registers the custom layers)

    if Path(path).is_file():
        return keras.models.load_model(path, compile=False)
    with tempfile.TemporaryDirectory() as tmp:
        local = _local_copy(path, Path(tmp) / "model.keras")
        return keras.models.load_model(local, compile=False)


class _Rows:
    """A csv.writer stand-in that keeps the rows (the bad lines of one file pair)."""

    def __init__(self) -> None:
        self.rows: list[list[Any]] = []

    def writerow(self, row: list[Any]) -> None:
        self.rows.append([str(v) if not isinstance(v, int | float) else v for v in row])


def _local_source(path: str, name: str, tmp: str) -> RawSource:
    """A raw file as this worker reads it: its own path, or a copy under its own name."""
    if Path(path).is_file() and Path(path).name == name:
        return RawSource(Path(path))
    return RawSource(_local_copy(path, Path(tmp) / name))


def _local_copy(path: str, local: Path) -> Path:
    """Copy a file from any Beam filesystem to `local`."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as src, open(local, "wb") as dst:
        while chunk := src.read(16 << 20):
            dst.write(chunk)
    return local


class ParsePair(beam.DoFn):
    """One file pair parsed and joined: batches `(file name, table, pair, first row)` (main
    output), its bad lines in the local scorer's order (`bad`) and its counts (`counts`),
    both as JSON lines."""

    def __init__(self, batch_size: int, chunk_bytes: int):
        super().__init__()
        self.batch_size, self.chunk_bytes = batch_size, chunk_bytes

    def process(self, spec: tuple[int, str, str, str, str]) -> Iterator[Any]:
        pair, skeleton_path, skeleton_name, common_path, common_name = spec
        report = ScoreReport(Path(), Path())
        bad = _BadLines(_Rows(), report)
        with tempfile.TemporaryDirectory() as tmp:
            skeleton = _local_source(skeleton_path, skeleton_name, tmp)
            common = _local_source(common_path, common_name, tmp)
            contexts, index = _read_contexts(common, self.chunk_bytes, bad)
            for pb, _ in _parsed_blocks(skeleton, "skeleton", self.chunk_bytes, report):
                joined, n_bad = _joined_block(pb, skeleton, contexts, index, bad)
                for start in range(0, joined.num_rows, self.batch_size):
                    # A copy, not a slice: a pickled Arrow slice carries its whole parent's
                    # buffers (pyarrow 10), so every batch would weigh a whole block.
                    rows = np.arange(start, min(start + self.batch_size, joined.num_rows))
                    batch = joined.take(pa.array(rows))
                    yield (skeleton_name, batch, pair, report.rows_scored + start)
                report.rows_read += pb.n_lines
                report.rows_scored += joined.num_rows
                report.rows_not_scored += n_bad
        for seq, row in enumerate(bad.writer.rows):
            yield beam.pvalue.TaggedOutput("bad", json.dumps([pair, seq, row]))
        counts = {
            "rows_read": report.rows_read,
            "rows_scored": report.rows_scored,
            "rows_not_scored": report.rows_not_scored,
            "unknown_fields": report.unknown_fields,
        }
        yield beam.pvalue.TaggedOutput("counts", json.dumps(counts))


def _write_predictions(shards: list[Path], out_path: Path, batch_size: int) -> None:
    """The prediction shards, in the local scorer's order, as one Parquet file."""
    tables = [pq.read_table(p, schema=_SHARD_SCHEMA) for p in shards]
    table = pa.concat_tables(tables) if tables else _SHARD_SCHEMA.empty_table()
    table = table.sort_by([("_pair", "ascending"), ("_row", "ascending")])
    table = table.drop(["_pair", "_row"])
    with pq.ParquetWriter(out_path, _PREDICTIONS_SCHEMA, compression="zstd") as writer:
        writer.write_table(table, row_group_size=batch_size)


def _write_bad_lines(shards: list[Path], bad_path: Path, report: ScoreReport) -> None:
    """The bad-line shards, in the local scorer's order, as its CSV; counted by reason."""
    entries = [json.loads(line) for p in shards for line in p.read_text().splitlines() if line]
    entries.sort(key=lambda e: (e[0], e[1]))
    with open(bad_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(_BAD_LINES_HEADER)
        for _, _, row in entries:
            writer.writerow(row)
            report.bad_lines[row[3]] = report.bad_lines.get(row[3], 0) + 1


def _add_counts(shards: list[Path], report: ScoreReport) -> None:
    """The file pairs' counts, summed into `report`."""
    for p in shards:
        for line in p.read_text().splitlines():
            counts = json.loads(line)
            report.rows_read += counts["rows_read"]
            report.rows_scored += counts["rows_scored"]
            report.rows_not_scored += counts["rows_not_scored"]
            for fid, n in counts["unknown_fields"].items():
                report.unknown_fields[fid] = report.unknown_fields.get(fid, 0) + n
