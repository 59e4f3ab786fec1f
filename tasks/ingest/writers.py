"""Writing the split Parquet tables: their schemas, the Parquet options, and one writer
thread per output file."""

from __future__ import annotations

import functools
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from models.features import (
    CLICK_LABEL_KEY,
    COMMON_FIELDS,
    COMMON_INDEX_KEY,
    CONVERSION_LABEL_KEY,
    SAMPLE_ID_KEY,
    SKELETON_FIELDS,
    ids_key,
    wts_key,
)


class SplitWriters:
    """One ParquetWriter per output split, opened lazily with the first batch's schema.

    Each split's tables are written in order on a thread of its own (pyarrow releases the
    GIL while it encodes and compresses), so the calling thread goes on with the next block;
    at most `_QUEUED` tables wait per split."""

    _QUEUED = 2

    def __init__(self, out_dir: Path, name: str, splits: tuple[str, ...]):
        self._paths = {s: out_dir / s / name for s in splits}
        self._writers: dict[str, pq.ParquetWriter] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._queued: dict[str, deque] = {}

    def write(self, split: str, table: pa.Table) -> None:
        if split not in self._writers:
            self._writers[split] = _parquet_writer(self._paths[split], table.schema)
            self._threads[split] = ThreadPoolExecutor(1, thread_name_prefix=f"write-{split}")
            self._queued[split] = deque()
        if table.num_rows:
            queued = self._queued[split]
            queued.append(self._threads[split].submit(self._writers[split].write_table, table))
            while len(queued) > self._QUEUED:
                queued.popleft().result()  # raises what the write raised

    def close(self, schema: pa.Schema) -> None:
        """Wait for the queued tables, then close every split's file."""
        try:
            for queued in self._queued.values():
                while queued:
                    queued.popleft().result()
        finally:
            for thread in self._threads.values():
                thread.shutdown()
        for split, path in self._paths.items():
            if split not in self._writers:  # no rows at all: still write an empty table
                self._writers[split] = _parquet_writer(path, schema)
            self._writers[split].close()


def _parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    """zstd Parquet; no dictionary for the key columns (about one distinct value per row:
    pure cost) nor for the user-side id lists (hundreds of distinct ids per context: the
    dictionary overflows and is dropped, after costing much of the writing time; without it
    the file is also smaller), and min/max statistics only for the plain columns (no reader
    uses those of the id and weight lists; skipping them saves writing time). See
    benchmarks/ingest.md."""
    leaves = {  # column name -> path of its Parquet leaf column
        f.name: f"{f.name}.list.{f.type.value_field.name}" if pa.types.is_list(f.type) else f.name
        for f in schema
    }
    no_dictionary = {SAMPLE_ID_KEY, COMMON_INDEX_KEY} | {ids_key(f) for f in COMMON_FIELDS}
    return pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        use_dictionary=[leaf for name, leaf in leaves.items() if name not in no_dictionary],
        write_statistics=[leaf for name, leaf in leaves.items() if leaf == name],
    )


@functools.cache
def common_schema() -> pa.Schema:
    """Columns of `common.parquet`: the context key, then ids_F/wts_F of each common field."""
    return _schema([pa.field(COMMON_INDEX_KEY, pa.string())], COMMON_FIELDS)


@functools.cache
def impression_schema() -> pa.Schema:
    """Columns of `impressions.parquet`: sample id, labels, context key, then ids_F/wts_F of
    each skeleton field."""
    head = [
        pa.field(SAMPLE_ID_KEY, pa.string()),
        pa.field(CLICK_LABEL_KEY, pa.int8()),
        pa.field(CONVERSION_LABEL_KEY, pa.int8()),
        pa.field(COMMON_INDEX_KEY, pa.string()),
    ]
    return _schema(head, SKELETON_FIELDS)


def _schema(head: list[pa.Field], fields: tuple[str, ...]) -> pa.Schema:
    cols = list(head)
    for f in fields:
        cols += [
            pa.field(ids_key(f), pa.list_(pa.int64())),
            pa.field(wts_key(f), pa.list_(pa.float32())),
        ]
    return pa.schema(cols)
