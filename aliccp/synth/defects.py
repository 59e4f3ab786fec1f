"""Defect injection: the defect kinds and the quarantine reason ingestion must give each,
which kinds each raw file can carry, the choice and writing of defective lines per chunk
(`Defects`), and the `defects.csv` manifest that lists them.

With `defect_rate > 0` that share of skeleton lines, drawn independently from the seed, is
written with one defect each, of a kind drawn uniformly from the requested ones that can
occur in skeleton lines. A defective skeleton line replaces its impression (the impression
is lost; the sample ids of all other lines are unchanged). The same share of common lines
is selected for the kinds that can occur there; to keep every impression joinable, a
common-file defect is an added line right after the selected one: a copy of it under a new
key (never used by any impression) that carries the defect, or for `duplicate_key` an exact
copy under the same key (ingestion keeps the first). `crlf` is not a defect: the selected
line is written with a `\\r\\n` ending and stays valid. Defects draw from their own streams,
so every valid line is byte-identical to the output without defects.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    common_file,
    skeleton_file,
)
from aliccp.synth.streams import DEFECT_STREAM, stream_rng
from aliccp.synth.text import ENTRY_SEP, ID_SEP, VALUE_SEP

DEFECTS_FILE = "defects.csv"
DEFECTS_HEADER = ("file", "line", "sample_id", "kind")

# Defect kind -> the reason `tasks.ingest` quarantines such a line with.
DEFECT_REASONS: Mapping[str, str] = {
    "truncated": R_COLUMNS,  # cut before its feature list: too few columns
    "separator": R_COLUMNS,  # ';' or a tab instead of every ','
    "label_text": R_LABEL,  # click or conversion not a number ('', 'x', 'true', ...)
    "label_range": R_LABEL,  # click or conversion a number other than 0 and 1
    "conversion_without_click": R_CONV_NO_CLICK,  # click 0, conversion 1
    "unknown_key": R_UNKNOWN_KEY,  # a common_feature_index not in the common file
    "feature_num": R_FEATURE_NUM,  # feature_num differs from the number of entries
    "empty": R_EMPTY,  # an empty line
    "utf8": R_UTF8,  # bytes that are not UTF-8 inside the line
    "duplicate_sample_id": R_DUP_SAMPLE,  # repeats the id of an earlier valid line
    "malformed_entry": R_ENTRY,  # one entry without its 0x02 or 0x03 or with a bad value
    "duplicate_key": R_DUP_KEY,  # common file: a key defined a second time
}
DEFECT_KINDS: tuple[str, ...] = tuple(DEFECT_REASONS)
CRLF = "crlf"  # not a defect: a valid line ending in \r\n (ingestion counts it)
LINE_KINDS: tuple[str, ...] = (*DEFECT_KINDS, CRLF)  # everything `defects` may name
# Kinds each file can carry (label, key and sample-id kinds are skeleton-only).
SKELETON_KINDS: frozenset[str] = frozenset(LINE_KINDS) - {"duplicate_key"}
COMMON_KINDS: frozenset[str] = frozenset(
    {"truncated", "separator", "feature_num", "empty", "utf8", "malformed_entry"}
    | {"duplicate_key", CRLF}
)


_BAD_LABELS = ("", "x", "true", "NaN", "-")
_OUT_OF_RANGE_LABELS = ("2", "-1", "10")
_BAD_BYTES = (b"\xff", b"\xc3\x28", b"\x80", b"\xfe\xfe")
_SEPARATORS = (";", "\t")
_FEATURE_NUM_ERRORS = (-1, 1, 7)


class Defects:
    """Chooses, applies and records the defects of one split's files, a chunk at a time.

    Per chunk, `skeleton` must be called before `common`: both draw from the chunk's own
    stream, so the choice depends only on the seed, split, chunk, rate and kinds.
    """

    def __init__(
        self, rate: float, kinds: tuple[str, ...], seed: int, split: str, split_index: int
    ):
        self._rate, self._seed, self._split, self._split_index = rate, seed, split, split_index
        self._skeleton_kinds = tuple(k for k in kinds if k in SKELETON_KINDS)
        self._common_kinds = tuple(k for k in kinds if k in COMMON_KINDS)
        self._files = (skeleton_file(split), common_file(split))
        self._rows: tuple[list[tuple[str, int, str, str]], ...] = ([], [])
        self._lines = [0, 0]  # lines written so far to the skeleton and the common file
        self._chunk = -1
        self._rng = np.random.default_rng(0)  # replaced at every chunk
        self._last_valid_id: str | None = None  # of the skeleton file, across chunks
        self._new_keys = 0
        self.defective_lines = 0

    def manifest(self) -> list[tuple[str, int, str, str]]:
        """(file, line, sample id or key, kind) of every line written with a defect or CRLF."""
        return [*self._rows[0], *self._rows[1]]

    def skeleton(self, lines: pa.Array) -> tuple[dict[int, bytes], np.ndarray]:
        """Edits of a chunk's skeleton lines (index -> bytes) and which stay valid."""
        self._chunk += 1
        self._rng = stream_rng(self._seed, DEFECT_STREAM, self._split_index, self._chunk)
        n, first_line = len(lines), self._lines[0] + 1
        self._lines[0] += n
        valid = np.ones(n, dtype=bool)
        edits: dict[int, bytes] = {}
        if not self._skeleton_kinds:
            return edits, valid
        chosen, kinds, variant = self._choose(n, self._skeleton_kinds)
        valid[chosen[kinds != CRLF]] = False
        earlier_valid = np.maximum.accumulate(np.where(valid, np.arange(n), -1))
        texts = pc.take(lines, pa.array(chosen, type=pa.int64())).to_pylist()
        for i, kind, text, (u, v) in zip(chosen.tolist(), kinds, texts, variant, strict=True):
            line_no = first_line + i
            sample_id, rest = text.split(",", 1)
            if kind == "duplicate_sample_id":
                j = int(earlier_valid[i - 1]) if i > 0 else -1
                source = _first_column(lines[j].as_py()) if j >= 0 else self._last_valid_id
                if source is None:  # no earlier valid line in the file: left as it is
                    valid[i] = True
                    continue
                sample_id, data = source, f"{source},{rest}\n".encode()
            else:
                data = self._corrupt(kind, text, 6, u, v, line_no)
                sample_id = "" if kind == "empty" else sample_id
            edits[i] = data
            self._rows[0].append((self._files[0], line_no, sample_id, kind))
            self.defective_lines += kind != CRLF
        if valid.any():
            self._last_valid_id = _first_column(lines[int(np.flatnonzero(valid)[-1])].as_py())
        return edits, valid

    def common(self, lines: pa.Array) -> dict[int, bytes]:
        """Edits of a chunk's common lines (index -> bytes): CRLF rewrites and added lines."""
        n = len(lines)
        edits: dict[int, bytes] = {}
        added = 0
        if self._common_kinds:
            chosen, kinds, variant = self._choose(n, self._common_kinds)
            texts = pc.take(lines, pa.array(chosen, type=pa.int64())).to_pylist()
            for i, kind, text, (u, v) in zip(chosen.tolist(), kinds, texts, variant, strict=True):
                line_no = self._lines[1] + i + 1 + added
                key = _first_column(text)
                if kind == CRLF:
                    edits[i] = f"{text}\r\n".encode()
                    self._rows[1].append((self._files[1], line_no, key, kind))
                    continue
                if kind == "duplicate_key":
                    extra = f"{text}\n".encode()
                else:  # a copy under a key no impression uses, so no impression is lost
                    key = _digest(
                        f"ali-ccp-synth-defect:{self._seed}:{self._split}:{self._new_keys}"
                    )
                    self._new_keys += 1
                    copy = key + text[len(_first_column(text)) :]
                    extra = self._corrupt(kind, copy, 3, u, v, line_no + 1)
                    key = "" if kind == "empty" else key
                edits[i] = f"{text}\n".encode() + extra
                added += 1
                self._rows[1].append((self._files[1], line_no + 1, key, kind))
                self.defective_lines += 1
        self._lines[1] += n + added
        return edits

    def _choose(self, n: int, kinds: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Lines to edit, the kind of each, and two uniforms per line for its variant."""
        rng = self._rng
        chosen = np.flatnonzero(rng.random(n) < self._rate)
        kind = np.asarray(kinds, dtype=object)[rng.integers(0, len(kinds), len(chosen))]
        return chosen, kind, rng.random((len(chosen), 2))

    def _corrupt(
        self, kind: str, text: str, n_cols: int, u: float, v: float, line_no: int
    ) -> bytes:
        """The line `text` (n_cols columns, valid) with one defect of `kind`, newline ended."""
        if kind == CRLF:
            return f"{text}\r\n".encode()
        if kind == "empty":
            return b"\n"
        if kind == "truncated":  # cut after the first column, before the feature list
            first = text.index(",")
            last = first
            for _ in range(n_cols - 2):
                last = text.index(",", last + 1)
            return f"{text[: first + 1 + int(u * (last - first))]}\n".encode()
        if kind == "separator":
            return f"{text.replace(',', _SEPARATORS[int(u * len(_SEPARATORS))])}\n".encode()
        if kind == "utf8":  # invalid bytes somewhere after the first column
            raw, first = text.encode(), text.index(",") + 1
            at = first + int(u * (len(raw) - first + 1))
            return raw[:at] + _BAD_BYTES[int(v * len(_BAD_BYTES))] + raw[at:] + b"\n"
        cols = text.split(",")
        if kind == "feature_num":
            declared = int(cols[-2])
            error = _FEATURE_NUM_ERRORS[int(u * len(_FEATURE_NUM_ERRORS))]
            cols[-2] = str(declared + error if declared + error >= 0 else declared + 1)
        elif kind == "malformed_entry":
            entries = cols[-1].split(ENTRY_SEP)
            k = int(u * len(entries))
            name, rest = entries[k].split(ID_SEP)
            feature_id, value = rest.split(VALUE_SEP)
            entries[k] = (
                f"{name}{ID_SEP}{feature_id}{value}",  # no value separator
                f"{name}:{feature_id}{VALUE_SEP}{value}",  # no id separator
                f"{name}{ID_SEP}{feature_id}{VALUE_SEP}n/a",  # value not a number
            )[int(v * 3)]
            cols[-1] = ENTRY_SEP.join(entries)
        elif kind == "label_text":
            cols[1 + int(u * 2)] = _BAD_LABELS[int(v * len(_BAD_LABELS))]
        elif kind == "label_range":
            cols[1 + int(u * 2)] = _OUT_OF_RANGE_LABELS[int(v * len(_OUT_OF_RANGE_LABELS))]
        elif kind == "conversion_without_click":
            cols[1], cols[2] = "0", "1"
        elif kind == "unknown_key":
            cols[3] = _digest(f"ali-ccp-synth-unknown:{self._seed}:{self._split}:{line_no}")
        else:
            raise ValueError(f"no such defect kind: {kind!r}")
        return f"{','.join(cols)}\n".encode()


def _first_column(line: str) -> str:
    return line.split(",", 1)[0]


def _digest(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def write_manifest(path: Path, rows: list[tuple[str, int, str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(DEFECTS_HEADER)
        writer.writerows(rows)
    return path


def resolve_defects(rate: object, defects: Sequence[str] | str | None) -> tuple[str, ...]:
    """The kinds to inject, in `LINE_KINDS` order; none when the rate is 0."""
    if (
        isinstance(rate, bool)
        or not isinstance(rate, int | float | np.integer | np.floating)
        or not 0.0 <= float(rate) <= 1.0
    ):
        raise ValueError(f"defect_rate must be a number in [0, 1], got {rate!r}")
    if defects is None:
        return DEFECT_KINDS if rate > 0 else ()
    names = defects.split(",") if isinstance(defects, str) else list(defects)
    names = [str(name).strip() for name in names if str(name).strip()]
    unknown = sorted(set(names) - set(LINE_KINDS))
    if unknown or not names:
        raise ValueError(
            f"defects must name kinds from {', '.join(LINE_KINDS)}; got {defects!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tuple(kind for kind in LINE_KINDS if kind in names) if rate > 0 else ()
