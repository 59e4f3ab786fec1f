"""Reading raw files: where they are (plain, gzip or inside the published archives) and
their bytes in blocks of whole lines, plus the ordered thread map the blocks are parsed with."""

from __future__ import annotations

import gzip
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aliccp.format import RAW_FILES
from tasks.ingest.report import IngestError


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
    for block in line_blocks(source, chunk_bytes):
        yield block, line_no
        line_no += block.count(b"\n") + 1


def line_blocks(source: RawSource, chunk_bytes: int) -> Iterator[bytearray]:
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
