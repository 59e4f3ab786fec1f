"""Serving: ESMM as an MLflow pyfunc model that takes raw records, and batch scoring of raw files.

Request format. A request holds one or more records; a record holds the feature entries of
one impression, user side and impression side together, as the raw Ali-CCP format carries
them: per field name (`"101"`, `"109_14"`, `"205"`, ... of `models.features.ALL_FIELDS`) a
list of `[id, weight]` pairs, where `id` is the raw feature id (a JSON integer, 0 <= id <
2**63) and `weight` the entry's value (a finite JSON number, 1.0 for plain categorical
fields). Single-valued fields are lists of one pair. A field absent from the impression is
omitted or given as `[]` (both mean the same); an unknown field name is an error. Ids the
model has no embedding for go to its out-of-vocabulary bucket. On the wire each record is
the object under `"features"`, in MLflow's `dataframe_records` request form:

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '
      {"dataframe_records": [{"features": {"101": [[17, 1.0]], "205": [[4031, 1.0]],
                                           "109_14": [[88, 3.0], [90, 1.0]], "301": [[1, 1.0]]}}]}'
    {"predictions": [{"p_ctr": 0.041, "p_cvr": 0.012, "p_ctcvr": 0.00049}]}

`{"inputs": [...]}` with the same records works too, but MLflow deep-copies that form while
parsing it: on 2 cores a batch of 100 realistic records took 2.5x longer (benchmarks/serving.py).
A malformed request is answered 400 with a message naming the record, field, entry and what
is wrong. The model signature declares `features` as an object whose properties are the 23
fields (optional, values `Any`): MLflow's schema check then rejects unknown fields by name,
and this module checks the values, with clearer messages than MLflow's typed arrays give
(and an `[int, float]` pair has no MLflow type).

Model inputs are built from records or from raw files by one function, `table_to_inputs`.
"""

from __future__ import annotations

import csv
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.features import (
    ALL_FIELDS,
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
from tasks.ingest import (
    R_DUP_KEY,
    R_UNKNOWN_KEY,
    RawSource,
    _common_schema,
    parse_block,
    read_blocks,
)
from tasks.inputs import pad_fields, split_fields

FEATURES_KEY = "features"  # the request column holding each record's field -> pairs object
KERAS_ARTIFACT = "keras_model"  # the logged model's artifact key of the `.keras` file
SERVING_MODEL_CODE = Path(__file__).with_name("serving_model.py")
# What the logged model needs to be loaded again; pinned like requirements.lock (the serving
# code also imports pandas, pyarrow, pydantic and yaml through tasks/ and models/).
SERVING_REQUIREMENTS = [
    "mlflow==3.17.2",
    "tensorflow==2.16.2",
    "keras==3.15.1",
    "numpy==1.26.4",
    "pandas==1.5.3",
    "pyarrow==10.0.1",
    "pydantic==2.14.4",
    "pyyaml==6.0.4",
]
EXAMPLE_RECORD: dict[str, list[list[float]]] = {
    "101": [[17, 1.0]],
    "124": [[2, 1.0]],
    "109_14": [[88, 3.0], [90, 1.0]],
    "205": [[4031, 1.0]],
    "206": [[12, 1.0]],
    "210": [[501, 1.0], [502, 1.0]],
    "301": [[1, 1.0]],
}

_FIELDS = frozenset(ALL_FIELDS)
_MAX_ID = 2**63  # ids are int64
_MAX_PROBLEMS = 10  # problems listed in one error message
_BAD_LINES_HEADER = ["file", "line", "sample_id", "reason"]


class InvalidRecordError(ValueError):
    """A request record is malformed; the message names record, field, entry and problem."""


# --- records -> model inputs ------------------------------------------------------------------


def records_to_table(records: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Validate records (field -> `[id, weight]` pairs) into `ids_F`/`wts_F` list columns.

    Raises:
        InvalidRecordError: no records, or any malformed record; the message lists the
            first problems, each naming the record index, field and entry.
    """
    if isinstance(records, Mapping | str | bytes) or not isinstance(records, Sequence):
        raise InvalidRecordError(f"records must be a list of objects, got {type(records).__name__}")
    if len(records) == 0:
        raise InvalidRecordError("the request holds no records")
    problems: list[str] = []
    ids: dict[str, list[int]] = {f: [] for f in ALL_FIELDS}
    wts: dict[str, list[float]] = {f: [] for f in ALL_FIELDS}
    lengths = {f: np.zeros(len(records), dtype=np.int32) for f in ALL_FIELDS}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            problems.append(
                f"record {i}: must be an object mapping field names to [id, weight] pairs, "
                f"got {_describe(record)}"
            )
            continue
        for name, entries in record.items():
            where = f"record {i}, field {name!r}"
            if name not in _FIELDS:
                problems.append(f"{where}: unknown field; fields are {', '.join(ALL_FIELDS)}")
                continue
            if isinstance(entries, str | bytes | Mapping) or not isinstance(
                entries, Sequence | np.ndarray
            ):
                problems.append(
                    f"{where}: must be a list of [id, weight] pairs, got {_describe(entries)}"
                )
                continue
            for j, pair in enumerate(entries):
                # Fast path for what JSON decodes to: exact types, no ABC checks.
                if type(pair) is list and len(pair) == 2:
                    fid, weight = pair
                    if (
                        type(fid) is int
                        and 0 <= fid < _MAX_ID
                        and (type(weight) is float and weight - weight == 0 or type(weight) is int)
                    ):  # w - w == 0 only for finite w
                        ids[name].append(fid)
                        wts[name].append(weight)
                        continue
                problem = _pair_problem(pair)
                if problem:
                    problems.append(f"{where}, entry {j}: {problem}")
                    continue
                ids[name].append(int(pair[0]))
                wts[name].append(float(pair[1]))
            lengths[name][i] = len(entries)
        if len(problems) >= _MAX_PROBLEMS:
            break
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        more = " (and possibly more)" if len(problems) >= _MAX_PROBLEMS else ""
        raise InvalidRecordError(
            f"invalid request, {len(shown)} problem(s){more}: " + "; ".join(shown)
        )
    columns = {}
    for f in ALL_FIELDS:
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths[f])]).astype(np.int32))
        columns[ids_key(f)] = pa.ListArray.from_arrays(offsets, pa.array(ids[f], pa.int64()))
        columns[wts_key(f)] = pa.ListArray.from_arrays(offsets, pa.array(wts[f], pa.float32()))
    return pa.table(columns)


def table_to_inputs(table: pa.Table) -> dict[str, np.ndarray]:
    """Model inputs from a table with the `ids_F`/`wts_F` list columns of every field.

    The one place serving and scoring build model inputs: ragged lists are padded per
    batch with id 0 and weight 0, as in training (`tasks.train.pad_fields`), and every record
    is its own user context (`models.esmm.per_impression_inputs`).
    """
    from models.esmm import per_impression_inputs

    inputs = split_fields(ALL_FIELDS, *pad_fields(table, ALL_FIELDS))  # (rows, longest list)
    return per_impression_inputs(inputs)


def records_to_inputs(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Model inputs from request records (see the module docstring for their format).

    Raises:
        InvalidRecordError: a malformed request, named precisely.
    """
    return table_to_inputs(records_to_table(records))


def table_to_records(table: pa.Table) -> list[dict[str, list[list[float]]]]:
    """Request records from `ids_F`/`wts_F` list columns (absent fields left out)."""
    records: list[dict[str, list[list[float]]]] = [{} for _ in range(table.num_rows)]
    for f in ALL_FIELDS:
        id_lists = table[ids_key(f)].to_pylist()
        wt_lists = table[wts_key(f)].to_pylist()
        for record, field_ids, field_wts in zip(records, id_lists, wt_lists, strict=True):
            if field_ids:
                record[f] = [[i, w] for i, w in zip(field_ids, field_wts, strict=True)]
    return records


def model_input_records(model_input: Any) -> list[Mapping[str, Any]]:
    """The records of a pyfunc `predict` input: a DataFrame with a `features` column (what
    the scoring server passes), or a list of `{"features": record}` objects."""
    if isinstance(model_input, pd.DataFrame):
        if FEATURES_KEY not in model_input.columns:
            raise InvalidRecordError(
                f"the input has no {FEATURES_KEY!r} column; each record is "
                f'{{"{FEATURES_KEY}": {{field: [[id, weight], ...]}}}}'
            )
        return model_input[FEATURES_KEY].tolist()
    if isinstance(model_input, Sequence) and not isinstance(model_input, str | bytes):
        records = []
        for i, item in enumerate(model_input):
            if not isinstance(item, Mapping) or set(item) != {FEATURES_KEY}:
                raise InvalidRecordError(
                    f"record {i}: must be an object with the single key {FEATURES_KEY!r}, "
                    f"got {_describe(item)}"
                )
            records.append(item[FEATURES_KEY])
        return records
    raise InvalidRecordError(
        f"the input must be a list of records, got {type(model_input).__name__}"
    )


def predict_records(model: Any, records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """`p_ctr`, `p_cvr`, `p_ctcvr` (float64), one row per record, in request order."""
    return _predict(model, records_to_inputs(records))


def _predict(model: Any, inputs: dict[str, np.ndarray]) -> pd.DataFrame:
    outputs = model.predict_batch(inputs)
    return pd.DataFrame(
        {k: np.asarray(outputs[k], dtype=np.float64).reshape(-1) for k in OUTPUT_KEYS}
    )


def _pair_problem(pair: Any) -> str | None:
    """What is wrong with one `[id, weight]` entry, or None."""
    if isinstance(pair, str | bytes | Mapping) or not isinstance(pair, Sequence | np.ndarray):
        return f"must be an [id, weight] pair, got {_describe(pair)}"
    if len(pair) != 2:
        return f"must be an [id, weight] pair, got {len(pair)} value(s): {_short(pair)}"
    fid, weight = pair[0], pair[1]
    if isinstance(fid, bool) or not isinstance(fid, numbers.Integral):
        return f"id must be an integer, got {_describe(fid)}"
    if not 0 <= int(fid) < _MAX_ID:
        return f"id must be in [0, 2**63), got {int(fid)}"
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        return f"weight must be a number, got {_describe(weight)}"
    if not math.isfinite(float(weight)):
        return f"weight must be finite, got {float(weight)}"
    return None


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {_short(value)}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- logging the served model -------------------------------------------------------------


def serving_signature() -> Any:
    """Input: a `features` object whose optional properties are the 23 fields; output: the
    three probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Object, Property, Schema

    features = Object([Property(f, AnyType(), required=False) for f in ALL_FIELDS])
    return ModelSignature(
        inputs=Schema([ColSpec(features, name=FEATURES_KEY)]),
        outputs=Schema([ColSpec("double", name=k) for k in OUTPUT_KEYS]),
    )


def log_serving_model(
    model_path: Path,
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    **kwargs: Any,
) -> Any:
    """Log a trained `.keras` model as the served pyfunc model (MLflow models-from-code).

    The model's code is `serving/serving_model.py` (not a pickle); the `.keras` file is its
    artifact (`artifacts/model.keras` in the logged model, so `**/*.keras` finds it), and the
    `models/`, `tasks/`, `aliccp/` and `serving/` packages ship with it, so it loads without this project
    installed. Call it inside an active MLflow run.

    Args:
        model_path: the trained model (`artifacts/train/model.keras`).
        name: the logged model's name within the run.
        registered_model_name: also register it under this name (a new version).
        **kwargs: passed on to `mlflow.pyfunc.log_model` (e.g. `input_example`).

    Returns:
        MLflow's `ModelInfo` (`model_uri`, `registered_model_version`, ...).
    """
    import mlflow

    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"trained model not found: {model_path}")
    repo = Path(__file__).resolve().parents[1]
    options: dict[str, Any] = {
        "signature": serving_signature(),
        "input_example": [{FEATURES_KEY: EXAMPLE_RECORD}],
        "pip_requirements": SERVING_REQUIREMENTS,
        "code_paths": [str(repo / pkg) for pkg in ("models", "tasks", "aliccp", "serving")],
        **kwargs,
    }
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(SERVING_MODEL_CODE),
        artifacts={KERAS_ARTIFACT: str(model_path)},
        registered_model_name=registered_model_name,
        **options,
    )


def load_keras_model(model_uri: str) -> Any:
    """The Keras model inside a served pyfunc model (e.g. `models:/esmm@champion`)."""
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().keras_model


def serve_command(model_uri: str, host: str, port: int, workers: int = 1) -> list[str]:
    """The `mlflow models serve` command line serving `model_uri` from this environment."""
    import sys

    return [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "--model-uri",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]


# --- batch scoring of raw files -------------------------------------------------------------


@dataclass
class ScoreReport:
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

    Lines are parsed by the ingest parser (`tasks.ingest.parse_block`), a block at a time;
    user-side entries are joined by `common_feature_index` (the common file is held in
    memory, as in training). Lines that cannot be scored are not dropped silently: they go to
    `<out>.bad_lines.csv` (file, line, sample id, reason) and are counted by reason.

    Args:
        raw_dir: folder with `sample_skeleton_X.csv[.gz]` + `common_features_X.csv[.gz]` pairs.
        out_path: the predictions file: `file`, `sample_id`, `click`, `conversion` (the raw
            labels), `p_ctr`, `p_cvr`, `p_ctcvr`.
        model: the Keras model (e.g. from `load_keras_model`).
        batch_size: impressions per model call.
        chunk_bytes: raw bytes parsed at a time.
        progress: show a progress bar (bytes of skeleton text) on stderr.

    Returns:
        Counts of lines read, scored and bad (by reason).
    """
    from tqdm import tqdm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bad_path = out_path.with_name(out_path.name.removesuffix(".parquet") + ".bad_lines.csv")
    report = ScoreReport(out_path, bad_path)
    schema = pa.schema(
        [
            pa.field("file", pa.string()),
            pa.field(SAMPLE_ID_KEY, pa.string()),
            pa.field(CLICK_LABEL_KEY, pa.int8()),
            pa.field(CONVERSION_LABEL_KEY, pa.int8()),
            *[pa.field(k, pa.float64()) for k in OUTPUT_KEYS],
        ]
    )
    pairs = find_score_files(raw_dir)
    with (
        open(bad_path, "w", newline="") as bad_fh,
        pq.ParquetWriter(out_path, schema, compression="zstd") as writer,
    ):
        bad = csv.writer(bad_fh)
        bad.writerow(_BAD_LINES_HEADER)

        def note_bad(source: RawSource, line: int, key: Any, reason: str) -> None:
            bad.writerow([source.name, line, key, reason])
            report.bad_lines[reason] = report.bad_lines.get(reason, 0) + 1

        for skeleton, common in pairs:
            report.files.append(str(skeleton))
            contexts, index = _read_contexts(common, chunk_bytes, note_bad, report)
            total = skeleton.size() if skeleton.path.suffix != ".gz" else None
            with tqdm(
                total=total, unit="B", unit_scale=True, desc=skeleton.name, disable=not progress
            ) as bar:
                for pb, block_bytes in _parsed_blocks(skeleton, "skeleton", chunk_bytes, report):
                    table = pb.table
                    rows = index.get_indexer(table[COMMON_INDEX_KEY].to_pandas())
                    known = rows >= 0
                    line_of_row = np.delete(np.arange(pb.n_lines), pb.bad_lines)
                    entries = _parse_errors(pb) + [
                        (int(line_of_row[r]), table[SAMPLE_ID_KEY][r].as_py(), R_UNKNOWN_KEY)
                        for r in np.flatnonzero(~known)
                    ]
                    for line, key, reason in sorted(entries, key=lambda e: e[0]):
                        note_bad(skeleton, pb.first_line + line, key, reason)
                    joined = _join(
                        table.filter(pa.array(known)), contexts.take(pa.array(rows[known]))
                    )
                    for start in range(0, joined.num_rows, batch_size):
                        batch = joined.slice(start, batch_size)
                        writer.write_table(_scored(batch, model, skeleton.name, schema))
                    report.rows_read += pb.n_lines
                    report.rows_scored += joined.num_rows
                    report.rows_not_scored += len(entries)
                    bar.update(block_bytes)
    return report


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
    source: RawSource, chunk_bytes: int, note_bad: Callable, report: ScoreReport
) -> tuple[pa.Table, pd.Index]:
    """The user-side table of a common file (first occurrence of each key) and its index."""
    tables, lines = [], []
    for pb, _ in _parsed_blocks(source, "common", chunk_bytes, report):
        for line, key, reason in _parse_errors(pb):
            note_bad(source, pb.first_line + line, key, reason)
        tables.append(pb.table)
        lines.append(np.delete(np.arange(pb.n_lines), pb.bad_lines) + pb.first_line)
    if not tables:  # an empty file
        tables.append(_common_schema().empty_table())
    contexts = pa.concat_tables(tables)
    keys = pd.Index(contexts[COMMON_INDEX_KEY].to_pandas())
    duplicated = keys.duplicated(keep="first")
    if duplicated.any():
        all_lines = np.concatenate(lines)
        for r in np.flatnonzero(duplicated):
            note_bad(source, int(all_lines[r]), keys[r], R_DUP_KEY)
        contexts = contexts.filter(pa.array(~duplicated))
        keys = keys[~duplicated]
    return contexts, keys


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


def _scored(batch: pa.Table, model: Any, file_name: str, schema: pa.Schema) -> pa.Table:
    preds = _predict(model, table_to_inputs(batch))
    return pa.table(
        {
            "file": pa.array([file_name] * batch.num_rows, pa.string()),
            SAMPLE_ID_KEY: batch[SAMPLE_ID_KEY],
            CLICK_LABEL_KEY: batch[CLICK_LABEL_KEY],
            CONVERSION_LABEL_KEY: batch[CONVERSION_LABEL_KEY],
            **{k: pa.array(preds[k].to_numpy()) for k in OUTPUT_KEYS},
        },
        schema=schema,
    )
