"""Request records -> model inputs, in process: the inputs training feeds, absent fields,
and malformed records named precisely."""

from __future__ import annotations

import numpy as np
import pytest

from models.features import ids_key, wts_key
from serving.records import InvalidRecordError, records_to_inputs, table_to_records
from tasks.inputs import SplitReader
from tests.serving.conftest import joined_table


def test_records_give_the_same_inputs_as_training(ingested):
    """Records made from an ingested batch become exactly the inputs training feeds, with
    the user-side rows repeated per impression instead of shared per context."""
    from models.features import COMMON_FIELDS

    reader = SplitReader(ingested / "test")
    table = next(reader.tables(64))
    expected = reader.features(table)
    rows = expected.pop("context_row")
    for f in COMMON_FIELDS:  # one row per context -> one row per impression
        for key in (ids_key(f), wts_key(f)):
            expected[key] = expected[key][rows]
    got = records_to_inputs(table_to_records(joined_table(reader, table)))
    assert got.pop("context_row").tolist() == [-1] * table.num_rows  # each its own context
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_an_omitted_field_equals_an_empty_one():
    """Absent fields may be omitted or given as []: the inputs are identical."""
    omitted = records_to_inputs([{"205": [[3, 1.0]]}])
    empty = records_to_inputs([{"205": [[3, 1.0]], "101": [], "109_14": []}])
    for key in omitted:
        np.testing.assert_array_equal(omitted[key], empty[key], err_msg=key)
    assert omitted[ids_key("101")].tolist() == [[0]]  # padding only


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([], "the request holds no records"),
        ([{"999": [[1, 1.0]]}], "record 0, field '999': unknown field"),
        ([{}, {"101": [["17", 1.0]]}], "record 1, field '101', entry 0: id must be an integer"),
        ([{"101": [[17.5, 1.0]]}], "record 0, field '101', entry 0: id must be an integer"),
        ([{"101": [[-1, 1.0]]}], "id must be in [0, 2**63), got -1"),
        ([{"101": [[True, 1.0]]}], "id must be an integer, got bool"),
        (
            [{"109_14": [[1, 2.0], [2, float("nan")]]}],
            "field '109_14', entry 1: weight must be finite",
        ),
        ([{"101": [[1, "1.0"]]}], "weight must be a number, got str"),
        ([{"101": [[1]]}], "must be an [id, weight] pair, got 1 value(s)"),
        ([{"101": [1, 1.0]}], "entry 0: must be an [id, weight] pair, got int 1"),
        ([{"101": "17:1.0"}], "field '101': must be a list of [id, weight] pairs"),
        (["101"], "record 0: must be an object"),
    ],
)
def test_malformed_records_are_named(records, message):
    with pytest.raises(InvalidRecordError) as err:
        records_to_inputs(records)
    assert message in str(err.value)
