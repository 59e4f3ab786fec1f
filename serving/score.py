"""Batch scoring: every raw Ali-CCP skeleton file of a folder -> one predictions Parquet file.

Lines are parsed by the ingest parser (`tasks.ingest.parse_block`), a block at a time;
user-side entries are joined by `common_feature_index` (the common file is held in memory,
as in training), and model inputs are built by `serving.records.table_to_inputs`, as for
served requests. Lines that cannot be scored are not dropped silently: they go to
`<out>.bad_lines.csv` (file, line, sample id, reason) and are counted by reason.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from aliccp.format import R_DUP_KEY, R_UNKNOWN_KEY
from models.features import (
    CLICK_LABEL_KEY,
    COMMON_FIELDS,
    COMMON_INDEX_KEY,
    CONVERSION_LABEL_KEY,
    OUTPUT_KEYS,
    SAMPLE_ID_KEY,
    SKELETON_FIELDS,
    ids_key,
    wts_key,
)
from serving.records import predict_inputs, table_to_inputs
from tasks.ingest import RawSource, common_schema, parse_block, read_blocks

_BAD_LINES_HEADER = ["file", "line", "sample_id", "reason"]
_PREDICTIONS_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field(SAMPLE_ID_KEY, pa.string()),
        pa.field(CLICK_LABEL_KEY, pa.int8()),
        pa.field(CONVERSION_LABEL_KEY, pa.int8()),
        *[pa.field(k, pa.float64()) for k in OUTPUT_KEYS],
    ]
)


@dataclass
class ScoreReport:
    """What one `score_raw` run read, scored and set aside, and where it wrote."""

    out_path: Path
    bad_lines_path: Path
    rows_read: int = 0  # skeleton lines read; rows_read == rows_scored + rows_not_scored
    rows_scored: int = 0
    rows_not_scored: int = 0  # bad skeleton lines
    bad_lines: dict[str, int] = field(default_factory=dict)  # reason -> lines (both files)
    unknown_fields: dict[str, int] = field(default_factory=dict)  # field id -> entries skipped
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"scored {self.rows_scored:,} of {self.rows_read:,} impressions from "
            + ", ".join(Path(f).name for f in self.files)
            + f" -> {self.out_path}"
        ]
        if self.bad_lines:
            lines.append(
                f"{sum(self.bad_lines.values()):,} bad lines (impressions not scored, user "
                f"contexts not used), listed in {self.bad_lines_path}:"
            )
            lines += [f"    {reason}: {n:,}" for reason, n in sorted(self.bad_lines.items())]
        for fid, n in sorted(self.unknown_fields.items()):
            lines.append(f"    unknown field {fid!r}: {n:,} entries not used")
        return "\n".join(lines)


def find_score_files(raw_dir: Path) -> list[tuple[RawSource, RawSource]]:
    """Each `sample_skeleton_X.csv[.gz]` of a folder with its `common_features_X.csv[.gz]`.

    Raises:
        FileNotFoundError: the folder holds no skeleton file, or one has no common file.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw data folder not found: {raw_dir}")
    pairs = []
    for skeleton in sorted(raw_dir.glob("sample_skeleton_*.csv*")):
        if not (skeleton.name.endswith(".csv") or skeleton.name.endswith(".csv.gz")):
            continue
        suffix = skeleton.name.removeprefix("sample_skeleton_")
        stem = suffix.removesuffix(".gz").removesuffix(".csv")
        candidates = [
            raw_dir / f"common_features_{stem}.csv",
            raw_dir / f"common_features_{stem}.csv.gz",
        ]
        common = next((c for c in candidates if c.is_file()), None)
        if common is None:
            raise FileNotFoundError(
                f"{skeleton} has no user-side file: expected {candidates[0]} (or .gz)"
            )
        pairs.append((RawSource(skeleton), RawSource(common)))
    if not pairs:
        raise FileNotFoundError(
            f"no sample_skeleton_*.csv (or .csv.gz) in {raw_dir}; scoring reads raw Ali-CCP "
            "skeleton files, each with its common_features_*.csv"
        )
    return pairs


def score_raw(
    raw_dir: Path,
    out_path: Path,
    model: Any,
    *,
    batch_size: int = 4096,
    chunk_bytes: int = 16 * 2**20,
    progress: bool = True,
) -> ScoreReport:
    """Score every raw skeleton file of a folder into one predictions Parquet file.

    Bad lines of both files of each pair go to `<out>.bad_lines.csv` (see the module
    docstring); an impression whose user context is missing or bad is not scored.

    Args:
        raw_dir: folder with `sample_skeleton_X.csv[.gz]` + `common_features_X.csv[.gz]` pairs.
        out_path: the predictions file: `file`, `sample_id`, `click`, `conversion` (the raw
            labels), `p_ctr`, `p_cvr`, `p_ctcvr`.
        model: the Keras model (e.g. from `serving.pyfunc.load_keras_model`).
        batch_size: impressions per model call.
        chunk_bytes: raw bytes parsed at a time.
        progress: show a progress bar (bytes of skeleton text) on stderr.

    Returns:
        Counts of lines read, scored and bad (by reason).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bad_path = out_path.with_name(out_path.name.removesuffix(".parquet") + ".bad_lines.csv")
    report = ScoreReport(out_path, bad_path)
    pairs = find_score_files(raw_dir)
    with (
        open(bad_path, "w", newline="") as bad_fh,
        pq.ParquetWriter(out_path, _PREDICTIONS_SCHEMA, compression="zstd") as writer,
    ):
        bad = _BadLines(csv.writer(bad_fh), report)
        bad.writer.writerow(_BAD_LINES_HEADER)
        for skeleton, common in pairs:
            report.files.append(str(skeleton))
            contexts, index = _read_contexts(common, chunk_bytes, bad)
            with tqdm(
                total=skeleton.size() if skeleton.path.suffix != ".gz" else None,
                unit="B",
                unit_scale=True,
                desc=skeleton.name,
                disable=not progress,
            ) as bar:
                for pb, block_bytes in _parsed_blocks(skeleton, "skeleton", chunk_bytes, report):
                    joined, n_bad = _joined_block(pb, skeleton, contexts, index, bad)
                    for start in range(0, joined.num_rows, batch_size):
                        batch = joined.slice(start, batch_size)
                        writer.write_table(_scored(batch, model, skeleton.name))
                    report.rows_read += pb.n_lines
                    report.rows_scored += joined.num_rows
                    report.rows_not_scored += n_bad
                    bar.update(block_bytes)
    return report


@dataclass
class _BadLines:
    """The bad-lines CSV being written, and the report whose counts by reason it keeps."""

    writer: Any  # a csv.writer
    report: ScoreReport

    def note(self, source: RawSource, line: int, key: Any, reason: str) -> None:
        self.writer.writerow([source.name, line, key, reason])
        self.report.bad_lines[reason] = self.report.bad_lines.get(reason, 0) + 1


def _parsed_blocks(
    source: RawSource, kind: str, chunk_bytes: int, report: ScoreReport
) -> Iterator[tuple[Any, int]]:
    """Parsed blocks of a raw file (in-process), with the bytes each covered."""
    for block, first_line in read_blocks(source, chunk_bytes):
        pb = parse_block(block, first_line, kind, 0.0)
        for fid, n in pb.unknown_fields.items():
            report.unknown_fields[fid] = report.unknown_fields.get(fid, 0) + n
        yield pb, len(block) + 1


def _parse_errors(pb: Any) -> list[tuple[int, Any, str]]:
    """(line within the block, sample id or key, reason) of the lines the parser rejected."""
    return list(zip(pb.bad_lines.tolist(), pb.bad_ids, pb.bad_reasons, strict=True))


def _read_contexts(
    source: RawSource, chunk_bytes: int, bad: _BadLines
) -> tuple[pa.Table, pd.Index]:
    """The user-side table of a common file (first occurrence of each key) and its index."""
    tables, lines = [], []
    for pb, _ in _parsed_blocks(source, "common", chunk_bytes, bad.report):
        for line, key, reason in _parse_errors(pb):
            bad.note(source, pb.first_line + line, key, reason)
        tables.append(pb.table)
        lines.append(np.delete(np.arange(pb.n_lines), pb.bad_lines) + pb.first_line)
    if not tables:  # an empty file
        tables.append(common_schema().empty_table())
    contexts = pa.concat_tables(tables)
    keys = pd.Index(contexts[COMMON_INDEX_KEY].to_pandas())
    duplicated = keys.duplicated(keep="first")
    if duplicated.any():
        all_lines = np.concatenate(lines)
        for r in np.flatnonzero(duplicated):
            bad.note(source, int(all_lines[r]), keys[r], R_DUP_KEY)
        contexts = contexts.filter(pa.array(~duplicated))
        keys = keys[~duplicated]
    return contexts, keys


def _joined_block(
    pb: Any, skeleton: RawSource, contexts: pa.Table, index: pd.Index, bad: _BadLines
) -> tuple[pa.Table, int]:
    """A parsed skeleton block's scorable impressions with their user-side lists, and the
    number of its bad lines (rejected by the parser, or with an unknown
    `common_feature_index`), which are noted in line order."""
    table = pb.table
    rows = index.get_indexer(table[COMMON_INDEX_KEY].to_pandas())
    known = rows >= 0
    line_of_row = np.delete(np.arange(pb.n_lines), pb.bad_lines)
    entries = _parse_errors(pb) + [
        (int(line_of_row[r]), table[SAMPLE_ID_KEY][r].as_py(), R_UNKNOWN_KEY)
        for r in np.flatnonzero(~known)
    ]
    for line, key, reason in sorted(entries, key=lambda e: e[0]):
        bad.note(skeleton, pb.first_line + line, key, reason)
    joined = _join(table.filter(pa.array(known)), contexts.take(pa.array(rows[known])))
    return joined, len(entries)


def _join(impressions: pa.Table, contexts: pa.Table) -> pa.Table:
    """Impression rows with their user-side lists alongside (same row order)."""
    columns = {
        name: impressions[name] for name in (SAMPLE_ID_KEY, CLICK_LABEL_KEY, CONVERSION_LABEL_KEY)
    }
    for fields, source in ((SKELETON_FIELDS, impressions), (COMMON_FIELDS, contexts)):
        for f in fields:
            columns[ids_key(f)] = source[ids_key(f)]
            columns[wts_key(f)] = source[wts_key(f)]
    return pa.table(columns)


def _scored(batch: pa.Table, model: Any, file_name: str) -> pa.Table:
    """A batch's predictions as rows of the predictions file."""
    preds = predict_inputs(model, table_to_inputs(batch))
    return pa.table(
        {
            "file": pa.array([file_name] * batch.num_rows, pa.string()),
            SAMPLE_ID_KEY: batch[SAMPLE_ID_KEY],
            CLICK_LABEL_KEY: batch[CLICK_LABEL_KEY],
            CONVERSION_LABEL_KEY: batch[CONVERSION_LABEL_KEY],
            **{k: pa.array(preds[k].to_numpy()) for k in OUTPUT_KEYS},
        },
        schema=_PREDICTIONS_SCHEMA,
    )
