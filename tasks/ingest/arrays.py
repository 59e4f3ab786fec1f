"""numpy <-> Arrow conversions for ingestion, without pandas.

`pa.array` and `to_numpy` check for pandas objects, and the first check imports pandas (0.3 s
from bytecode, 0.7 s from source) in every ingestion. For the same reason ingestion uses
`pc.take(x, i)` and `pc.filter(x, m)`, not the methods `x.take(i)` and `x.filter(m)` of
arrays and tables (pyarrow 10).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def arrow(values: np.ndarray) -> pa.Array:
    """A numeric or boolean numpy array as an Arrow array (numeric: without a copy)."""
    if values.dtype == bool:
        bits = pa.py_buffer(np.packbits(values, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, bits])
    values = np.ascontiguousarray(values)
    dtype = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(values)])


def strings(texts: list[str]) -> pa.StringArray:
    """Python strings as an Arrow string array."""
    encoded = [text.encode() for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), data)


def bools(array: pa.BooleanArray) -> np.ndarray:
    """A boolean Arrow array as numpy, null as False."""
    n, offset = len(array), array.offset
    if n == 0:
        return np.zeros(0, dtype=bool)
    validity, values = array.buffers()
    bits = np.frombuffer(values, dtype=np.uint8)
    out = np.unpackbits(bits, count=offset + n, bitorder="little")[offset:].view(bool)
    if array.null_count:
        valid = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        out &= valid[offset : offset + n].view(bool)
    return out


def ints(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An int64 column without nulls as numpy (see `arrow` for why not to_numpy)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros(0, dtype=np.int64)
    values = np.frombuffer(array.buffers()[1], dtype=np.int64)
    return values[array.offset : array.offset + len(array)]
