"""Request records: the served model's request format, its validation, and model inputs.

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
parsing it, which makes batches slower (see benchmarks/serving.md). A malformed request is
answered 400 with a message naming the record, field, entry and what is wrong. The model
signature (`serving.pyfunc.serving_signature`) declares `features` as an object whose
properties are the 23 fields (optional, values `Any`): MLflow's schema check then rejects
unknown fields by name, and this module checks the values, with clearer messages than
MLflow's typed arrays give (and an `[int, float]` pair has no MLflow type).

Model inputs are built from records or from raw files (`serving.score`) by one function,
`table_to_inputs`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models.features import ALL_FIELDS, OUTPUT_KEYS, ids_key, wts_key
from tasks.inputs import pad_fields, split_fields

FEATURES_KEY = "features"  # the request column holding each record's field -> pairs object
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


class InvalidRecordError(ValueError):
    """A request record is malformed; the message names record, field, entry and problem."""


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
    batch with id 0 and weight 0, as in training (`tasks.inputs.pad_fields`), and every record
    is its own user context (`models.esmm.per_impression_inputs`).
    """
    # models.esmm imports Keras (seconds): local, so importing this module stays Keras-free
    # (`esmm serve` imports it only to build the server's command line).
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
    return predict_inputs(model, records_to_inputs(records))


def predict_inputs(model: Any, inputs: dict[str, np.ndarray]) -> pd.DataFrame:
    """The Keras model's `p_ctr`, `p_cvr`, `p_ctcvr` (float64) for built inputs, one row each."""
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
