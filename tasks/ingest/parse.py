"""Parsing one block of raw lines: `parse_block` cuts it into pieces, parses each with the
vectorised parser (`tasks.ingest.lines`) and joins them into a `ParsedBlock`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.ingest.arrays import arrow, ints
from tasks.ingest.lines import Piece, parse_lines

_PIECE_BYTES = 4 << 20


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
        return pc.take(pa.concat_tables(self.parts), arrow(line_order))


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
    pieces = [parse_lines(view[lo:hi], kind, valid_fraction) for lo, hi in _piece_bounds(block)]
    piece = pieces[0] if len(pieces) == 1 else _joined(pieces)
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


def _joined(pieces: list[Piece]) -> Piece:
    """Consecutive pieces as one (tables as chunks, not copied; positions shifted)."""
    line_offsets = np.cumsum([0] + [p.n_lines for p in pieces[:-1]])
    row_offsets = np.cumsum([0] + [p.head.num_rows for p in pieces[:-1]])
    return Piece(
        head=pa.concat_tables([p.head for p in pieces]),
        parts=tuple(
            pa.concat_tables([p.parts[i] for p in pieces]) for i in range(len(pieces[0].parts))
        ),
        train_ids={f: [ids for p in pieces for ids in p.train_ids[f]] for f in pieces[0].train_ids},
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


def _value_counts(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct int64 values of the chunks and how often each occurs."""
    found = pc.value_counts(pa.chunked_array([arrow(c) for c in chunks], pa.int64()))
    return ints(found.field("values")), ints(found.field("counts"))
