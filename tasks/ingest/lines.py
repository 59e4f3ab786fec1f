"""The vectorised block parser: a piece of a block of raw lines -> its valid rows as tables,
and a reason for every other line.

A block is parsed as bytes, with numpy, without splitting it into Python strings. One pass
finds every byte below '-' (0x2d): the newlines, commas and 0x01-0x03 separators, the
"tokens" of the format (other bytes down there, such as '\\r' or '+', are content). A valid
line's tokens read `,`*(n_cols-1) then nothing or `2 3 (1 2 3)*`, then its newline; that is
checked on pairs of neighbouring tokens, so no per-token line number is ever computed. The
spans between tokens then become Arrow string arrays over the block's memory, which Arrow's
C kernels turn into ids and weights.

`parse_lines` runs the steps in order: tokenising, the line checks (UTF-8, column count,
token structure), the entries (their spans, ids and weights, and their checks), the row
checks on the plain columns (feature_num, labels), the keys, the field lookup and the list
columns. Each check sets the reason of the lines it rejects; later steps skip those lines.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aliccp.format import (
    R_COLUMNS,
    R_CONV_NO_CLICK,
    R_EMPTY,
    R_ENTRY,
    R_FEATURE_NUM,
    R_LABEL,
    R_UTF8,
)
from models.features import (
    CLICK_LABEL_KEY,
    COMMON_FIELDS,
    COMMON_INDEX_KEY,
    CONVERSION_LABEL_KEY,
    SAMPLE_ID_KEY,
    SKELETON_FIELDS,
)
from tasks.ingest.arrays import arrow, bools
from tasks.ingest.keys import hash_keys, in_valid_split, key_runs
from tasks.ingest.spans import (
    cast_spans,
    field_indices,
    interleaved,
    offsets_type,
    spans,
    unknown_fields,
)
from tasks.ingest.writers import common_schema, impression_schema

# Reasons the block parser gives, by code (0: no defect found).
_REASONS: tuple[str | None, ...] = (
    None, R_EMPTY, R_UTF8, R_COLUMNS, R_ENTRY, R_FEATURE_NUM, R_LABEL, R_CONV_NO_CLICK,
)  # fmt: skip
_REASON_CODE = {reason: code for code, reason in enumerate(_REASONS)}

_MAX_ID_CHARS = 64  # longest sample id / key text copied into quarantine.csv

_SKELETON_NAMES = (
    SAMPLE_ID_KEY,
    CLICK_LABEL_KEY,
    CONVERSION_LABEL_KEY,
    COMMON_INDEX_KEY,
    "feature_num",
    "feature_list",
)
_COMMON_NAMES = (COMMON_INDEX_KEY, "feature_num", "feature_list")

_NL, _CR, _COMMA = 10, 13, 44
# What Arrow's float cast reads, less "nan"/"inf" (no weights) and a leading '+' (not read).
_FLOAT_RE = r"^-?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
_LOW = 0x2D  # every token byte is below '-'; digits, '.', '-', 'e' and letters are not
# Token codes: 0 = content byte, then the three feature-list separators, newline, comma.
_TOKEN_CODE = np.zeros(256, dtype=np.uint8)
_TOKEN_CODE[[1, 2, 3, _NL, _COMMA]] = [1, 2, 3, 4, 5]
_T_ENTRY, _T_NL, _T_COMMA = 2, 4, 5  # 0x02 opens an entry's id; a newline ends a line
# Allowed (previous token, token) pairs: a line is `,`* then `2 3 (1 2 3)*` or nothing, then
# its newline. With the comma count checked separately, these pairs are the whole grammar.
_ALLOWED = np.zeros((6, 6), dtype=bool)
for _prev, _next in ((4, 5), (4, 4), (5, 5), (5, 2), (5, 4), (2, 3), (3, 1), (3, 4), (1, 2)):
    _ALLOWED[_prev, _next] = True
_DISALLOWED = ~_ALLOWED.ravel()


@dataclass
class Piece:
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


@dataclass
class _Lines:
    """A piece's tokens and lines, which every step reads; the checks update `reasons`."""

    block: memoryview
    data: np.ndarray  # the piece's bytes (uint8)
    buffer: pa.Buffer  # the same bytes, under the Arrow string arrays
    pos: np.ndarray  # byte position of each token (a line's newline: where its content ends)
    code: np.ndarray  # token code of each token (_TOKEN_CODE)
    nl_tok: np.ndarray  # token index of each line's newline
    starts: np.ndarray  # first byte of each line
    ends: np.ndarray  # end of each line's content (before its '\n' or '\r\n')
    crlf: np.ndarray  # the line ended in CRLF
    reasons: np.ndarray  # index in _REASONS of each line's defect, 0 = valid so far

    @property
    def n_lines(self) -> int:
        return len(self.nl_tok)


@dataclass
class _Commas:
    """Where each line's commas are (from the column check)."""

    pos: np.ndarray  # byte position of every comma of the piece
    first_tok: np.ndarray  # index in `pos` of each line's first comma
    first_column_end: np.ndarray  # end of each line's id text for quarantine.csv


@dataclass
class _Entries:
    """The entries (one per 0x02 token) of the piece, parsed where their line was still valid
    after the line checks (the spans of the others are empty)."""

    tok: np.ndarray  # token index of each entry's 0x02
    per_line: np.ndarray  # entries in each line
    field_start: np.ndarray  # first byte of each entry's field id
    two: np.ndarray  # position of the 0x02 that ends it
    field_length: np.ndarray
    ids: np.ndarray  # int64 (0 where not parsed)
    wts: np.ndarray  # float32 (0 where not parsed)


@dataclass
class _Keys:
    """The keys of the kept rows: their hashes and the split by context."""

    context_runs: np.ndarray  # first row of each run of rows with the same context key
    context_hashes: np.ndarray  # hash of each run's context key
    key_hashes: np.ndarray  # hash of each row's unique key (sample id / context key)
    in_valid: np.ndarray  # each row's context is in the validation split
    part_sizes: list[int]  # rows per output part: [all] or [train, valid]


def parse_lines(block: memoryview, kind: str, valid_fraction: float | None) -> Piece:
    """Vectorised parse of a block of lines; lines with a defect get a reason instead of values.

    With `valid_fraction` the valid rows are split by context into the parts (train, valid)
    as the entries are grouped per field, so no table is filtered afterwards."""
    skeleton = kind == "skeleton"
    names, fields, schema = (
        (_SKELETON_NAMES, SKELETON_FIELDS, impression_schema())
        if skeleton
        else (_COMMON_NAMES, COMMON_FIELDS, common_schema())
    )
    lines = _tokenise(block)
    _check_utf8(lines)
    commas = _check_columns(lines, len(names))
    _check_structure(lines)
    entries = _parse_entries(lines)
    head, kept_lines, columns = _check_rows(lines, commas, entries.per_line, names, skeleton)
    keys = _keys(columns, len(kept_lines), skeleton, valid_fraction)
    parts, train_ids, unknown = _list_columns(
        lines, entries, head, kept_lines, keys, fields, schema
    )
    bad, bad_reasons, bad_ids = _quarantined(lines, commas)
    return Piece(
        head=head,
        parts=parts,
        train_ids=train_ids,
        n_lines=lines.n_lines,
        crlf=int(lines.crlf.sum()),
        key_hashes=keys.key_hashes,
        in_valid=keys.in_valid,
        context_runs=keys.context_runs,
        context_hashes=keys.context_hashes,
        bad_lines=bad,
        bad_reasons=bad_reasons,
        bad_ids=bad_ids,
        unknown_fields=unknown,
    )


# --- tokens and line checks ------------------------------------------------------------------


def _tokenise(block: memoryview) -> _Lines:
    """The piece's tokens and lines (a line with no content: R_EMPTY)."""
    data = np.frombuffer(block, dtype=np.uint8)
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
    pos = pos.astype(offsets_type(len(data) + 3)[0])

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
    reasons = np.zeros(n_lines, dtype=np.uint8)
    reasons[starts == ends] = _REASON_CODE[R_EMPTY]
    return _Lines(block, data, pa.py_buffer(block), pos, code, nl_tok, starts, ends, crlf, reasons)


def _check_utf8(lines: _Lines) -> None:
    """R_UTF8 for lines that do not decode. Invalid UTF-8 needs a byte >= 0x80: only lines
    holding one are decoded (the one loop over lines here, over those few)."""
    data = lines.data
    if len(data) and data.max() >= 0x80:
        high = np.flatnonzero(data >= 0x80)
        for line in np.unique(np.searchsorted(lines.ends, high)):
            try:
                bytes(lines.block[lines.starts[line] : lines.ends[line]]).decode("utf-8")
            except UnicodeDecodeError:
                lines.reasons[line] = _REASON_CODE[R_UTF8]


def _check_columns(lines: _Lines, n_cols: int) -> _Commas:
    """R_COLUMNS for lines without exactly n_cols - 1 commas (a feature list holds none)."""
    comma_tok = np.flatnonzero(lines.code == _T_COMMA)
    commas_before = np.searchsorted(comma_tok, lines.nl_tok)  # commas before each line's end
    first_comma_tok = np.concatenate([[0], commas_before[:-1]])
    n_commas = commas_before - first_comma_tok
    reasons = lines.reasons
    reasons[(n_commas != n_cols - 1) & (reasons == 0)] = _REASON_CODE[R_COLUMNS]
    comma_pos = lines.pos[comma_tok]
    has_comma = n_commas > 0
    first_comma = np.full(lines.n_lines, np.iinfo(np.int64).max)
    first_comma[has_comma] = comma_pos[first_comma_tok[has_comma]]
    # Text up to the first comma (at most _MAX_ID_CHARS: a line without commas is no id),
    # kept only for the lines that get a reason (quarantine.csv).
    first_column_end = np.minimum(np.minimum(first_comma, lines.ends), lines.starts + _MAX_ID_CHARS)
    return _Commas(comma_pos, first_comma_tok, first_column_end)


def _check_structure(lines: _Lines) -> None:
    """R_ENTRY for lines with a pair of neighbouring tokens the grammar does not allow; a
    pair belongs to the line of its second token (a newline belongs to the line it ends)."""
    code, nl_tok = lines.code, lines.nl_tok
    pairs = np.empty(len(code), dtype=np.uint8)
    pairs[0] = _T_NL * 6 + code[0]
    np.multiply(code[:-1], 6, out=pairs[1:])
    pairs[1:] += code[1:]
    bad_tok = np.flatnonzero(np.take(_DISALLOWED, pairs[: nl_tok[-1] + 1]))
    struct_bad = np.zeros(lines.n_lines, dtype=bool)
    struct_bad[np.searchsorted(nl_tok, bad_tok)] = True
    lines.reasons[struct_bad & (lines.reasons == 0)] = _REASON_CODE[R_ENTRY]


# --- entries ----------------------------------------------------------------------------------


def _parse_entries(lines: _Lines) -> _Entries:
    """Field, id and value spans of the entries of the lines still valid, their ids and
    weights parsed; R_ENTRY for lines with an entry that does not parse."""
    pos, nl_tok = lines.pos, lines.nl_tok
    entry_tok = np.flatnonzero(lines.code[: nl_tok[-1]] == _T_ENTRY)
    per_line = np.diff(np.searchsorted(entry_tok, nl_tok), prepend=0)
    line_ok = lines.reasons == 0
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
    ids, id_ok = _parse_ids(lines, id_start, three, entry_ok)
    wts, value_ok = _parse_weights(lines, value_start, value_end, entry_ok)
    entries = _Entries(entry_tok, per_line, field_start, two, two - field_start, ids, wts)
    # "nan" and "inf" parse as floats but are no weights; an empty field id is no field.
    if not (
        all_ok
        and id_ok is None
        and value_ok is None
        and ids.min(initial=0) >= 0
        and np.isfinite(wts).all()
        and entries.field_length.min(initial=1) > 0
    ):
        id_ok = ids >= 0 if id_ok is None else id_ok
        value_ok = np.isfinite(wts) if value_ok is None else value_ok & np.isfinite(wts)
        entry_bad = entry_ok & ~(id_ok & value_ok & (entries.field_length > 0))
        if entry_bad.any():
            lines.reasons[np.searchsorted(nl_tok, entry_tok[entry_bad])] = _REASON_CODE[R_ENTRY]
    return entries


def _parse_ids(
    lines: _Lines, id_start: np.ndarray, id_end: np.ndarray, entry_ok
) -> tuple[np.ndarray, np.ndarray | None]:
    """The entries' ids where `entry_ok` (True: every entry), and which are decimal digits
    (None: all of them)."""
    buffer, data = lines.buffer, lines.data
    try:  # fast path: every id is an integer
        ids = cast_spans(buffer, id_start, id_end, entry_ok, pa.int64())
        # Arrow also reads "-0", hexadecimal ("0x1F") and 19 digits: an id is at most 18
        # decimal digits.
        lead = np.take(data, id_start, mode="clip") if len(data) else np.zeros(0, np.uint8)
        length = id_end - id_start
        odd = (lead == ord("-")) | ((lead == ord("0")) & (length > 2)) | (length > 18)
        if (odd & entry_ok).any():
            raise pa.ArrowInvalid("an id that is not decimal digits")
        return ids, None
    except pa.ArrowInvalid:  # some id is not (rare, slower): digits only
        entry_ok = np.broadcast_to(entry_ok, len(id_start))
        tokens = interleaved(buffer, id_start, id_end, entry_ok)
        digits = bools(pc.ascii_is_decimal(tokens))[0::2]
        id_ok = digits & (id_end - id_start <= 18)  # at most 18 digits always fit int64
        return cast_spans(buffer, id_start, id_end, entry_ok & id_ok, pa.int64()), id_ok


def _parse_weights(
    lines: _Lines, value_start: np.ndarray, value_end: np.ndarray, entry_ok
) -> tuple[np.ndarray, np.ndarray | None]:
    """The entries' weights where `entry_ok` (True: every entry), and which are numbers
    (None: all of them)."""
    buffer = lines.buffer
    try:
        return cast_spans(buffer, value_start, value_end, entry_ok, pa.float32()), None
    except pa.ArrowInvalid:  # some value is not a number: find which (rare, slower)
        entry_ok = np.broadcast_to(entry_ok, len(value_start))
        tokens = interleaved(buffer, value_start, value_end, entry_ok)
        value_ok = bools(pc.match_substring_regex(tokens, _FLOAT_RE))[0::2]
        wts = cast_spans(buffer, value_start, value_end, entry_ok & value_ok, pa.float32())
        return wts, value_ok


# --- rows: the plain columns ------------------------------------------------------------------


class _Columns:
    """Start and end of each column of the lines valid so far."""

    def __init__(self, lines: _Lines, commas: _Commas, ok_lines: np.ndarray, names: tuple):
        n_cols = len(names)
        if len(ok_lines) == lines.n_lines:  # each line has its n_cols - 1 commas, in order
            self._commas = commas.pos.reshape(lines.n_lines, n_cols - 1)
            self._starts, self._ends = lines.starts, lines.ends
        else:  # (n_ok, n_cols - 1) comma positions
            self._commas = commas.pos[commas.first_tok[ok_lines, None] + np.arange(n_cols - 1)]
            self._starts, self._ends = lines.starts[ok_lines], lines.ends[ok_lines]
        self._index = {name: i for i, name in enumerate(names)}

    def span(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Start and end of each valid line's column `name`."""
        i = self._index[name]
        start = self._starts if i == 0 else self._commas[:, i - 1] + 1
        return start, (self._commas[:, i] if i < len(self._index) - 1 else self._ends)


def _check_rows(
    lines: _Lines, commas: _Commas, per_line: np.ndarray, names: tuple, skeleton: bool
) -> tuple[pa.Table, np.ndarray, dict[str, pa.Array]]:
    """R_FEATURE_NUM, R_LABEL and R_CONV_NO_CLICK for the lines still valid; the plain
    columns (no id/weight lists) of the lines kept, as a table and by name, and which lines
    those are."""
    ok_lines = np.flatnonzero(lines.reasons == 0)
    cols = _Columns(lines, commas, ok_lines, names)
    row_reason = np.zeros(len(ok_lines), dtype=np.uint8)
    declared = _feature_num(lines, *cols.span("feature_num"))
    row_reason[declared != per_line[ok_lines]] = _REASON_CODE[R_FEATURE_NUM]
    labels: dict[str, np.ndarray] = {}
    if skeleton:
        data = lines.data
        for key in (CLICK_LABEL_KEY, CONVERSION_LABEL_KEY):
            start, end = cols.span(key)
            byte = data[np.minimum(start, len(data) - 1)]
            labels[key] = np.where((end - start == 1) & ((byte | 1) == ord("1")), byte - 48, -1)
        click, conv = labels[CLICK_LABEL_KEY], labels[CONVERSION_LABEL_KEY]
        row_reason[((click < 0) | (conv < 0)) & (row_reason == 0)] = _REASON_CODE[R_LABEL]
        no_click = (click == 0) & (conv == 1) & (row_reason == 0)
        row_reason[no_click] = _REASON_CODE[R_CONV_NO_CLICK]
    lines.reasons[ok_lines] = row_reason
    keep = row_reason == 0
    all_valid = bool(keep.all())
    kept_lines = ok_lines if all_valid else ok_lines[keep]

    columns: dict[str, pa.Array] = {}
    for name in names:
        if name in (CLICK_LABEL_KEY, CONVERSION_LABEL_KEY):
            columns[name] = arrow(
                (labels[name] if all_valid else labels[name][keep]).astype(np.int8)
            )
        elif name not in ("feature_num", "feature_list"):
            start, end = cols.span(name)
            columns[name] = spans(
                lines.buffer, *((start, end) if all_valid else (start[keep], end[keep]))
            )
    return pa.table(columns), kept_lines, columns


def _feature_num(lines: _Lines, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Each feature_num span as an integer (-1 where it is not at most 18 decimal digits)."""
    buffer, data = lines.buffer, lines.data
    try:  # fast path: every feature_num is an integer of at most 18 digits
        declared = cast_spans(buffer, start, end, True, pa.int64())
        lead = np.take(data, start, mode="clip") if len(data) else np.zeros(0, np.uint8)
        length = end - start
        if ((lead == ord("-")) | ((lead == ord("0")) & (length > 2)) | (length > 18)).any():
            raise pa.ArrowInvalid("a feature_num that is not decimal digits")
        return declared
    except pa.ArrowInvalid:  # digits only (Arrow also reads "-0" and "0x1F")
        num_ok = bools(pc.ascii_is_decimal(spans(buffer, start, end)))
        num_ok &= end - start <= 18
        return np.where(num_ok, cast_spans(buffer, start, end, num_ok, pa.int64()), -1)


# --- keys, list columns, quarantined lines ----------------------------------------------------


def _keys(
    columns: dict[str, pa.Array], n_keep: int, skeleton: bool, valid_fraction: float | None
) -> _Keys:
    """The unique key's hash (duplicates), runs of equal context keys and their hashes (the
    join, and the train/valid split by context)."""
    runs, context_hashes = key_runs(columns[COMMON_INDEX_KEY])
    run_lengths = np.diff(runs, append=n_keep)
    if skeleton:
        key_hashes = hash_keys(columns[SAMPLE_ID_KEY])
    else:  # the unique key is the context key
        key_hashes = np.repeat(context_hashes, run_lengths)
    if valid_fraction is None:
        in_valid = np.zeros(n_keep, dtype=bool)
        part_sizes = [n_keep]
    else:
        in_valid = np.repeat(in_valid_split(context_hashes, valid_fraction), run_lengths)
        n_valid = int(np.count_nonzero(in_valid))
        part_sizes = [n_keep - n_valid, n_valid]
    return _Keys(runs, context_hashes, key_hashes, in_valid, part_sizes)


def _list_columns(
    lines: _Lines,
    entries: _Entries,
    head: pa.Table,
    kept_lines: np.ndarray,
    keys: _Keys,
    fields: tuple[str, ...],
    schema: pa.Schema,
) -> tuple[tuple[pa.Table, ...], dict[str, list[np.ndarray]], Counter]:
    """The output parts (rows in the output schema), the ids of each field in the train part
    and the entries of unknown fields: the entries of kept lines are grouped per field and
    part (stable, so in line order) into list columns: group = field * parts + part."""
    n_keep = len(kept_lines)
    all_kept = n_keep == lines.n_lines
    field_start, two, field_length = entries.field_start, entries.two, entries.field_length
    if not all_kept:
        entry_keep = np.flatnonzero(np.repeat(lines.reasons == 0, entries.per_line))
        field_start, two = field_start[entry_keep], two[entry_keep]
        field_length = field_length[entry_keep]
    kept_per_line = entries.per_line if all_kept else entries.per_line[kept_lines]
    field_index = field_indices(lines.data, field_start, field_length, fields)
    unknown = unknown_fields(lines.block, field_start, two, field_index, fields)
    # Rows in part order (train rows, then valid rows), each part in line order.
    in_valid = keys.in_valid
    if len(keys.part_sizes) == 1:
        group, rank, part_head = field_index, np.arange(n_keep), head
    else:
        group = field_index * np.uint8(2)
        group += np.repeat(in_valid, kept_per_line).view(np.uint8)
        row_order = np.argsort(in_valid, kind="stable")
        rank = np.empty(n_keep, dtype=np.int64)
        rank[row_order] = np.arange(n_keep)
        part_head = pc.take(head, arrow(row_order))
    order = np.argsort(group, kind="stable")
    if not all_kept:
        order = entry_keep[order]
    counts = np.bincount(
        field_index.astype(np.int64) * n_keep + np.repeat(rank, kept_per_line),
        minlength=(len(fields) + 1) * n_keep,
    ).reshape(len(fields) + 1, n_keep)  # entries per field and row (in part order)
    ids = entries.ids[order]
    parts, train_ids = _part_tables(
        part_head, keys.part_sizes, ids, entries.wts[order], counts, fields, schema
    )
    return parts, train_ids, unknown


def _part_tables(
    part_head: pa.Table,
    part_sizes: list[int],
    ids: np.ndarray,
    wts: np.ndarray,
    counts: np.ndarray,
    fields: tuple[str, ...],
    schema: pa.Schema,
) -> tuple[tuple[pa.Table, ...], dict[str, list[np.ndarray]]]:
    """Each part's table from the plain columns of its rows (in part order) and the entries
    sorted by group, with `counts` entries per field and row; the train part's ids by field."""
    ids_array, wts_array = arrow(ids), arrow(wts)
    field_first = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])  # in the sorted entries
    parts = []
    train_ids: dict[str, list[np.ndarray]] = {}
    row, before = 0, np.zeros(len(fields) + 1, dtype=np.int64)  # in the parts before
    for p, n_rows in enumerate(part_sizes):
        offsets = np.zeros((len(fields) + 1, n_rows + 1), dtype=np.int32)
        np.cumsum(counts[:, row : row + n_rows], axis=1, out=offsets[:, 1:])
        all_offsets = arrow(offsets.ravel())
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
    return tuple(parts), train_ids


def _quarantined(lines: _Lines, commas: _Commas) -> tuple[np.ndarray, list[str], list[str | None]]:
    """Positions, reasons and id texts of the lines that got a reason."""
    reasons = lines.reasons
    bad = np.flatnonzero(reasons)
    # Decoded leniently: the cap may cut a multi-byte character.
    bad_ids = [
        None
        if reasons[line] == _REASON_CODE[R_UTF8]
        else bytes(lines.block[lines.starts[line] : commas.first_column_end[line]]).decode(
            "utf-8", "replace"
        )
        for line in bad.tolist()
    ]
    return bad, [_REASONS[code] for code in reasons[bad].tolist()], bad_ids
