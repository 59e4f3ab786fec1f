"""Ingestion: raw Ali-CCP text files -> columnar, split, vocabularised training data.

The raw format is described in docs/ali_ccp_format.md (its contract: `aliccp.format`). Ingestion streams each file a
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
import ctypes
import functools
import gzip
import json
import os
import platform
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aliccp.format import (
    R_COLUMNS,
    R_CONV_NO_CLICK,
    R_DUP_KEY,
    R_DUP_SAMPLE,
    R_EMPTY,
    R_ENTRY,
    R_FEATURE_NUM,
    R_LABEL,
    R_UNKNOWN_KEY,
    R_UTF8,
    RAW_FILES,
    SPLITS,
)
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

# Reasons the block parser gives, by code (0: no defect found).
_REASONS: tuple[str | None, ...] = (
    None, R_EMPTY, R_UTF8, R_COLUMNS, R_ENTRY, R_FEATURE_NUM, R_LABEL, R_CONV_NO_CLICK,
)  # fmt: skip
_REASON_CODE = {reason: code for code, reason in enumerate(_REASONS)}

_MAX_ID_CHARS = 64  # longest sample id / key text copied into quarantine.csv


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


def ingest_ali_ccp(
    raw_dir: Path,
    out_dir: Path,
    cfg: IngestConfig,
    history: Sequence[tuple[str, Path]] = (),
) -> IngestReport:
    """Parse the raw Ali-CCP files into split Parquet tables and id vocabularies.

    Args:
        raw_dir: folder holding the four raw files (plain or `.gz`).
        out_dir: where the layout described in the module docstring is written.
        cfg: ingestion parameters.
        history: earlier raw batches `(label, folder)` whose train files join the train and
            validation splits (a training window, see `ingest.window`). Their sample ids and
            context keys are prefixed with `label:` so batches never collide; the test split
            always comes from `raw_dir` alone.

    Returns:
        The ingestion report (also written to `out_dir/report.json`).

    Raises:
        IngestError: a raw file is missing, or the quarantined share exceeds
            `cfg.max_quarantine_fraction`.
    """
    with _steady_allocator():
        return _ingest(Path(raw_dir), Path(out_dir), cfg, history)


def _ingest(raw_dir: Path, out_dir: Path, cfg: IngestConfig, history) -> IngestReport:
    sources = find_raw_files(raw_dir)
    # By default one parsing thread per core; this thread meanwhile checks duplicates and
    # joins keys, and one thread per output file writes its Parquet. numpy and Arrow release
    # the GIL in their kernels, so threads run in parallel without copying whole tables
    # between processes. With one worker the parsing runs in this thread.
    workers = cfg.workers or os.cpu_count() or 1
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (out_dir / split).mkdir(exist_ok=True)

    # (prefix, split, skeleton, common): the current batch, then the window's earlier ones.
    batches = [("", split, *pair) for split, pair in sources.items()]
    for label, folder in history:
        batches.append((f"{label}:", "train", *find_raw_files(folder)["train"]))
    split_rows = dict.fromkeys(SPLITS, 0)
    split_contexts = dict.fromkeys(SPLITS, 0)
    impressions = _SplitWriters(out_dir, "impressions.parquet", SPLITS)
    contexts = _SplitWriters(out_dir, "common.parquet", SPLITS)
    vocab = _VocabCounter()  # counted as the train split is written
    with open(out_dir / "quarantine.csv", "w", newline="") as qf:
        quarantine = csv.writer(qf)
        quarantine.writerow(["file", "line", "sample_id", "reason"])
        jobs = []
        for prefix, split, skeleton, common in batches:
            out_splits = ("train", "valid") if split == "train" else ("test",)
            counted = vocab if split == "train" else None
            # Common features first: their keys decide which impressions are joinable.
            jobs.append(
                _FileJob(common, "common", contexts, out_splits, split_contexts, counted, prefix)
            )
            jobs.append(
                _FileJob(skeleton, "skeleton", impressions, out_splits, split_rows, counted, prefix)
            )
        files = _ingest_files(jobs, cfg, workers, quarantine)
    impressions.close(_impression_schema())
    contexts.close(_common_schema())

    vocab_sizes = vocab.write(out_dir / "vocab.parquet", cfg.min_count)
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


# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_GLIBC_TRIM_THRESHOLD = 128 * 1024  # glibc's default


@contextmanager
def _steady_allocator() -> Iterator[None]:
    """Keep freed memory for reuse while ingesting.

    Each block allocates and frees a few hundred MB of numpy and Arrow buffers. By default
    glibc hands large freed blocks back to the kernel (mmap threshold, heap trimming, one
    heap per thread) and Arrow's jemalloc purges its own, so every block faults its memory in
    again: about 500k page faults and 1.3 s of system time for 1M impressions. With Arrow on
    the system allocator and glibc keeping blocks of up to 32 MB in one heap, about 90k
    (0.6 s). On exit Arrow's pool is restored and the heap trimmed; the 32 MB mmap threshold
    stays (glibc's own dynamic threshold grows to that much anyway). Only on glibc."""
    libc = None
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            libc = None
    pool = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        pa.set_memory_pool(pool)
        if libc is not None:
            libc.mallopt(_M_ARENA_MAX, 0)  # back to glibc's rule (8 per core)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_TRIM_THRESHOLD)
            libc.malloc_trim(0)


def split_of(keys: pa.Array, valid_fraction: float) -> np.ndarray:
    """Deterministic train/valid assignment by context key (True = validation).

    A user context never straddles splits; the hash is stable across runs and machines.
    """
    heads, hashes = _key_runs(keys)
    return np.repeat(_in_valid(hashes, valid_fraction), np.diff(heads, append=len(keys)))


def _in_valid(hashes: np.ndarray, valid_fraction: float) -> np.ndarray:
    return (hashes % np.uint64(1_000_000)) < np.uint64(round(valid_fraction * 1_000_000))


def _key_runs(keys: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """First row of each run of equal consecutive keys, and the key's hash.

    Impressions of one context are mostly consecutive: each run is hashed once."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if len(keys) < 2:
        return np.arange(len(keys)), hash_keys(keys)
    starts_run = np.ones(len(keys), dtype=bool)
    starts_run[1:] = _bools(pc.not_equal(keys[1:], keys[:-1]))
    heads = np.flatnonzero(starts_run)
    return heads, hash_keys(pc.take(keys, _arrow(heads)))


# numpy <-> Arrow without `pa.array` / `to_numpy`: those check for pandas objects, and the
# first check imports pandas (0.3 s from bytecode, 0.7 s from source) in every ingestion.
# For the same reason: `pc.take(x, i)` and `pc.filter(x, m)`, not the methods `x.take(i)`
# and `x.filter(m)` of arrays and tables (pyarrow 10).


def _arrow(values: np.ndarray) -> pa.Array:
    """A numeric or boolean numpy array as an Arrow array (numeric: without a copy)."""
    if values.dtype == bool:
        bits = pa.py_buffer(np.packbits(values, bitorder="little"))
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, bits])
    values = np.ascontiguousarray(values)
    dtype = pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(values)])


def _strings(texts: list[str]) -> pa.StringArray:
    """Python strings as an Arrow string array."""
    encoded = [text.encode() for text in texts]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    data = pa.py_buffer(b"".join(encoded))
    return pa.StringArray.from_buffers(len(encoded), pa.py_buffer(offsets), data)


def _bools(array: pa.BooleanArray) -> np.ndarray:
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


class KnownKeys:
    """Exact membership of string keys in a fixed set, by 64-bit hash then string compare.

    `pc.is_in` rebuilds its hash table of the set on every call (75 ms per call for 400k
    contexts); this sorts the set's hashes once."""

    def __init__(self, keys: pa.Array, hashes: np.ndarray):
        self._keys = keys
        self._order = np.argsort(hashes, kind="stable")
        self._sorted = hashes[self._order]

    def contains(self, keys: pa.Array, hashes: np.ndarray) -> np.ndarray:
        """True where keys[i] (whose hash is hashes[i]) is in the set."""
        if len(self._sorted) == 0 or len(keys) == 0:
            return np.zeros(len(keys), dtype=bool)
        pos = np.minimum(np.searchsorted(self._sorted, hashes), len(self._sorted) - 1)
        hit = self._sorted[pos] == hashes
        rows = np.flatnonzero(hit)
        if len(rows):  # the same hash is no proof: compare the strings
            candidates = pc.take(self._keys, _arrow(self._order[pos[rows]]))
            same = pc.equal(pc.take(keys, _arrow(rows)), candidates)
            hit[rows] = _bools(same)
            unsure = rows[~hit[rows]]
            if len(unsure):  # another key of the set with the same hash (very rare)
                found = pc.is_in(pc.take(keys, _arrow(unsure)), value_set=self._keys)
                hit[unsure] = _bools(found)
        return hit


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawSource:
    """One raw file: a plain or gzip file, or a member of a downloaded `.tar.gz` archive."""

    path: Path
    member: str | None = None  # name inside the archive

    @property
    def name(self) -> str:
        """The raw file's own name, as quarantine.csv reports it."""
        return Path(self.member).name if self.member else self.path.name

    def __str__(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def size(self) -> int:
        return self.path.stat().st_size

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        if self.member is None:
            opener = gzip.open if self.path.suffix == ".gz" else open
            with opener(self.path, "rb") as fh:
                yield fh
            return
        with tarfile.open(self.path, "r:*") as archive:
            fh = archive.extractfile(self.member)
            if fh is None:
                raise IngestError(f"{self}: not a regular file in the archive")
            with fh:
                yield fh


def find_raw_files(raw_dir: Path) -> dict[str, tuple[RawSource, RawSource]]:
    """The (skeleton, common) sources of each raw split.

    Each file may be plain, `.gz`, or inside the published archive `sample_<split>.tar.gz`.

    Raises:
        IngestError: a file is missing; the message names it and what a folder must hold.
    """
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise IngestError(f"raw data folder not found: {raw_dir}")
    found: dict[str, tuple[RawSource, ...]] = {}
    for split, names in RAW_FILES.items():
        archive = raw_dir / f"sample_{split}.tar.gz"
        members = _archive_members(archive) if archive.is_file() else {}
        sources = []
        for name in names:
            for candidate in (raw_dir / name, raw_dir / f"{name}.gz"):
                if candidate.is_file():
                    sources.append(RawSource(candidate))
                    break
            else:
                if name not in members:
                    raise IngestError(
                        f"raw file missing: {raw_dir / name} (nor {name}.gz, nor inside "
                        f"{archive.name}); an Ali-CCP folder holds "
                        + ", ".join(n for ns in RAW_FILES.values() for n in ns)
                        + " (plain or .gz), or sample_train.tar.gz and sample_test.tar.gz"
                    )
                sources.append(RawSource(archive, members[name]))
        found[split] = tuple(sources)
    return found  # type: ignore[return-value]


def _archive_members(archive: Path) -> dict[str, str]:
    """Base name -> member name of the regular files in an archive."""
    with tarfile.open(archive, "r:*") as tar:
        return {Path(m.name).name: m.name for m in tar.getmembers() if m.isfile()}


def read_blocks(source: RawSource, chunk_bytes: int) -> Iterator[tuple[bytearray, int]]:
    """Yield (whole lines, 1-based number of the first line), about chunk_bytes at a time.

    Memory is bounded by chunk_bytes plus the longest line, whatever the file's size. The
    block excludes the newline that ends its last line.
    """
    line_no = 1
    for block in _line_blocks(source, chunk_bytes):
        yield block, line_no
        line_no += block.count(b"\n") + 1


def _line_blocks(source: RawSource, chunk_bytes: int) -> Iterator[bytearray]:
    """The blocks of `read_blocks`, without line numbers: each read straight into a fresh
    buffer (only the partial last line is copied, to the start of the next one)."""
    tail = b""
    with source.open() as fh:
        while True:
            buf = bytearray(len(tail) + chunk_bytes)
            buf[: len(tail)] = tail
            n = fh.readinto(memoryview(buf)[len(tail) :])
            if not n:
                break
            del buf[len(tail) + n :]
            cut = buf.rfind(b"\n")
            if cut < 0:
                tail = bytes(buf)
                continue
            tail = bytes(memoryview(buf)[cut + 1 :])
            del buf[cut:]
            yield buf
    if tail:
        yield bytearray(tail)


def ordered_map(fn, items: Iterable[tuple], workers: int, in_flight: int) -> Iterator:
    """`fn(*item)` for each item, in order, on `workers` threads with at most `in_flight`
    items submitted and not yet consumed (so memory stays bounded); in this thread when
    workers <= 1."""
    if workers <= 1:
        for item in items:
            yield fn(*item)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class SeenKeys:
    """Exact-duplicate detection over a whole file in 8 bytes per key (64-bit hashes).

    Keys live in a few sorted runs of growing size (merged like a binary counter), so checking
    a chunk costs a binary search per run. Two distinct keys share a hash with probability about
    n^2 / 2^65 (about 2e-4 for all 84M Ali-CCP impressions).
    """

    def __init__(self, max_runs: int = 8):
        self._runs: list[np.ndarray] = []
        self._max_runs = max_runs

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def check_and_add(self, hashes: np.ndarray) -> np.ndarray:
        """True where a key was seen before (earlier in the file or the same batch)."""
        if len(hashes) == 0:
            return np.zeros(0, dtype=bool)
        keys = np.sort(hashes)  # the usual case, no key seen before: no need for the order
        if not (keys[1:] == keys[:-1]).any() and not any(
            (run[np.minimum(np.searchsorted(run, keys), len(run) - 1)] == keys).any()
            for run in self._runs
        ):
            self._add(keys)
            return np.zeros(len(hashes), dtype=bool)
        order = np.argsort(hashes, kind="stable")  # a batch repeat's first occurrence first
        keys = hashes[order]
        dup = np.zeros(len(keys), dtype=bool)
        dup[1:] = keys[1:] == keys[:-1]
        for run in self._runs:  # sorted queries: numpy's binary search reuses its last bound
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            dup |= run[pos] == keys
        if not dup.all():
            self._add(keys[~dup])
        in_order = np.empty(len(hashes), dtype=bool)
        in_order[order] = dup
        return in_order

    def _add(self, run: np.ndarray) -> None:
        """Add a sorted run; merge the newest runs while the last is as large as the one
        before (so there are about log2(keys / batch) runs), or while there are too many.
        Merging two sorted runs is linear (timsort finds them)."""
        self._runs.append(run)
        while len(self._runs) > 1 and (
            len(self._runs[-2]) <= len(self._runs[-1]) or len(self._runs) > self._max_runs
        ):
            last, before = self._runs.pop(), self._runs.pop()
            self._runs.append(np.sort(np.concatenate([before, last]), kind="stable"))


# --- stable key hashes ------------------------------------------------------------------------
#
# pandas' `hash_array(values, categorize=False)` on strings, re-done with numpy so that pandas
# (0.7 s to import) stays out of ingestion: SipHash-2-4 of each string's UTF-8 bytes under
# pandas' default key, then pandas' 64-bit mixing. The split of contexts into train and
# validation depends on these values, so they must not change (a test compares with pandas).

_SIP_KEY = b"0123456789123456"  # pandas.core.util.hashing._default_hash_key
_U64 = np.uint64


def _rotl(x: np.ndarray, bits: int) -> np.ndarray:
    return (x << _U64(bits)) | (x >> _U64(64 - bits))


def _sip_rounds(v: list[np.ndarray], rounds: int) -> None:
    v0, v1, v2, v3 = v
    for _ in range(rounds):
        v0 += v1
        v1 = _rotl(v1, 13)
        v1 ^= v0
        v0 = _rotl(v0, 32)
        v2 += v3
        v3 = _rotl(v3, 16)
        v3 ^= v2
        v0 += v3
        v3 = _rotl(v3, 21)
        v3 ^= v0
        v2 += v1
        v1 = _rotl(v1, 17)
        v1 ^= v2
        v2 = _rotl(v2, 32)
    v[:] = [v0, v1, v2, v3]


def _siphash(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """SipHash-2-4 of the byte strings at `starts` (`words`: a uint64 read at every offset)."""
    k0 = _U64(int.from_bytes(_SIP_KEY[:8], "little"))
    k1 = _U64(int.from_bytes(_SIP_KEY[8:], "little"))
    n = len(starts)
    v = [
        np.full(n, k0 ^ _U64(0x736F6D6570736575)),
        np.full(n, k1 ^ _U64(0x646F72616E646F6D)),
        np.full(n, k0 ^ _U64(0x6C7967656E657261)),
        np.full(n, k1 ^ _U64(0x7465646279746573)),
    ]
    for block in range(int(lengths.max(initial=0)) // 8):  # full 8-byte blocks
        more = lengths >= 8 * (block + 1)  # the strings that have this block
        if more.all():
            m = words[starts + 8 * block]
            v[3] ^= m
            _sip_rounds(v, 2)
            v[0] ^= m
            continue
        sub = np.flatnonzero(more)
        m = words[starts[sub] + 8 * block]
        part = [x[sub] for x in v]
        part[3] ^= m
        _sip_rounds(part, 2)
        part[0] ^= m
        for x, p in zip(v, part, strict=True):
            x[sub] = p
    tail = lengths & 7
    last = words[starts + (lengths - tail)] & _BYTE_MASKS[tail]
    b = (lengths.astype(np.uint64) << _U64(56)) | last
    v[3] ^= b
    _sip_rounds(v, 2)
    v[0] ^= b
    v[2] ^= _U64(0xFF)
    _sip_rounds(v, 4)
    return v[0] ^ v[1] ^ v[2] ^ v[3]


def hash_keys(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Stable 64-bit hashes of string keys (same on every run and machine); equal to
    `pandas.util.hash_array(keys, categorize=False)`."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if keys.null_count:
        raise ValueError("hash_keys: keys must not be null")
    keys = pc.cast(keys, pa.large_string())
    n = len(keys)
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int64)[keys.offset : keys.offset + n + 1]
    raw = keys.buffers()[2]
    data = np.frombuffer(raw, dtype=np.uint8) if raw is not None else np.zeros(0, np.uint8)
    data = np.concatenate([data[offsets[0] : offsets[-1]], np.zeros(8, dtype=np.uint8)])
    words = np.ndarray(shape=(len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    hashed = _siphash(words, offsets[:-1] - offsets[0], np.diff(offsets))
    # pandas' redistribution of the 64-bit values.
    hashed ^= hashed >> _U64(30)
    hashed *= _U64(0xBF58476D1CE4E5B9)
    hashed ^= hashed >> _U64(27)
    hashed *= _U64(0x94D049BB133111EB)
    hashed ^= hashed >> _U64(31)
    return hashed


# --- parsing -------------------------------------------------------------------------------

_SKELETON_NAMES = (
    SAMPLE_ID_KEY,
    CLICK_LABEL_KEY,
    CONVERSION_LABEL_KEY,
    COMMON_INDEX_KEY,
    "feature_num",
    "feature_list",
)
_COMMON_NAMES = (COMMON_INDEX_KEY, "feature_num", "feature_list")


@dataclass
class ParsedBlock:
    """One block, parsed: the valid rows, split into their output tables, and a reason for
    every other line."""

    first_line: int
    n_lines: int
    crlf: int
    head: pa.Table  # plain columns (no id/weight lists) of the valid rows, in line order
    parts: tuple[pa.Table, ...]  # the valid rows in the output schema: (train, valid) or (all,)
    key_hashes: np.ndarray  # hash of each valid row's unique key (sample id / context key)
    in_valid_split: np.ndarray  # each valid row's context hashes into the validation split
    context_runs: np.ndarray  # first row of each run of rows with the same context key
    context_hashes: np.ndarray  # hash of each run's context key
    bad_lines: np.ndarray  # 0-based positions of the quarantined lines within the block
    bad_reasons: list[str]
    bad_ids: list[str | None]  # sample id (or key) of each quarantined line, where readable
    unknown_fields: Counter
    train_counts: dict[str, tuple[np.ndarray, np.ndarray]] | None  # ids and counts in parts[0]

    @property
    def table(self) -> pa.Table:
        """The valid rows in line order, in the output schema."""
        if len(self.parts) == 1 or self.parts[1].num_rows == 0:
            return self.parts[0]
        line_order = np.argsort(np.argsort(self.in_valid_split, kind="stable"))
        return pc.take(pa.concat_tables(self.parts), _arrow(line_order))


def parse_block(
    block: bytes | bytearray,
    first_line: int,
    kind: str,
    valid_fraction: float | None = None,
    count: bool = False,
) -> ParsedBlock:
    """Vectorised parse of a block of `kind` ("skeleton" or "common") lines.

    With `valid_fraction` the valid rows are split by context into the parts (train, valid),
    without it there is one part; with `count` the ids in the first part are counted.
    Runs on a worker thread: everything here depends on the block alone. The block is parsed
    in pieces of about `_PIECE_BYTES` of whole lines, whose temporary arrays stay in the CPU
    cache (two threads parsing whole 16 MiB blocks at once thrash it).
    """
    view = memoryview(block)
    pieces = [_parse_lines(view[lo:hi], kind, valid_fraction) for lo, hi in _piece_bounds(block)]
    piece = pieces[0]
    if len(pieces) > 1:  # tables as chunks, not copied
        line_offsets = np.cumsum([0] + [p.n_lines for p in pieces[:-1]])
        row_offsets = np.cumsum([0] + [p.head.num_rows for p in pieces[:-1]])
        piece = _Piece(
            head=pa.concat_tables([p.head for p in pieces]),
            parts=tuple(
                pa.concat_tables([p.parts[i] for p in pieces]) for i in range(len(piece.parts))
            ),
            train_ids={
                f: [ids for p in pieces for ids in p.train_ids[f]] for f in pieces[0].train_ids
            },
            n_lines=sum(p.n_lines for p in pieces),
            crlf=sum(p.crlf for p in pieces),
            key_hashes=np.concatenate([p.key_hashes for p in pieces]),
            in_valid=np.concatenate([p.in_valid for p in pieces]),
            context_runs=np.concatenate(
                [p.context_runs + o for p, o in zip(pieces, row_offsets, strict=True)]
            ),
            context_hashes=np.concatenate([p.context_hashes for p in pieces]),
            bad_lines=np.concatenate(
                [p.bad_lines + o for p, o in zip(pieces, line_offsets, strict=True)]
            ),
            bad_reasons=[r for p in pieces for r in p.bad_reasons],
            bad_ids=[i for p in pieces for i in p.bad_ids],
            unknown_fields=sum((p.unknown_fields for p in pieces), Counter()),
        )
    train_counts = None
    if count:
        train_counts = {f: _value_counts(chunks) for f, chunks in piece.train_ids.items()}
    return ParsedBlock(
        first_line=first_line,
        n_lines=piece.n_lines,
        crlf=piece.crlf,
        head=piece.head,
        parts=piece.parts,
        key_hashes=piece.key_hashes,
        in_valid_split=piece.in_valid,
        context_runs=piece.context_runs,
        context_hashes=piece.context_hashes,
        bad_lines=piece.bad_lines,
        bad_reasons=piece.bad_reasons,
        bad_ids=piece.bad_ids,
        unknown_fields=piece.unknown_fields,
        train_counts=train_counts,
    )


_PIECE_BYTES = 4 << 20


def _piece_bounds(block: bytes | bytearray) -> list[tuple[int, int]]:
    """(start, end) of consecutive pieces of about _PIECE_BYTES of whole lines (each piece
    like a block: its lines without the newline after the last)."""
    bounds, start = [], 0
    while len(block) - start > _PIECE_BYTES + _PIECE_BYTES // 2:
        cut = block.find(b"\n", start + _PIECE_BYTES)
        if cut < 0:
            break
        bounds.append((start, cut))
        start = cut + 1
    bounds.append((start, len(block)))
    return bounds


@dataclass
class _Piece:
    """A parsed piece of a block; the fields of `ParsedBlock`, and for counting the ids of
    each field in the train part (numpy arrays, in chunks)."""

    head: pa.Table
    parts: tuple[pa.Table, ...]
    train_ids: dict[str, list[np.ndarray]]
    n_lines: int
    crlf: int  # lines that ended in CRLF (accepted)
    key_hashes: np.ndarray
    in_valid: np.ndarray
    context_runs: np.ndarray
    context_hashes: np.ndarray
    bad_lines: np.ndarray
    bad_reasons: list[str]
    bad_ids: list[str | None]
    unknown_fields: Counter


def _value_counts(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct int64 values of the chunks and how often each occurs."""
    found = pc.value_counts(pa.chunked_array([_arrow(c) for c in chunks], pa.int64()))
    return _ints(found.field("values")), _ints(found.field("counts"))


# --- the block parser ------------------------------------------------------------------------
#
# A block is parsed as bytes, with numpy, without splitting it into Python strings. One pass
# finds every byte below '-' (0x2d): the newlines, commas and 0x01-0x03 separators, the
# "tokens" of the format (other bytes down there, such as '\r' or '+', are content). A valid
# line's tokens read `,`*(n_cols-1) then nothing or `2 3 (1 2 3)*`, then its newline; that is
# checked on pairs of neighbouring tokens, so no per-token line number is ever computed. The
# spans between tokens then become Arrow string arrays over the block's memory, which Arrow's
# C kernels turn into ids and weights.

_NL, _CR, _COMMA = 10, 13, 44
# What Arrow's float cast reads, less "nan"/"inf" (no weights) and a leading '+' (not read).
_FLOAT_RE = r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
_LOW = 0x2D  # every token byte is below '-'; digits, '.', '-', 'e' and letters are not
# Token codes: 0 = content byte, then the three feature-list separators, newline, comma.
_TOKEN_CODE = np.zeros(256, dtype=np.uint8)
_TOKEN_CODE[[1, 2, 3, _NL, _COMMA]] = [1, 2, 3, 4, 5]
_T_ENTRY, _T_NL = 2, 4  # 0x02 opens an entry's id; a newline ends a line
# Allowed (previous token, token) pairs: a line is `,`* then `2 3 (1 2 3)*` or nothing, then
# its newline. With the comma count checked separately, these pairs are the whole grammar.
_ALLOWED = np.zeros((6, 6), dtype=bool)
for _prev, _next in ((4, 5), (4, 4), (5, 5), (5, 2), (5, 4), (2, 3), (3, 1), (3, 4), (1, 2)):
    _ALLOWED[_prev, _next] = True
_DISALLOWED = ~_ALLOWED.ravel()
# Low-bits masks of a little-endian uint64 holding the first n bytes of a field id.
_BYTE_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(8)] + [2**64 - 1], dtype=np.uint64)


def _offsets_type(size: int) -> tuple[type, pa.DataType]:
    """Offset dtype and string type able to address a block of `size` bytes."""
    return (np.int32, pa.string()) if size < 2**31 else (np.int64, pa.large_string())


def _interleaved(buffer: pa.Buffer, starts: np.ndarray, ends: np.ndarray, valid=None) -> pa.Array:
    """A string array over the block whose even elements are the spans [starts, ends) and
    whose odd elements are the gaps between them (null, and so skipped by kernels, when
    `valid` is given: True, or a mask that makes an even element null where it is False).

    Spans must be ordered and non-overlapping; nothing is copied."""
    n = len(starts)
    dtype, string_type = _offsets_type(buffer.size)
    offsets = np.empty(2 * n + 1, dtype=dtype)
    offsets[0:-1:2], offsets[1::2] = starts, ends
    offsets[-1] = ends[-1] if n else 0
    bitmap = None
    if valid is True or (valid is not None and valid.all()):  # even elements valid, odd null
        bitmap = pa.py_buffer(np.full((2 * n + 7) // 8, 0x55, dtype=np.uint8))
    elif valid is not None:
        mask = np.zeros(2 * n, dtype=bool)
        mask[0::2] = valid
        bitmap = pa.py_buffer(np.packbits(mask, bitorder="little"))
    cls = pa.StringArray if string_type == pa.string() else pa.LargeStringArray
    return cls.from_buffers(2 * n, pa.py_buffer(offsets), buffer, bitmap)


def _spans(buffer: pa.Buffer, starts: np.ndarray, ends: np.ndarray) -> pa.StringArray:
    """Strings block[starts[i]:ends[i]] (copied) for ordered, non-overlapping spans."""
    if len(starts) == 0:
        return _strings([])
    every_other = _arrow(np.arange(0, 2 * len(starts), 2, dtype=np.int64))
    spans = pc.take(_interleaved(buffer, starts, ends), every_other)
    return spans if spans.type == pa.string() else pc.cast(spans, pa.string())


_NUMPY_TYPES = {pa.int64(): np.int64, pa.float32(): np.float32}


def _cast_spans(
    buffer: pa.Buffer, starts: np.ndarray, ends: np.ndarray, valid: np.ndarray, to: pa.DataType
) -> np.ndarray:
    """The spans parsed as `to` where `valid` (elsewhere 0), without copying them out.

    Raises:
        pa.ArrowInvalid: a valid span does not parse.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=_NUMPY_TYPES[to])
    parsed = pc.cast(_interleaved(buffer, starts, ends, valid), to)
    values = np.frombuffer(parsed.buffers()[1], dtype=_NUMPY_TYPES[to])
    return values[parsed.offset : parsed.offset + 2 * len(starts) : 2]


# A field id of at most 7 bytes is identified by one uint64: its bytes and the 0x02 after it
# (little-endian; where the 0x02 sits gives the length, so "101" and "101\x00" differ). The
# first 8 bytes of a longer id hold no 0x02, so they match no known field.
_FIELD_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(1, 8)] + [2**64 - 1], dtype=np.uint64)
_HASH_BITS = 7  # 128 slots for the known fields


@functools.lru_cache
def _field_table(fields: tuple[str, ...]) -> tuple[np.uint64, np.ndarray, np.ndarray]:
    """A perfect hash of the fields' keys: multiplier, key of each slot, field of each slot
    (len(fields) in the empty slots, whose key matches nothing)."""
    raw = [f.encode() for f in fields]
    if any(len(r) > 7 for r in raw):
        raise ValueError(f"field ids longer than 7 bytes are not supported: {fields}")
    keys = np.array([int.from_bytes(r + b"\x02", "little") for r in raw], dtype=np.uint64)
    rng = np.random.default_rng(0)  # deterministic search for a collision-free multiplier
    while True:
        mult = np.uint64(rng.integers(0, 2**63, dtype=np.uint64) * 2 + 1)
        slots = (keys * mult) >> np.uint64(64 - _HASH_BITS)
        if len(np.unique(slots)) == len(keys):
            break
    slot_keys = np.zeros(1 << _HASH_BITS, dtype=np.uint64)  # 0: no key (all hold a 0x02)
    slot_fields = np.full(1 << _HASH_BITS, len(fields), dtype=np.uint8)
    slot_keys[slots], slot_fields[slots] = keys, np.arange(len(fields))
    return mult, slot_keys, slot_fields


def _field_index(
    data: np.ndarray, starts: np.ndarray, lengths: np.ndarray, fields: tuple[str, ...]
) -> np.ndarray:
    """Index in `fields` of each field id block[starts:starts + lengths], each followed by its
    0x02 (len(fields) where unknown)."""
    mult, slot_keys, slot_fields = _field_table(fields)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint8)
    if starts.max() + 8 > len(data):  # the window reads 8 bytes: pad the tail of the block
        data = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    # An unaligned little-endian uint64 at every byte offset of the block.
    words = np.ndarray(shape=(len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    keys = words[starts]
    keys &= np.take(_FIELD_MASKS, lengths, mode="clip")
    slot = keys * mult
    slot >>= np.uint64(64 - _HASH_BITS)
    slot = slot.view(np.int64)
    found = np.take(slot_fields, slot)
    unknown = np.take(slot_keys, slot) != keys
    if unknown.any():
        found[unknown] = len(fields)
    return found


def _parse_lines(block: memoryview, kind: str, valid_fraction: float | None) -> _Piece:
    """Vectorised parse of a block of lines; lines with a defect get a reason instead of values.

    With `valid_fraction` the valid rows are split by context into the parts (train, valid)
    as the entries are grouped per field, so no table is filtered afterwards."""
    skeleton = kind == "skeleton"
    names, fields = (
        (_SKELETON_NAMES, SKELETON_FIELDS) if skeleton else (_COMMON_NAMES, COMMON_FIELDS)
    )
    n_cols = len(names)
    data = np.frombuffer(block, dtype=np.uint8)
    buffer = pa.py_buffer(block)

    # Tokens, with a virtual newline ending the block's last line and two more as padding
    # (at positions len(data) + 0, 1, 2: the first ends the last line, the others are never
    # read for a valid line). Positions are int32 where they fit: half the memory traffic.
    low = np.empty(len(data) + 3, dtype=bool)
    np.less(data, _LOW, out=low[: len(data)])
    low[len(data) :] = True
    pos = np.flatnonzero(low)
    code = np.empty(len(pos), dtype=np.uint8)
    np.take(_TOKEN_CODE, data[pos[:-3]], out=code[:-3])
    code[-3:] = _T_NL
    if not code.all():  # '\r', '+', spaces...: content, not tokens
        pos, code = pos[code != 0], code[code != 0]
    pos = pos.astype(_offsets_type(len(data) + 3)[0])

    # Lines.
    nl_tok = np.flatnonzero(code[:-2] == _T_NL)  # token index of each line's newline
    n_lines = len(nl_tok)
    ends = pos[nl_tok]
    starts = np.empty_like(ends)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    crlf = np.zeros(n_lines, dtype=bool)
    crlf[ends > starts] = data[ends[ends > starts] - 1] == _CR
    ends = ends - crlf
    pos[nl_tok] = ends  # a value ending a CRLF line ends before the '\r'
    reasons = np.zeros(n_lines, dtype=np.uint8)  # index in _REASONS, 0 = valid so far
    reasons[starts == ends] = _REASON_CODE[R_EMPTY]

    # Invalid UTF-8 needs a byte >= 0x80: only lines holding one are decoded to check.
    if len(data) and data.max() >= 0x80:
        high = np.flatnonzero(data >= 0x80)
        for line in np.unique(np.searchsorted(ends, high)):
            try:
                bytes(block[starts[line] : ends[line]]).decode("utf-8")
            except UnicodeDecodeError:
                reasons[line] = _REASON_CODE[R_UTF8]

    # Columns: exactly n_cols - 1 commas (a feature list holds none).
    comma_tok = np.flatnonzero(code == 5)
    commas_before = np.searchsorted(comma_tok, nl_tok)  # commas before each line's end
    first_comma_tok = np.concatenate([[0], commas_before[:-1]])
    n_commas = commas_before - first_comma_tok
    reasons[(n_commas != n_cols - 1) & (reasons == 0)] = _REASON_CODE[R_COLUMNS]
    comma_pos = pos[comma_tok]
    has_comma = n_commas > 0
    first_comma = np.full(n_lines, np.iinfo(np.int64).max)
    first_comma[has_comma] = comma_pos[first_comma_tok[has_comma]]
    # Text up to the first comma (at most _MAX_ID_CHARS: a line without commas is no id),
    # kept only for the lines that get a reason (quarantine.csv).
    first_column_end = np.minimum(np.minimum(first_comma, ends), starts + _MAX_ID_CHARS)

    # Structure: every pair of neighbouring tokens must be allowed; a pair belongs to the line
    # of its second token (a newline belongs to the line it ends).
    pairs = np.empty(len(code), dtype=np.uint8)
    pairs[0] = _T_NL * 6 + code[0]
    np.multiply(code[:-1], 6, out=pairs[1:])
    pairs[1:] += code[1:]
    bad_tok = np.flatnonzero(np.take(_DISALLOWED, pairs[: nl_tok[-1] + 1]))
    struct_bad = np.zeros(n_lines, dtype=bool)
    struct_bad[np.searchsorted(nl_tok, bad_tok)] = True
    reasons[struct_bad & (reasons == 0)] = _REASON_CODE[R_ENTRY]

    # Entries (one per 0x02 token) of the lines still valid: field, id, value spans.
    entry_tok = np.flatnonzero(code[: nl_tok[-1]] == _T_ENTRY)
    per_line = np.diff(np.searchsorted(entry_tok, nl_tok), prepend=0)
    line_ok = reasons == 0
    all_ok = bool(line_ok.all())  # the usual case: no per-entry mask needed
    entry_ok = True if all_ok else np.repeat(line_ok, per_line)
    two = pos[entry_tok]
    field_start = pos[entry_tok - 1] + 1
    three = pos[1:][entry_tok]
    value_end = pos[2:][entry_tok]
    id_start, value_start = two + 1, three + 1
    # Spans of the other entries may be garbage: make them empty, keeping the order.
    if not all_ok:
        field_start = np.where(entry_ok, field_start, two)
        three = np.where(entry_ok, three, two)
        value_end = np.where(entry_ok, value_end, two)
        id_start = np.where(entry_ok, id_start, two)
        value_start = np.where(entry_ok, value_start, two)

    id_ok = value_ok = None  # None: every entry's id / value parsed
    try:  # fast path: every id is an integer
        ids = _cast_spans(buffer, id_start, three, entry_ok, pa.int64())
        # Arrow also reads "-0", hexadecimal ("0x1F") and 19 digits: an id is at most 18
        # decimal digits.
        lead = np.take(data, id_start, mode="clip") if len(data) else np.zeros(0, np.uint8)
        length = three - id_start
        odd = (lead == ord("-")) | ((lead == ord("0")) & (length > 2)) | (length > 18)
        if (odd & entry_ok).any():
            raise pa.ArrowInvalid("an id that is not decimal digits")
    except pa.ArrowInvalid:  # some id is not (rare, slower): digits only
        entry_ok = np.broadcast_to(entry_ok, len(two))
        tokens = _interleaved(buffer, id_start, three, entry_ok)
        digits = _bools(pc.ascii_is_decimal(tokens))[0::2]
        id_ok = digits & (three - id_start <= 18)  # at most 18 digits always fit int64
        ids = _cast_spans(buffer, id_start, three, entry_ok & id_ok, pa.int64())
    try:
        wts = _cast_spans(buffer, value_start, value_end, entry_ok, pa.float32())
    except pa.ArrowInvalid:  # some value is not a number: find which (rare, slower)
        entry_ok = np.broadcast_to(entry_ok, len(two))
        tokens = _interleaved(buffer, value_start, value_end, entry_ok)
        value_ok = _bools(pc.match_substring_regex(tokens, _FLOAT_RE))[0::2]
        wts = _cast_spans(buffer, value_start, value_end, entry_ok & value_ok, pa.float32())
    field_length = two - field_start
    # "nan" and "inf" parse as floats but are no weights; an empty field id is no field.
    if not (
        all_ok
        and id_ok is None
        and value_ok is None
        and ids.min(initial=0) >= 0
        and np.isfinite(wts).all()
        and field_length.min(initial=1) > 0
    ):
        id_ok = ids >= 0 if id_ok is None else id_ok
        value_ok = np.isfinite(wts) if value_ok is None else value_ok & np.isfinite(wts)
        entry_bad = entry_ok & ~(id_ok & value_ok & (field_length > 0))
        if entry_bad.any():
            reasons[np.searchsorted(nl_tok, entry_tok[entry_bad])] = _REASON_CODE[R_ENTRY]
            line_ok = reasons == 0

    # Plain columns of the lines still valid: (n_ok, n_cols - 1) comma positions.
    ok_lines = np.flatnonzero(line_ok)
    if len(ok_lines) == n_lines:  # each line has its n_cols - 1 commas, in order
        ok_commas = comma_pos.reshape(n_lines, n_cols - 1)
        ok_starts, ok_ends = starts, ends
    else:
        ok_commas = comma_pos[first_comma_tok[ok_lines, None] + np.arange(n_cols - 1)]
        ok_starts, ok_ends = starts[ok_lines], ends[ok_lines]
    col = {name: i for i, name in enumerate(names)}

    def column(name: str) -> tuple[np.ndarray, np.ndarray]:
        """Start and end of each valid line's column `name`."""
        i = col[name]
        start = ok_starts if i == 0 else ok_commas[:, i - 1] + 1
        return start, (ok_commas[:, i] if i < n_cols - 1 else ok_ends)

    row_reason = np.zeros(len(ok_lines), dtype=np.uint8)
    num_start, num_end = column("feature_num")
    try:  # fast path: every feature_num is an integer of at most 18 digits
        declared = _cast_spans(buffer, num_start, num_end, True, pa.int64())
        lead = np.take(data, num_start, mode="clip") if len(data) else np.zeros(0, np.uint8)
        length = num_end - num_start
        if ((lead == ord("-")) | ((lead == ord("0")) & (length > 2)) | (length > 18)).any():
            raise pa.ArrowInvalid("a feature_num that is not decimal digits")
    except pa.ArrowInvalid:  # digits only (Arrow also reads "-0" and "0x1F")
        num_ok = _bools(pc.ascii_is_decimal(_spans(buffer, num_start, num_end)))
        num_ok &= num_end - num_start <= 18
        declared = np.where(num_ok, _cast_spans(buffer, num_start, num_end, num_ok, pa.int64()), -1)
    row_reason[declared != per_line[ok_lines]] = _REASON_CODE[R_FEATURE_NUM]
    labels: dict[str, np.ndarray] = {}
    if skeleton:
        for key in (CLICK_LABEL_KEY, CONVERSION_LABEL_KEY):
            start, end = column(key)
            byte = data[np.minimum(start, len(data) - 1)]
            labels[key] = np.where((end - start == 1) & ((byte | 1) == ord("1")), byte - 48, -1)
        click, conv = labels[CLICK_LABEL_KEY], labels[CONVERSION_LABEL_KEY]
        row_reason[((click < 0) | (conv < 0)) & (row_reason == 0)] = _REASON_CODE[R_LABEL]
        no_click = (click == 0) & (conv == 1) & (row_reason == 0)
        row_reason[no_click] = _REASON_CODE[R_CONV_NO_CLICK]
    reasons[ok_lines] = row_reason
    keep = row_reason == 0
    all_valid = bool(keep.all())
    kept_lines = ok_lines if all_valid else ok_lines[keep]
    n_keep = len(kept_lines)

    columns: dict[str, pa.Array] = {}
    for name in col:
        if name in (CLICK_LABEL_KEY, CONVERSION_LABEL_KEY):
            columns[name] = _arrow(
                (labels[name] if all_valid else labels[name][keep]).astype(np.int8)
            )
        elif name not in ("feature_num", "feature_list"):
            start, end = column(name)
            columns[name] = _spans(
                buffer, *((start, end) if all_valid else (start[keep], end[keep]))
            )
    head = pa.table(columns)

    # Keys: the unique key's hash (duplicates), runs of equal context keys and their hashes
    # (the join, and the train/valid split by context).
    runs, context_hashes = _key_runs(columns[COMMON_INDEX_KEY])
    run_lengths = np.diff(runs, append=n_keep)
    if skeleton:
        key_hashes = hash_keys(columns[SAMPLE_ID_KEY])
    else:  # the unique key is the context key
        key_hashes = np.repeat(context_hashes, run_lengths)
    if valid_fraction is None:
        in_valid = np.zeros(n_keep, dtype=bool)
        part_sizes = [n_keep]
    else:
        in_valid = np.repeat(_in_valid(context_hashes, valid_fraction), run_lengths)
        n_valid = int(np.count_nonzero(in_valid))
        part_sizes = [n_keep - n_valid, n_valid]

    # Entries of kept lines, grouped per field and part (stable, so in line order) into list
    # columns: group = field * parts + part.
    all_kept = n_keep == n_lines
    if not all_kept:
        entry_keep = np.flatnonzero(np.repeat(reasons == 0, per_line))
        field_start, two = field_start[entry_keep], two[entry_keep]
        field_length = field_length[entry_keep]
    kept_per_line = per_line if all_kept else per_line[kept_lines]
    field_index = _field_index(data, field_start, field_length, fields)
    unknown = _unknown_fields(block, field_start, two, field_index, fields)
    # Rows in part order (train rows, then valid rows), each part in line order.
    if len(part_sizes) == 1:
        group, rank, part_head = field_index, np.arange(n_keep), head
    else:
        group = field_index * np.uint8(2)
        group += np.repeat(in_valid, kept_per_line).view(np.uint8)
        row_order = np.argsort(in_valid, kind="stable")
        rank = np.empty(n_keep, dtype=np.int64)
        rank[row_order] = np.arange(n_keep)
        part_head = pc.take(head, _arrow(row_order))
    order = np.argsort(group, kind="stable")
    if not all_kept:
        order = entry_keep[order]
    ids = ids[order]
    ids_array, wts_array = _arrow(ids), _arrow(wts[order])
    counts = np.bincount(
        field_index.astype(np.int64) * n_keep + np.repeat(rank, kept_per_line),
        minlength=(len(fields) + 1) * n_keep,
    ).reshape(len(fields) + 1, n_keep)  # entries per field and row (in part order)
    field_first = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])  # in the sorted entries
    schema = _impression_schema() if skeleton else _common_schema()
    parts = []
    train_ids: dict[str, list[np.ndarray]] = {}
    row, before = 0, np.zeros(len(fields) + 1, dtype=np.int64)  # in the parts before
    for p, n_rows in enumerate(part_sizes):
        offsets = np.zeros((len(fields) + 1, n_rows + 1), dtype=np.int32)
        np.cumsum(counts[:, row : row + n_rows], axis=1, out=offsets[:, 1:])
        all_offsets = _arrow(offsets.ravel())
        arrays = list(part_head.slice(row, n_rows).columns)
        for k, f in enumerate(fields):
            lo, n = int(field_first[k] + before[k]), int(offsets[k, -1])
            field_offsets = all_offsets.slice(k * (n_rows + 1), n_rows + 1)
            arrays.append(pa.ListArray.from_arrays(field_offsets, ids_array.slice(lo, n)))
            arrays.append(pa.ListArray.from_arrays(field_offsets, wts_array.slice(lo, n)))
            if p == 0:
                train_ids[f] = [ids[lo : lo + n]]
        before += offsets[:, -1]
        row += n_rows
        parts.append(pa.Table.from_arrays(arrays, schema=schema))

    bad = np.flatnonzero(reasons)
    # Decoded leniently: the cap may cut a multi-byte character.
    bad_ids = [
        None
        if reasons[line] == _REASON_CODE[R_UTF8]
        else bytes(block[starts[line] : first_column_end[line]]).decode("utf-8", "replace")
        for line in bad.tolist()
    ]
    return _Piece(
        head=head,
        parts=tuple(parts),
        train_ids=train_ids,
        n_lines=n_lines,
        crlf=int(crlf.sum()),
        key_hashes=key_hashes,
        in_valid=in_valid,
        context_runs=runs,
        context_hashes=context_hashes,
        bad_lines=bad,
        bad_reasons=[_REASONS[code] for code in reasons[bad].tolist()],
        bad_ids=bad_ids,
        unknown_fields=unknown,
    )


def _unknown_fields(
    block: bytes | bytearray,
    starts: np.ndarray,
    ends: np.ndarray,
    field_index: np.ndarray,
    fields: tuple[str, ...],
) -> Counter:
    """Entries per field id not in `fields` (decoded once per distinct id)."""
    unknown = np.flatnonzero(field_index == len(fields))
    if len(unknown) == 0:
        return Counter()
    spans = np.stack([starts[unknown], ends[unknown]], axis=1)
    texts = Counter(bytes(block[s:e]) for s, e in spans.tolist())
    return Counter({text.decode("utf-8"): n for text, n in texts.items()})


class _SplitWriters:
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
    dictionary overflows and is dropped, after costing 40% of the writing time; without it
    the file is also smaller), and min/max statistics only for the plain columns (no reader
    uses those of the id and weight lists; skipping them saves about a tenth of the writing
    time)."""
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
def _common_schema() -> pa.Schema:
    return _schema([pa.field(COMMON_INDEX_KEY, pa.string())], COMMON_FIELDS)


@functools.cache
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


@dataclass
class _FileJob:
    """One raw file to ingest and where its rows go."""

    source: RawSource
    kind: str  # "common" or "skeleton"
    writers: _SplitWriters
    out_splits: tuple[str, ...]  # ("train", "valid") or ("test",)
    split_counts: dict[str, int]  # rows written per split, updated as they are
    vocab: _VocabCounter | None  # counts the ids of the rows written to the train split
    prefix: str  # prepended to sample ids and context keys (earlier batches of a window)


def _ingest_files(
    jobs: list[_FileJob], cfg: IngestConfig, workers: int, quarantine
) -> list[FileReport]:
    """Ingest the files in order, each skeleton file joined with the common file before it.

    The blocks of all files go through one pool of parsing threads, so the threads start
    on the next file while this one finishes the last blocks of the current one."""
    items = (
        (n, block, job.kind, cfg.valid_fraction if len(job.out_splits) == 2 else None, job.vocab)
        for n, job in enumerate(jobs)
        for block in _line_blocks(job.source, cfg.chunk_bytes)
    )
    files: list[_FileIngest] = []

    def next_file() -> _FileIngest:
        job = jobs[len(files)]
        known_keys = None
        if files:
            keys = files[-1].finish()
            known_keys = keys if job.kind == "skeleton" else None
        files.append(_FileIngest(job, quarantine, known_keys))
        return files[-1]

    for n, pb in ordered_map(_parse_job, items, workers, in_flight=workers + 1):
        while len(files) <= n:  # files before n without a single block are empty
            next_file()
        files[-1].add(pb)
    while len(files) < len(jobs):
        next_file()
    if files:
        files[-1].finish()
    return [f.report for f in files]


def _parse_job(
    n: int, block: bytearray, kind: str, valid_fraction: float | None, vocab
) -> tuple[int, ParsedBlock]:
    return n, parse_block(block, 0, kind, valid_fraction, count=vocab is not None)


class _FileIngest:
    """The checks that need a whole file so far (duplicate keys, known context keys), the
    quarantine, the report and the writing of one raw file's parsed blocks, in order."""

    def __init__(self, job: _FileJob, quarantine, known_keys: KnownKeys | None):
        """`known_keys`: the context keys a skeleton file's rows must have (else quarantined)."""
        self.job = job
        self.report = FileReport(str(job.source))
        self._quarantine = quarantine
        self._known_keys = known_keys
        self._seen = SeenKeys()
        self._written_keys: list[pa.Array] = []
        self._written_hashes: list[np.ndarray] = []
        self._next_line = 1  # line numbers follow from each block's line count

    def add(self, pb: ParsedBlock) -> None:
        job, rep = self.job, self.report
        skeleton = job.kind == "skeleton"
        fields = SKELETON_FIELDS if skeleton else COMMON_FIELDS
        pb.first_line, self._next_line = self._next_line, self._next_line + pb.n_lines
        head = pb.head
        n_rows = head.num_rows
        known = np.ones(n_rows, dtype=bool)
        if self._known_keys is not None:  # one look-up per run of rows with the same context
            keys = pc.take(head[COMMON_INDEX_KEY].combine_chunks(), _arrow(pb.context_runs))
            known_runs = self._known_keys.contains(keys, pb.context_hashes)
            if not known_runs.all():
                known = np.repeat(known_runs, np.diff(pb.context_runs, append=n_rows))
        dup = np.zeros(n_rows, dtype=bool)
        dup[known] = self._seen.check_and_add(pb.key_hashes[known])
        keep = known & ~dup
        in_valid = pb.in_valid_split
        part_keep = [keep] if len(pb.parts) == 1 else [keep[~in_valid], keep[in_valid]]
        if job.vocab is not None:  # the worker counted the train part: take out rejected rows
            job.vocab.add(pb.train_counts)
            if not part_keep[0].all():
                job.vocab.add(_id_counts(pb.parts[0], ~part_keep[0], fields), sign=-1)

        # Quarantine: lines rejected by the worker and rows rejected above, in line order.
        entries = list(zip(pb.bad_lines.tolist(), pb.bad_ids, pb.bad_reasons, strict=True))
        rejected = np.flatnonzero(~keep)
        if len(rejected):
            row_lines = np.delete(np.arange(pb.n_lines), pb.bad_lines)  # line of each row
            key_col = head[SAMPLE_ID_KEY if skeleton else COMMON_INDEX_KEY]
            dup_reason = R_DUP_SAMPLE if skeleton else R_DUP_KEY
            entries += [
                (
                    int(row_lines[i]),
                    key_col[int(i)].as_py(),
                    dup_reason if known[i] else R_UNKNOWN_KEY,
                )
                for i in rejected
            ]
        for line, key, reason in sorted(entries, key=lambda e: e[0]):
            self._quarantine.writerow(
                [job.prefix + job.source.name, pb.first_line + line, key, reason]
            )
            rep.quarantined_by_reason[reason] = rep.quarantined_by_reason.get(reason, 0) + 1

        rep.rows_read += pb.n_lines
        rep.rows_written += n_rows - len(rejected)
        rep.rows_quarantined += len(entries)
        rep.crlf_lines += pb.crlf
        for fid, n in pb.unknown_fields.items():
            rep.unknown_fields[fid] = rep.unknown_fields.get(fid, 0) + n
        if not skeleton:
            context_keys = head[COMMON_INDEX_KEY].combine_chunks()
            if len(rejected):
                context_keys = pc.filter(context_keys, _arrow(keep))
            self._written_keys.append(context_keys)
            self._written_hashes.append(pb.key_hashes[keep])
        for split, part, part_kept in zip(job.out_splits, pb.parts, part_keep, strict=True):
            if not part_kept.all():
                part = pc.filter(part, _arrow(part_kept))
            if job.prefix:
                part = _prefixed(part, job.prefix, (SAMPLE_ID_KEY, COMMON_INDEX_KEY))
            job.writers.write(split, part)
            job.split_counts[split] += part.num_rows

    def finish(self) -> KnownKeys:
        """The unique keys the file held (context keys of a common file, without prefix)."""
        keys = pa.concat_arrays(self._written_keys) if self._written_keys else _strings([])
        hashes = (
            np.concatenate(self._written_hashes)
            if self._written_hashes
            else np.zeros(0, dtype=np.uint64)
        )
        return KnownKeys(keys, hashes)


def _prefixed(table: pa.Table, prefix: str, columns: tuple[str, ...]) -> pa.Table:
    """`table` with `prefix` prepended to each of `columns` it has."""
    for name in columns:
        if name in table.column_names:
            i = table.column_names.index(name)
            joined = pc.binary_join_element_wise(prefix, table[name], "")
            table = table.set_column(i, table.field(i), joined)
    return table


# --- vocabularies ----------------------------------------------------------------------------


def _id_counts(
    table: pa.Table, rows: np.ndarray | None, fields: tuple[str, ...]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Distinct ids and their counts per field over `rows` (a mask; None: all rows)."""
    if rows is not None:
        table = pc.filter(table, _arrow(rows))
    counts = {}
    for f in fields:
        found = pc.value_counts(pc.list_flatten(table[ids_key(f)]))
        counts[f] = (_ints(found.field("values")), _ints(found.field("counts")))
    return counts


class _VocabCounter:
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
            pa.chunked_array([_arrow(ids) for ids, _ in parts], pa.int64()),
            pa.chunked_array([_arrow(n) for _, n in parts], pa.int64()),
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
                    [_strings([f] * len(order)), _arrow(ids[keep][order]), _arrow(n[keep][order])],
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
        return _ints(sums.field(1)), _ints(sums.field(0))
    table = pa.Table.from_arrays([keys, counts], names=["key", "count"])
    sums = table.group_by("key").aggregate([("count", "sum")])
    return _ints(sums["key"]), _ints(sums["count_sum"])


def _ints(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """An int64 column without nulls as numpy (see `_arrow` for why not to_numpy)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros(0, dtype=np.int64)
    values = np.frombuffer(array.buffers()[1], dtype=np.int64)
    return values[array.offset : array.offset + len(array)]


def load_vocabularies(path: Path) -> dict[str, np.ndarray]:
    """Read `vocab.parquet` into {field: sorted int64 ids}."""
    table = pq.read_table(path)
    return {
        f: table.filter(pc.equal(table["field"], f))["feature_id"].to_numpy().astype(np.int64)
        for f in COMMON_FIELDS + SKELETON_FIELDS
    }
