"""Ingestion of a raw folder, end to end: each raw file's blocks parsed on a pool of threads,
then, in file order, the checks that need the whole file so far (duplicate keys, known context
keys), the quarantine, the report, the split Parquet writers and the vocabulary."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aliccp.format import R_DUP_KEY, R_DUP_SAMPLE, R_UNKNOWN_KEY, SPLITS
from models.features import COMMON_FIELDS, COMMON_INDEX_KEY, SAMPLE_ID_KEY, SKELETON_FIELDS
from tasks.config import IngestConfig
from tasks.ingest.arrays import arrow, strings
from tasks.ingest.keys import KnownKeys, SeenKeys
from tasks.ingest.memory import steady_allocator
from tasks.ingest.parse import ParsedBlock, parse_block
from tasks.ingest.report import FileReport, IngestError, IngestReport
from tasks.ingest.sources import RawSource, find_raw_files, line_blocks, ordered_map
from tasks.ingest.vocab import VocabCounter, id_counts
from tasks.ingest.writers import SplitWriters, common_schema, impression_schema


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
    with steady_allocator():
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
    impressions = SplitWriters(out_dir, "impressions.parquet", SPLITS)
    contexts = SplitWriters(out_dir, "common.parquet", SPLITS)
    vocab = VocabCounter()  # counted as the train split is written
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
    impressions.close(impression_schema())
    contexts.close(common_schema())

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


@dataclass
class _FileJob:
    """One raw file to ingest and where its rows go."""

    source: RawSource
    kind: str  # "common" or "skeleton"
    writers: SplitWriters
    out_splits: tuple[str, ...]  # ("train", "valid") or ("test",)
    split_counts: dict[str, int]  # rows written per split, updated as they are
    vocab: VocabCounter | None  # counts the ids of the rows written to the train split
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
        for block in line_blocks(job.source, cfg.chunk_bytes)
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
        """Check, quarantine, count and write the next block of the file."""
        job, rep = self.job, self.report
        skeleton = job.kind == "skeleton"
        fields = SKELETON_FIELDS if skeleton else COMMON_FIELDS
        pb.first_line, self._next_line = self._next_line, self._next_line + pb.n_lines
        known, keep = self._kept_rows(pb)
        in_valid = pb.in_valid_split
        part_keep = [keep] if len(pb.parts) == 1 else [keep[~in_valid], keep[in_valid]]
        if job.vocab is not None:  # the worker counted the train part: take out rejected rows
            job.vocab.add(pb.train_counts)
            if not part_keep[0].all():
                job.vocab.add(id_counts(pb.parts[0], ~part_keep[0], fields), sign=-1)
        rejected = np.flatnonzero(~keep)
        n_quarantined = self._quarantine_block(pb, known, rejected)

        rep.rows_read += pb.n_lines
        rep.rows_written += pb.head.num_rows - len(rejected)
        rep.rows_quarantined += n_quarantined
        rep.crlf_lines += pb.crlf
        for fid, n in pb.unknown_fields.items():
            rep.unknown_fields[fid] = rep.unknown_fields.get(fid, 0) + n
        if not skeleton:
            context_keys = pb.head[COMMON_INDEX_KEY].combine_chunks()
            if len(rejected):
                context_keys = pc.filter(context_keys, arrow(keep))
            self._written_keys.append(context_keys)
            self._written_hashes.append(pb.key_hashes[keep])
        for split, part, part_kept in zip(job.out_splits, pb.parts, part_keep, strict=True):
            if not part_kept.all():
                part = pc.filter(part, arrow(part_kept))
            if job.prefix:
                part = _prefixed(part, job.prefix, (SAMPLE_ID_KEY, COMMON_INDEX_KEY))
            job.writers.write(split, part)
            job.split_counts[split] += part.num_rows

    def _kept_rows(self, pb: ParsedBlock) -> tuple[np.ndarray, np.ndarray]:
        """Which of the block's valid rows have a known context key, and which of those are
        also not a duplicate of an earlier row (those are kept)."""
        n_rows = pb.head.num_rows
        known = np.ones(n_rows, dtype=bool)
        if self._known_keys is not None:  # one look-up per run of rows with the same context
            keys = pc.take(pb.head[COMMON_INDEX_KEY].combine_chunks(), arrow(pb.context_runs))
            known_runs = self._known_keys.contains(keys, pb.context_hashes)
            if not known_runs.all():
                known = np.repeat(known_runs, np.diff(pb.context_runs, append=n_rows))
        dup = np.zeros(n_rows, dtype=bool)
        dup[known] = self._seen.check_and_add(pb.key_hashes[known])
        return known, known & ~dup

    def _quarantine_block(self, pb: ParsedBlock, known: np.ndarray, rejected: np.ndarray) -> int:
        """Write the lines rejected by the worker and the `rejected` rows to quarantine.csv,
        in line order, and count them by reason; returns how many."""
        job, rep = self.job, self.report
        skeleton = job.kind == "skeleton"
        entries = list(zip(pb.bad_lines.tolist(), pb.bad_ids, pb.bad_reasons, strict=True))
        if len(rejected):
            row_lines = np.delete(np.arange(pb.n_lines), pb.bad_lines)  # line of each row
            key_col = pb.head[SAMPLE_ID_KEY if skeleton else COMMON_INDEX_KEY]
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
        return len(entries)

    def finish(self) -> KnownKeys:
        """The unique keys the file held (context keys of a common file, without prefix)."""
        keys = pa.concat_arrays(self._written_keys) if self._written_keys else strings([])
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
