"""Ingestion: raw Ali-CCP text files -> columnar, split, vocabularised training data.

The raw format is described in shared/ALI_CCP_FORMAT.md. Ingestion streams each file a
chunk of bytes at a time and parses every chunk with vectorised pyarrow/numpy kernels (no
per-line Python loop). Every field, every entry of a multi-valued field and every weight is
kept: field `F` becomes the list columns `ids_F` (int64) and `wts_F` (float32).

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
"""

from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
from tasks.config import IngestConfig

RAW_FILES: dict[str, tuple[str, str]] = {
    "train": ("sample_skeleton_train.csv", "common_features_train.csv"),
    "test": ("sample_skeleton_test.csv", "common_features_test.csv"),
}
SPLITS: tuple[str, ...] = ("train", "valid", "test")

# Quarantine reasons (stable strings: they are report keys).
R_EMPTY = "empty line"
R_UTF8 = "invalid UTF-8"
R_COLUMNS = "wrong number of columns (truncated line or wrong separator)"
R_LABEL = "label not 0 or 1"
R_CONV_NO_CLICK = "conversion without click"
R_FEATURE_NUM = "feature_num does not match the feature list"
R_ENTRY = "malformed feature entry"
R_UNKNOWN_KEY = "unknown common_feature_index"
R_DUP_KEY = "duplicate common_feature_index"

_ENTRY_RE = r"^[^\x02\x03]+\x02[0-9]+\x03[-+0-9.eE]+$"


class IngestError(RuntimeError):
    """Ingestion cannot produce trustworthy data (missing file, too much bad input)."""


@dataclass
class FileReport:
    path: str
    rows_read: int = 0
    rows_written: int = 0
    rows_quarantined: int = 0
    crlf_lines: int = 0  # accepted: the trailing \r is stripped
    quarantined_by_reason: dict[str, int] = field(default_factory=dict)
    unknown_fields: dict[str, int] = field(default_factory=dict)  # field id -> entries skipped


@dataclass
class IngestReport:
    files: list[FileReport]
    split_rows: dict[str, int]
    split_contexts: dict[str, int]
    vocab_sizes: dict[str, int]

    @property
    def rows_read(self) -> int:
        return sum(f.rows_read for f in self.files)

    @property
    def rows_written(self) -> int:
        return sum(f.rows_written for f in self.files)

    @property
    def rows_quarantined(self) -> int:
        return sum(f.rows_quarantined for f in self.files)

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "rows_quarantined": self.rows_quarantined,
            "split_rows": self.split_rows,
            "split_contexts": self.split_contexts,
            "vocab_sizes": self.vocab_sizes,
            "files": [asdict(f) for f in self.files],
        }

    def summary(self) -> str:
        lines = [f"{'file':<32} {'read':>10} {'written':>10} {'quarantined':>12}"]
        for f in self.files:
            lines.append(
                f"{Path(f.path).name:<32} {f.rows_read:>10,} {f.rows_written:>10,} {f.rows_quarantined:>12,}"
            )
            for reason, n in sorted(f.quarantined_by_reason.items()):
                lines.append(f"    {reason}: {n:,}")
            for fid, n in sorted(f.unknown_fields.items()):
                lines.append(f"    unknown field {fid!r}: {n:,} entries not kept")
        lines.append("splits: " + ", ".join(f"{s} {n:,}" for s, n in self.split_rows.items()))
        return "\n".join(lines)


def ingest_ali_ccp(raw_dir: Path, out_dir: Path, cfg: IngestConfig) -> IngestReport:
    """Parse the raw Ali-CCP files into split Parquet tables and id vocabularies.

    Args:
        raw_dir: folder holding the four raw files (plain or `.gz`).
        out_dir: where the layout described in the module docstring is written.
        cfg: ingestion parameters.

    Returns:
        The ingestion report (also written to `out_dir/report.json`).

    Raises:
        IngestError: a raw file is missing, or the quarantined share exceeds
            `cfg.max_quarantine_fraction`.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    paths = {
        split: tuple(_find_raw(raw_dir, name) for name in names)
        for split, names in RAW_FILES.items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (out_dir / split).mkdir(exist_ok=True)

    files: list[FileReport] = []
    split_rows = dict.fromkeys(SPLITS, 0)
    split_contexts = dict.fromkeys(SPLITS, 0)
    with open(out_dir / "quarantine.csv", "w", newline="") as qf:
        quarantine = csv.writer(qf)
        quarantine.writerow(["file", "line", "sample_id", "reason"])
        for split, (skeleton_path, common_path) in paths.items():
            out_splits = ("train", "valid") if split == "train" else ("test",)
            # Common features first: their keys decide which impressions are joinable.
            rep, keys = _ingest_common(
                common_path, out_dir, out_splits, cfg, quarantine, split_contexts
            )
            files.append(rep)
            files.append(
                _ingest_skeleton(
                    skeleton_path, out_dir, out_splits, keys, cfg, quarantine, split_rows
                )
            )

    vocab_sizes = _write_vocab(out_dir, cfg.min_count)
    report = IngestReport(files, split_rows, split_contexts, vocab_sizes)
    (out_dir / "report.json").write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True))

    if (
        report.rows_read
        and report.rows_quarantined / report.rows_read > cfg.max_quarantine_fraction
    ):
        worst = Counter()
        for f in files:
            worst.update(f.quarantined_by_reason)
        raise IngestError(
            f"{report.rows_quarantined:,} of {report.rows_read:,} raw lines quarantined "
            f"({report.rows_quarantined / report.rows_read:.2%}), above ingest.max_quarantine_fraction="
            f"{cfg.max_quarantine_fraction:.2%}; reasons: "
            + ", ".join(f"{r}: {n:,}" for r, n in worst.most_common())
            + f"; see {out_dir / 'quarantine.csv'}"
        )
    return report


def _find_raw(raw_dir: Path, name: str) -> Path:
    for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise IngestError(
        f"raw file missing: {raw_dir / name} (nor {name}.gz); an Ali-CCP folder holds "
        + ", ".join(n for names in RAW_FILES.values() for n in names)
    )


def split_of(keys: pa.Array, valid_fraction: float) -> np.ndarray:
    """Deterministic train/valid assignment by context key (True = validation).

    A user context never straddles splits; the hash is stable across runs and machines.
    """
    hashed = pd.util.hash_array(np.asarray(keys.to_pylist(), dtype=object), categorize=False)
    return (hashed % np.uint64(1_000_000)) < np.uint64(round(valid_fraction * 1_000_000))


# --- reading -------------------------------------------------------------------------------


@dataclass
class _Chunk:
    lines: pa.StringArray  # lines with the line ending stripped
    first_line: int  # 1-based line number of lines[0]
    crlf: int
    bad_utf8: list[int]  # 0-based positions within the chunk of lines that were not UTF-8


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_chunks(path: Path, chunk_bytes: int) -> Iterator[_Chunk]:
    """Yield whole lines, a block of bytes at a time; memory is bounded by chunk_bytes."""
    line_no = 1
    tail = b""
    with _open(path) as fh:
        while True:
            block = fh.read(chunk_bytes)
            if not block:
                break
            block = tail + block
            cut = block.rfind(b"\n")
            if cut < 0:
                tail = block
                continue
            tail = block[cut + 1 :]
            chunk = _decode(block[:cut].split(b"\n"), line_no)
            line_no += len(chunk.lines)
            yield chunk
        if tail:
            yield _decode([tail], line_no)


def _decode(raw_lines: list[bytes], first_line: int) -> _Chunk:
    crlf = sum(1 for ln in raw_lines if ln.endswith(b"\r"))
    if crlf:
        raw_lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in raw_lines]
    bad: list[int] = []
    try:
        arr = pa.array(raw_lines, pa.binary()).cast(pa.string())
    except pa.ArrowInvalid:
        texts = []
        for i, ln in enumerate(raw_lines):
            try:
                texts.append(ln.decode("utf-8"))
            except UnicodeDecodeError:
                bad.append(i)
                texts.append("")
        arr = pa.array(texts, pa.string())
    return _Chunk(arr, first_line, crlf, bad)


# --- parsing -------------------------------------------------------------------------------


@dataclass
class _Parsed:
    columns: dict[str, pa.Array]  # plain columns of the valid rows (strings)
    fields: dict[str, pa.Array]  # ids_*/wts_* list columns of the valid rows
    reasons: np.ndarray  # object array, one reason (or None) per line of the chunk
    unknown_fields: Counter


def _parse_chunk(
    chunk: _Chunk, n_cols: int, names: tuple[str, ...], fields: tuple[str, ...]
) -> _Parsed:
    """Vectorised parse of one chunk; rows with a defect get a reason instead of values."""
    lines = chunk.lines
    n = len(lines)
    reasons = np.full(n, None, dtype=object)
    reasons[pc.equal(pc.utf8_length(lines), 0).to_numpy(zero_copy_only=False)] = R_EMPTY
    reasons[chunk.bad_utf8] = R_UTF8

    cols = pc.split_pattern(lines, ",", max_splits=n_cols - 1)
    ncols = pc.list_value_length(cols).to_numpy(zero_copy_only=False)
    reasons[(ncols != n_cols) & (reasons == None)] = R_COLUMNS  # noqa: E711 (elementwise)

    ok = reasons == None  # noqa: E711
    good = cols.filter(pa.array(ok))
    values = {name: pc.list_element(good, i) for i, name in enumerate(names)}

    # Feature list: entries separated by \x01, each field \x02 id \x03 value.
    flist = values.pop("feature_list")
    entries = pc.split_pattern(flist, "\x01")
    n_entries = pc.list_value_length(entries).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(entries)
    parent = pc.list_parent_indices(entries).to_numpy(zero_copy_only=False)
    is_empty_list = pc.equal(flist, "").to_numpy(zero_copy_only=False)
    # An empty feature list splits into one empty entry: it holds zero entries.
    n_entries = np.where(is_empty_list, 0, n_entries)
    entry_ok = pc.match_substring_regex(flat, _ENTRY_RE).to_numpy(zero_copy_only=False)
    entry_ok |= is_empty_list[parent]  # the phantom empty entry is not malformed
    row_bad_entry = np.bincount(parent[~entry_ok], minlength=len(flist)) > 0

    feature_num = pc.utf8_is_digit(values["feature_num"]).to_numpy(zero_copy_only=False)
    declared = np.where(
        feature_num,
        pc.cast(
            pc.if_else(pa.array(feature_num), values["feature_num"], "0"), pa.int64()
        ).to_numpy(),
        -1,
    )
    row_reason = np.full(len(flist), None, dtype=object)
    row_reason[row_bad_entry] = R_ENTRY
    row_reason[(declared != n_entries) & (row_reason == None)] = R_FEATURE_NUM  # noqa: E711

    if CLICK_LABEL_KEY in values:
        click, conv = values[CLICK_LABEL_KEY], values[CONVERSION_LABEL_KEY]
        label_ok = pc.is_in(click, pa.array(["0", "1"])).to_numpy(zero_copy_only=False) & pc.is_in(
            conv, pa.array(["0", "1"])
        ).to_numpy(zero_copy_only=False)
        row_reason[~label_ok & (row_reason == None)] = R_LABEL  # noqa: E711
        no_click = pc.equal(click, "0").to_numpy(zero_copy_only=False) & pc.equal(
            conv, "1"
        ).to_numpy(zero_copy_only=False)
        row_reason[no_click & (row_reason == None)] = R_CONV_NO_CLICK  # noqa: E711

    reasons[np.flatnonzero(ok)] = row_reason
    keep = row_reason == None  # noqa: E711
    columns = {k: v.filter(pa.array(keep)) for k, v in values.items()}

    # Entries of kept rows, renumbered to kept-row positions.
    entry_keep = keep[parent] & ~is_empty_list[parent]
    new_row = np.cumsum(keep) - 1
    parent_k = new_row[parent[entry_keep]]
    flat_k = flat.filter(pa.array(entry_keep))
    fparts = pc.split_pattern(flat_k, "\x02", max_splits=1)
    fid = pc.list_element(fparts, 0)
    rest = pc.split_pattern(pc.list_element(fparts, 1), "\x03", max_splits=1)
    ids = pc.cast(pc.list_element(rest, 0), pa.int64()).to_numpy()
    wts = pc.cast(pc.list_element(rest, 1), pa.float32()).to_numpy()

    field_index = pc.index_in(fid, value_set=pa.array(fields)).to_numpy(zero_copy_only=False)
    field_index = np.where(np.isnan(field_index.astype(float)), -1, field_index).astype(np.int64)
    unknown = Counter(pc.filter(fid, pa.array(field_index < 0)).to_pylist())

    n_keep = int(keep.sum())
    out_fields: dict[str, pa.Array] = {}
    for k, f in enumerate(fields):
        mask = field_index == k
        counts = np.bincount(parent_k[mask], minlength=n_keep)
        offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
        out_fields[ids_key(f)] = pa.ListArray.from_arrays(offsets, pa.array(ids[mask]))
        out_fields[wts_key(f)] = pa.ListArray.from_arrays(offsets, pa.array(wts[mask]))
    return _Parsed(columns, out_fields, reasons, unknown)


def _quarantine(
    writer, path: Path, chunk: _Chunk, reasons: np.ndarray, rep: FileReport, ids: list
) -> None:
    bad = np.flatnonzero(reasons != None)  # noqa: E711
    for i in bad:
        reason = reasons[i]
        writer.writerow([path.name, chunk.first_line + int(i), ids[i], reason])
        rep.quarantined_by_reason[reason] = rep.quarantined_by_reason.get(reason, 0) + 1
    rep.rows_quarantined += len(bad)


def _first_column(chunk: _Chunk) -> list:
    """Sample id (or key) of each line where readable, for the quarantine file."""
    return pc.list_element(pc.split_pattern(chunk.lines, ",", max_splits=1), 0).to_pylist()


class _SplitWriters:
    """One ParquetWriter per output split, opened lazily with the first batch's schema."""

    def __init__(self, out_dir: Path, name: str, splits: tuple[str, ...]):
        self._paths = {s: out_dir / s / name for s in splits}
        self._writers: dict[str, pq.ParquetWriter] = {}

    def write(self, split: str, table: pa.Table) -> None:
        if split not in self._writers:
            self._writers[split] = pq.ParquetWriter(
                self._paths[split], table.schema, compression="zstd"
            )
        if table.num_rows:
            self._writers[split].write_table(table)

    def close(self, schema: pa.Schema) -> None:
        for split, path in self._paths.items():
            if split not in self._writers:  # no rows at all: still write an empty table
                self._writers[split] = pq.ParquetWriter(path, schema, compression="zstd")
            self._writers[split].close()


def _common_schema() -> pa.Schema:
    return _schema([pa.field(COMMON_INDEX_KEY, pa.string())], COMMON_FIELDS)


def _impression_schema() -> pa.Schema:
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


def _ingest_common(
    path: Path,
    out_dir: Path,
    out_splits: tuple[str, ...],
    cfg: IngestConfig,
    quarantine,
    split_contexts: dict[str, int],
) -> tuple[FileReport, pa.Array]:
    rep = FileReport(str(path))
    schema = _common_schema()
    writers = _SplitWriters(out_dir, "common.parquet", out_splits)
    seen: list[pa.Array] = []
    seen_set: set[str] = set()
    for chunk in _read_chunks(path, cfg.chunk_bytes):
        parsed = _parse_chunk(
            chunk, 3, (COMMON_INDEX_KEY, "feature_num", "feature_list"), COMMON_FIELDS
        )
        keys = parsed.columns[COMMON_INDEX_KEY]
        # A key may define a context only once; later duplicates are quarantined.
        key_list = keys.to_pylist()
        dup = np.zeros(len(key_list), dtype=bool)
        for i, k in enumerate(key_list):
            if k in seen_set:
                dup[i] = True
            seen_set.add(k)
        if dup.any():
            valid_pos = np.flatnonzero(parsed.reasons == None)  # noqa: E711
            parsed.reasons[valid_pos[dup]] = R_DUP_KEY
        keep = pa.array(~dup)
        table = pa.table(
            {
                COMMON_INDEX_KEY: keys.filter(keep),
                **{k: v.filter(keep) for k, v in parsed.fields.items()},
            },
            schema=schema,
        )
        _account(rep, chunk, parsed, table.num_rows, quarantine, path)
        seen.append(table[COMMON_INDEX_KEY].combine_chunks())
        _write_split(writers, table, out_splits, cfg.valid_fraction, split_contexts)
    writers.close(schema)
    keys = pa.concat_arrays(seen) if seen else pa.array([], pa.string())
    return rep, keys


def _ingest_skeleton(
    path: Path,
    out_dir: Path,
    out_splits: tuple[str, ...],
    known_keys: pa.Array,
    cfg: IngestConfig,
    quarantine,
    split_rows: dict[str, int],
) -> FileReport:
    rep = FileReport(str(path))
    schema = _impression_schema()
    writers = _SplitWriters(out_dir, "impressions.parquet", out_splits)
    names = (
        SAMPLE_ID_KEY,
        CLICK_LABEL_KEY,
        CONVERSION_LABEL_KEY,
        COMMON_INDEX_KEY,
        "feature_num",
        "feature_list",
    )
    for chunk in _read_chunks(path, cfg.chunk_bytes):
        parsed = _parse_chunk(chunk, 6, names, SKELETON_FIELDS)
        cols = parsed.columns
        joinable = pc.is_in(cols[COMMON_INDEX_KEY], value_set=known_keys).to_numpy(
            zero_copy_only=False
        )
        if not joinable.all():
            valid_pos = np.flatnonzero(parsed.reasons == None)  # noqa: E711
            parsed.reasons[valid_pos[~joinable]] = R_UNKNOWN_KEY
        keep = pa.array(joinable)
        table = pa.table(
            {
                SAMPLE_ID_KEY: cols[SAMPLE_ID_KEY].filter(keep),
                CLICK_LABEL_KEY: pc.cast(cols[CLICK_LABEL_KEY].filter(keep), pa.int8()),
                CONVERSION_LABEL_KEY: pc.cast(cols[CONVERSION_LABEL_KEY].filter(keep), pa.int8()),
                COMMON_INDEX_KEY: cols[COMMON_INDEX_KEY].filter(keep),
                **{k: v.filter(keep) for k, v in parsed.fields.items()},
            },
            schema=schema,
        )
        _account(rep, chunk, parsed, table.num_rows, quarantine, path)
        _write_split(writers, table, out_splits, cfg.valid_fraction, split_rows)
    writers.close(schema)
    return rep


def _account(
    rep: FileReport, chunk: _Chunk, parsed: _Parsed, written: int, quarantine, path: Path
) -> None:
    rep.rows_read += len(chunk.lines)
    rep.rows_written += written
    rep.crlf_lines += chunk.crlf
    for fid, n in parsed.unknown_fields.items():
        rep.unknown_fields[fid] = rep.unknown_fields.get(fid, 0) + n
    if (parsed.reasons != None).any():  # noqa: E711
        _quarantine(quarantine, path, chunk, parsed.reasons, rep, _first_column(chunk))


def _write_split(
    writers: _SplitWriters, table: pa.Table, out_splits, valid_fraction, counts
) -> None:
    if out_splits == ("test",):
        writers.write("test", table)
        counts["test"] += table.num_rows
        return
    is_valid = split_of(table[COMMON_INDEX_KEY].combine_chunks(), valid_fraction)
    for split, mask in (("train", ~is_valid), ("valid", is_valid)):
        part = table.filter(pa.array(mask))
        writers.write(split, part)
        counts[split] += part.num_rows


# --- vocabularies ----------------------------------------------------------------------------


def _write_vocab(out_dir: Path, min_count: int) -> dict[str, int]:
    """Count ids per field over the train split; keep those seen at least min_count times."""
    parts = []
    for name, fields in (
        ("common.parquet", COMMON_FIELDS),
        ("impressions.parquet", SKELETON_FIELDS),
    ):
        pf = pq.ParquetFile(out_dir / "train" / name)
        for f in fields:
            partial = [
                pa.table(
                    pc.value_counts(pc.list_flatten(batch.column(0))).flatten(),
                    names=["feature_id", "count"],
                )
                for batch in pf.iter_batches(columns=[ids_key(f)], batch_size=65_536)
            ]
            if not partial:
                partial = [
                    pa.table(
                        {"feature_id": pa.array([], pa.int64()), "count": pa.array([], pa.int64())}
                    )
                ]
            totals = pa.concat_tables(partial).group_by("feature_id").aggregate([("count", "sum")])
            totals = totals.filter(pc.greater_equal(totals["count_sum"], min_count)).sort_by(
                "feature_id"
            )
            parts.append(
                pa.table(
                    {
                        "field": pa.array([f] * totals.num_rows, pa.string()),
                        "feature_id": totals["feature_id"],
                        "count": totals["count_sum"],
                    }
                )
            )
    vocab = pa.concat_tables(parts)
    pq.write_table(vocab, out_dir / "vocab.parquet")
    return {f: int(n) for f, n in Counter(vocab["field"].to_pylist()).items()}


def load_vocabularies(path: Path) -> dict[str, np.ndarray]:
    """Read `vocab.parquet` into {field: sorted int64 ids}."""
    table = pq.read_table(path)
    df = table.to_pandas()
    return {
        f: df.loc[df["field"] == f, "feature_id"].to_numpy(np.int64)
        for f in COMMON_FIELDS + SKELETON_FIELDS
    }
