"""The first-id baseline's input: each field's first entry only (and its weight).

The usual one-id-per-field reproductions of ESMM feed one id per field; the benchmarks
compare that input with the product's every entry and weight. `FirstIdReader` is the
product's `tasks.inputs.SplitReader` with every `ids_F`/`wts_F` list cut to its first entry
as it is read, so training, the co-occurrence start and prediction all see the baseline's
input, and a padded batch is each field's first column of the product's batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.features import ALL_FIELDS, ids_key, wts_key
from tasks.inputs import SplitReader

_LIST_COLUMNS = frozenset(key(f) for f in ALL_FIELDS for key in (ids_key, wts_key))


def _first_entry(lists: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    """Each list of a list column cut to its first entry (null lists stay null)."""
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    kept = np.minimum(pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False), 1)
    offsets = np.concatenate([[0], np.cumsum(kept)]).astype(np.int32)
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    first = np.ones(len(parent), dtype=bool)  # an entry whose list differs from the last's
    first[1:] = parent[1:] != parent[:-1]
    return pa.ListArray.from_arrays(
        pa.array(offsets),
        pc.list_flatten(lists).filter(pa.array(first)),
        type=lists.type,
        mask=lists.is_null() if lists.null_count else None,
    )


def first_entries(table: pa.Table) -> pa.Table:
    """`table` with each `ids_F`/`wts_F` list cut to its first entry; other columns as
    they are."""
    for i, name in enumerate(table.column_names):
        if name in _LIST_COLUMNS:
            table = table.set_column(i, name, _first_entry(table[name]))
    return table


class FirstIdReader(SplitReader):
    """A `SplitReader` that feeds only the first entry of each field (the baseline)."""

    def __init__(self, split_dir: Path):
        super().__init__(split_dir)
        self.common = first_entries(self.common).combine_chunks()

    def read_row_group(self, g: int, columns: Sequence[str] | None = None) -> pa.Table:
        return first_entries(super().read_row_group(g, columns))
