"""Progress lines for long steps: `<step>: done/total unit (pct), rate/s, ETA`, printed at most
every few seconds (plain lines, so they read the same in a terminal, a DVC log and Prefect's
logs, which the retraining flow forwards them to).

`FileProgress` follows work done in other processes (Beam's workers): each appends its count
to a small file, and a thread here sums it.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

INTERVAL = 10.0  # seconds between lines


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """Prints the progress of `total` units of work, at most every `interval` seconds."""

    def __init__(self, step: str, total: int, unit: str, interval: float = INTERVAL):
        self.step, self.total, self.unit, self.interval = step, max(int(total), 0), unit, interval
        self.started = time.monotonic()
        self._last = self.started

    def line(self, done: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = done / elapsed
        text = f"{self.step}: {done:,}/{self.total:,} {self.unit}"
        if self.total:
            text += f" ({done / self.total:.0%})"
        if not done:  # nothing to estimate from yet (e.g. workers starting)
            return text + f", started {_duration(elapsed)} ago"
        text += f", {rate:,.0f} {self.unit}/s"
        if rate > 0 and done < self.total:
            text += f", ETA {_duration((self.total - done) / rate)}"
        elif done >= self.total:
            text += f", done in {_duration(elapsed)}"
        return text

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            print(self.line(done), flush=True)


class FileProgress(Progress):
    """Progress of work counted by other processes: each appends `<count>\\n` to `path`
    (`record`); a thread here reads the sum and prints a line every `interval` seconds."""

    def __init__(self, step: str, total: int, unit: str, path: Path, interval: float = INTERVAL):
        super().__init__(step, total, unit, interval)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._stop = threading.Event()
        self._shown = -1  # the count of the last line printed
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def done(self) -> int:
        try:
            return sum(int(n) for n in self.path.read_text().split())
        except (OSError, ValueError):
            return 0

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._shown = self.done()
            print(self.line(self._shown), flush=True)

    def __enter__(self) -> FileProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if exc[0] is None and self.done() != self._shown:
            print(self.line(self.done()), flush=True)
        self.path.unlink(missing_ok=True)


def record(path: str, count: int) -> None:
    """Add `count` to a `FileProgress` file (one short append: atomic with O_APPEND)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    except OSError:
        return  # another machine's worker (a remote runner): no progress, no failure
    try:
        os.write(fd, f"{count}\n".encode())
    finally:
        os.close(fd)
