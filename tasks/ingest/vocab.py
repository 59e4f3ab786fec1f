"""Id vocabularies: counting the ids of the rows written to the train split, writing
`vocab.parquet` (ids seen at least `min_count` times) and reading it back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.features import COMMON_FIELDS, SKELETON_FIELDS, ids_key
from tasks.ingest.arrays import arrow, ints, strings


def id_counts(
    table: pa.Table, rows: np.ndarray | None, fields: tuple[str, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Distinct ids and their counts per field over `rows` (a mask; None: all rows)."""
    if rows is not None:
        table = pc.filter(table, arrow(rows))
    counts = {}
    for f in fields:
        found = pc.value_counts(pc.list_flatten(table[ids_key(f)]))
        counts[f] = (ints(found.field("values")), ints(found.field("counts")))
    return counts


class VocabCounter:
    """Id counts per field over the rows written to the train split, merged as they come
    (so memory holds about one count per distinct id)."""

    _MERGE_EVERY = 16  # partial counts of a field kept before merging them

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {
            f: [] for f in COMMON_FIELDS + SKELETON_FIELDS
        }

    def add(self, counts: dict[str, tuple[np.ndarray, np.ndarray]], sign: int = 1) -> None:
        for f, (ids, n) in counts.items():
            self._parts[f].append((ids, sign * n))
            if len(self._parts[f]) >= self._MERGE_EVERY:
                self._parts[f] = [self._merged(f)]

    def _merged(self, f: str) -> tuple[np.ndarray, np.ndarray]:
        parts = self._parts[f]
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if len(parts) == 1:
            return parts[0]
        return _sum_by_key(
            pa.chunked_array([arrow(ids) for ids, _ in parts], pa.int64()),
            pa.chunked_array([arrow(n) for _, n in parts], pa.int64()),
        )

    def write(self, path: Path, min_count: int) -> dict[str, int]:
        """Write the ids counted at least min_count times (field, feature_id, count; sorted
        by id within a field); returns the vocabulary size of each non-empty field."""
        tables, sizes = [], {}
        for f in self._parts:
            ids, n = self._merged(f)
            keep = n >= min_count
            order = np.argsort(ids[keep], kind="stable")
            tables.append(
                pa.Table.from_arrays(
                    [strings([f] * len(order)), arrow(ids[keep][order]), arrow(n[keep][order])],
                    names=["field", "feature_id", "count"],
                )
            )
            if len(order):
                sizes[f] = len(order)
        pq.write_table(pa.concat_tables(tables), path)
        return sizes


def _sum_by_key(keys: pa.ChunkedArray, counts: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys and the sum of their counts (Arrow's hash aggregation)."""
    if hasattr(pc, "_group_by"):  # pyarrow 10: Table.group_by's kernel, minus a pandas import
        sums = pc._group_by([counts], [keys], [("hash_sum", None)])
        return ints(sums.field(1)), ints(sums.field(0))
    table = pa.Table.from_arrays([keys, counts], names=["key", "count"])
    sums = table.group_by("key").aggregate([("count", "sum")])
    return ints(sums["key"]), ints(sums["count_sum"])


def load_vocabularies(path: Path) -> dict[str, np.ndarray]:
    """Read `vocab.parquet` into {field: sorted int64 ids}."""
    table = pq.read_table(path)
    return {
        f: table.filter(pc.equal(table["field"], f))["feature_id"].to_numpy().astype(np.int64)
        for f in COMMON_FIELDS + SKELETON_FIELDS
    }
