"""Ingestion: raw Ali-CCP text files -> columnar, split, vocabularised training data.

The raw format is described in docs/ali_ccp_format.md (its contract: `aliccp.format`).
Ingestion streams each file a chunk of bytes at a time and parses every chunk with vectorised
pyarrow/numpy kernels (no per-line Python loop). Every field, every entry of a multi-valued
field and every weight is kept: field `F` becomes the list columns `ids_F` (int64) and
`wts_F` (float32).

User-side (common) features are stored once per `common_feature_index` in `common.parquet`;
impressions keep only the key, and the input pipeline joins the two per batch. Invalid lines
are never dropped silently: each is counted by reason and written to `quarantine.csv` with its
file, line number and sample id, and `rows_read == rows_written + rows_quarantined` holds for
every file.

Output layout (under `out_dir`):
    {train,valid,test}/impressions.parquet   sample_id, click, conversion, common_feature_index, ids_*/wts_* of skeleton fields
    {train,valid,test}/common.parquet        common_feature_index, ids_*/wts_* of common fields
    vocab.parquet                            field, feature_id, count (train split, count >= min_count)
    quarantine.csv                           file, line, sample_id, reason
    report.json                              counts by file, split and reason

The package, in the order data flows through it:
    sources      raw files (plain, gzip, archive members), blocks of whole lines, ordered_map
    parse        parse_block: a block -> ParsedBlock, in pieces parsed by
    lines        the vectorised block parser (tokens, line/entry/row checks, list columns)
    spans        byte spans of a block as Arrow arrays; field ids -> field indices
    keys         stable key hashes, split by context, SeenKeys, KnownKeys
    writers      Parquet schemas and the split writers
    vocab        id counts of the train split, vocab.parquet
    orchestrate  ingest_ali_ccp: files in order, duplicates, joins, quarantine, report
    report       FileReport, IngestReport, IngestError
    memory       allocator settings while ingesting
    arrays       numpy <-> Arrow without pandas
"""

from __future__ import annotations

from tasks.ingest.keys import KnownKeys, SeenKeys, hash_keys, split_of
from tasks.ingest.orchestrate import ingest_ali_ccp
from tasks.ingest.parse import ParsedBlock, parse_block
from tasks.ingest.report import FileReport, IngestError, IngestReport
from tasks.ingest.sources import RawSource, find_raw_files, ordered_map, read_blocks
from tasks.ingest.vocab import load_vocabularies
from tasks.ingest.writers import common_schema, impression_schema

__all__ = [
    "FileReport",
    "IngestError",
    "IngestReport",
    "KnownKeys",
    "ParsedBlock",
    "RawSource",
    "SeenKeys",
    "common_schema",
    "find_raw_files",
    "hash_keys",
    "impression_schema",
    "ingest_ali_ccp",
    "load_vocabularies",
    "ordered_map",
    "parse_block",
    "read_blocks",
    "split_of",
]
