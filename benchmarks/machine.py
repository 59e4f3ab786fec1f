"""Machine facts recorded next to every benchmark result."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write_record(out_dir: Path, name: str, record: dict, tag: str = "") -> Path:
    """Write `record` (with `machine_info()` under "machine") as
    `out_dir/<name>-<date>[-<tag>].json`. A record never overwrites another: a second one
    of the same day gets the time of day appended."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = record["machine"]["date"]
    path = out_dir / f"{name}-{stamp[:10]}{f'-{tag}' if tag else ''}.json"
    if path.exists():
        path = path.with_name(f"{path.stem}-{stamp[11:16].replace(':', '')}.json")
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
