"""What ingestion reports: per-file and overall counts (`report.json`), and its error."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


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
