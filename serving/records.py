"""Request records: the served model's request format, its validation, and model inputs.

Request format. A request holds one or more records; a record holds the feature entries of
one impression, user side and impression side together, as the raw Ali-CCP format carries
them: per field name (`"101"`, `"109_14"`, `"205"`, ... of `models.features.ALL_FIELDS`) a
list of `[id, weight]` pairs, where `id` is the raw feature id (a JSON integer, 0 <= id <
2**63) and `weight` the entry's value (a finite JSON number, 1.0 for plain categorical
fields). Single-valued fields are lists of one pair. A field absent from the impression is
omitted or given as `[]` (both mean the same); an unknown field name is an error. Ids the
model has no embedding for go to its out-of-vocabulary bucket. On the wire each record is
the object under `"features"`, in MLflow's `dataframe_records` request form (`esmm serve`,
`serving.app`, also takes the ranking form, one context and its candidates:
`serving.candidates`):

    curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d '
      {"dataframe_records": [{"features": {"101": [[17, 1.0]], "205": [[4031, 1.0]],
                                           "109_14": [[88, 3.0], [90, 1.0]], "301": [[1, 1.0]]}}]}'
    {"predictions": [{"p_ctr": 0.041, "p_cvr": 0.012, "p_ctcvr": 0.00049}], "model_version": "3"}

`{"inputs": [...]}` with the same records works too. A malformed request is answered 400
with a message naming the record, field, entry and what is wrong. The registered pyfunc
model's signature (`serving.pyfunc.serving_signature`) declares `features` as an object
whose properties are the 23 fields (optional, values `Any`), and this module checks the
values, with clearer messages than MLflow's typed arrays give (and an `[int, float]` pair
has no MLflow type).

Model inputs from records (`records_to_arrays`) are padded as `tasks.inputs.pad_fields` pads
a training batch; from raw files (`serving.score`) they are built by `table_to_inputs`. Both
give the same arrays (tests/serving/test_records.py).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models.features import ALL_FIELDS, COMMON_FIELDS, OUTPUT_KEYS, ids_key, wts_key
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


def records_to_arrays(
    records: Sequence[Mapping[str, Any]],
    fields: Sequence[str] = ALL_FIELDS,
    label: str = "record",
    indexed: bool = True,
) -> dict[str, np.ndarray]:
    """Validate records (field -> `[id, weight]` pairs) into padded `ids_F`/`wts_F` arrays.

    Args:
        records: the records, each mapping field names to lists of `[id, weight]` pairs.
        fields: the fields a record may hold (all 23 by default; a candidate request's
            context holds the user-side ones, its candidates the impression-side ones).
        label: what a record is called in messages (`record 3, field '205', ...`).
        indexed: name records by label and index; False for a single one (`context`).

    Returns:
        For each of `fields`, `ids_F` (int64) and `wts_F` (float32), one row per record,
        padded with id 0 and weight 0 to the field's longest list (at least 1 wide), as
        `tasks.inputs.pad_fields` pads a training batch.

    Raises:
        InvalidRecordError: no records, or any malformed record; the message lists the
            first problems, each naming the record index, field and entry.
    """
    if isinstance(records, Mapping | str | bytes) or not isinstance(records, Sequence):
        raise InvalidRecordError(f"{label}s must be a list of objects, got {_describe(records)}")
    if len(records) == 0:
        raise InvalidRecordError(f"the request holds no {label}s")
    allowed = frozenset(fields)
    problems: list[str] = []
    ids: dict[str, list[int]] = {f: [] for f in fields}
    wts: dict[str, list[float]] = {f: [] for f in fields}
    lengths = {f: np.zeros(len(records), dtype=np.int32) for f in fields}
    for i, record in enumerate(records):
        this = f"{label} {i}" if indexed else label
        if type(record) is not dict and not isinstance(record, Mapping):  # exact type: fast
            problems.append(
                f"{this}: must be an object mapping field names to [id, weight] pairs, "
                f"got {_describe(record)}"
            )
            continue
        for name, entries in record.items():
            where = f"{this}, field {name!r}"
            if name not in allowed:
                problems.append(f"{where}: {_misplaced(name, fields)}")
                continue
            if type(entries) is not list and (
                isinstance(entries, str | bytes | Mapping)
                or not isinstance(entries, Sequence | np.ndarray)
            ):
                problems.append(
                    f"{where}: must be a list of [id, weight] pairs, got {_describe(entries)}"
                )
                continue
            field_ids, field_wts = ids[name], wts[name]
            for j, pair in enumerate(entries):
                # Fast path for what JSON decodes to: exact types, no ABC checks.
                if type(pair) is list and len(pair) == 2:
                    fid, weight = pair
                    if (
                        type(fid) is int
                        and 0 <= fid < _MAX_ID
                        and (type(weight) is float and weight - weight == 0 or type(weight) is int)
                    ):  # w - w == 0 only for finite w
                        field_ids.append(fid)
                        field_wts.append(weight)
                        continue
                problem = _pair_problem(pair)
                if problem:
                    problems.append(f"{where}, entry {j}: {problem}")
                    continue
                field_ids.append(int(pair[0]))
                field_wts.append(float(pair[1]))
            lengths[name][i] = len(entries)
        if len(problems) >= _MAX_PROBLEMS:
            break
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        more = " (and possibly more)" if len(problems) >= _MAX_PROBLEMS else ""
        raise InvalidRecordError(
            f"invalid request, {len(shown)} problem(s){more}: " + "; ".join(shown)
        )
    arrays = {}
    for f in fields:
        width = max(int(lengths[f].max(initial=0)), 1)
        arrays[ids_key(f)] = ids_out = np.zeros((len(records), width), np.int64)
        arrays[wts_key(f)] = wts_out = np.zeros((len(records), width), np.float32)
        if ids[f]:
            filled = np.arange(width) < lengths[f][:, None]  # row-major: the entries' order
            ids_out[filled] = ids[f]
            wts_out[filled] = wts[f]
    return arrays


def _misplaced(name: str, fields: Sequence[str]) -> str:
    """Why a field name is not allowed where it was found."""
    if name in _FIELDS:
        side, home = (
            ("a user-side", "the context")
            if name in COMMON_FIELDS
            else ("an impression-side", "each candidate")
        )
        return f"{side} field, which belongs in {home}"
    return f"unknown field; fields are {', '.join(fields)}"


def table_to_inputs(table: pa.Table) -> dict[str, np.ndarray]:
    """Model inputs from a table with the `ids_F`/`wts_F` list columns of every field.

    Batch scoring's path (`serving.score`): ragged lists are padded per batch with id 0 and
    weight 0, as in training (`tasks.inputs.pad_fields`), and every record is its own user
    context (`models.esmm.per_impression_inputs`).
    """
    # models.esmm imports Keras (seconds): local, so importing this module stays Keras-free.
    from models.esmm import per_impression_inputs

    inputs = split_fields(ALL_FIELDS, *pad_fields(table, ALL_FIELDS))  # (rows, longest list)
    return per_impression_inputs(inputs)


def records_to_inputs(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Model inputs from request records (see the module docstring for their format): every
    record is its own user context (`models.esmm.per_impression_inputs`).

    Raises:
        InvalidRecordError: a malformed request, named precisely.
    """
    from models.esmm import per_impression_inputs  # Keras: seconds, see table_to_inputs

    return per_impression_inputs(records_to_arrays(records))


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
