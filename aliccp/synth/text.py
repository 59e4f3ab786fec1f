"""Text of the raw Ali-CCP lines, built column-wise with pyarrow: the feature entries
(`field\\x02id\\x03value`, joined by `\\x01`), history weights, joined columns, and writing
whole arrays of lines to a file."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ENTRY_SEP, ID_SEP, VALUE_SEP = "\x01", "\x02", "\x03"
_PLAIN_VALUE = "1.0"
_WEIGHT_DECIMALS = 5


class WeightText:
    """Text of the weight ln(1 + count), at most `_WEIGHT_DECIMALS` decimals."""

    def __init__(self, max_count: int):
        self._table = pa.array(
            [f"{math.log1p(c):.{_WEIGHT_DECIMALS}f}" for c in range(max_count + 1)]
        )

    def of(self, count: np.ndarray) -> pa.Array:
        return pc.take(self._table, pa.array(count))


class FeatureLines:
    """Collects `field\\x02id\\x03value` entries per line and joins them with \\x01."""

    def __init__(self, n_lines: int, layout: Mapping[str, range]):
        self._n_lines, self._layout = n_lines, layout
        self._lines: list[np.ndarray] = []
        self._entries: list[pa.Array] = []

    def add(
        self, field: str, line: np.ndarray, entity: np.ndarray, value: pa.Array | None = None
    ) -> None:
        """Add one entry per (line, entity); value text defaults to 1.0."""
        ids = text(self._layout[field].start + entity.astype(np.int64))
        prefix = f"{field}{ID_SEP}"
        if value is None:
            entry = pc.binary_join_element_wise(prefix, ids, f"{VALUE_SEP}{_PLAIN_VALUE}", "")
        else:
            entry = pc.binary_join_element_wise(prefix, ids, VALUE_SEP, value, "")
        self._lines.append(np.asarray(line, dtype=np.int64))
        self._entries.append(entry)

    def build(self) -> tuple[pa.Array, pa.Array]:
        """Per line: (feature_num text, feature_list text), entries in the order added."""
        line = np.concatenate(self._lines)
        order = np.argsort(line, kind="stable")
        entries = pc.take(pa.concat_arrays(self._entries), pa.array(order))
        count = np.bincount(line, minlength=self._n_lines)
        offsets = pa.array(np.concatenate([[0], np.cumsum(count)]).astype(np.int32))
        joined = pc.binary_join(pa.ListArray.from_arrays(offsets, entries), ENTRY_SEP)
        return text(count), joined


def text(values: np.ndarray) -> pa.Array:
    """The decimal text of each value."""
    return pc.cast(pa.array(values), pa.string())


def join(sep: str, *columns: pa.Array) -> pa.Array:
    """Row-wise join of string columns with `sep`."""
    return pc.binary_join_element_wise(*columns, sep)


def write_lines(
    handle: BinaryIO, lines: pa.Array, replace: Mapping[int, bytes] | None = None
) -> None:
    """Write each string followed by a newline; `replace[i]` is written instead of line i
    (the bytes given, line ending(s) included)."""
    if replace:
        start = 0
        for i in sorted(replace):
            write_lines(handle, lines.slice(start, i - start))
            handle.write(replace[i])
            start = i + 1
        write_lines(handle, lines.slice(start))
        return
    if len(lines) == 0:
        return
    offsets = pa.array([0, len(lines)], type=pa.int32())
    joined = pc.binary_join(pa.ListArray.from_arrays(offsets, lines), "\n")[0]
    handle.write(joined.as_buffer())
    handle.write(b"\n")
