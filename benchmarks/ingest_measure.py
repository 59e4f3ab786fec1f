"""Measuring one child process of the ingestion benchmark (`benchmarks.ingest`).

Owns the child script that runs our `tasks.ingest.ingest_ali_ccp` (`OURS_CHILD`, with the
hash of the ingestion code it imported), the environment every measured child gets, and
`measure`: one command in a fresh child, its wall and CPU seconds, its peak RSS (through
/usr/bin/time, else wait4), the peak summed PSS of its process tree (sampled from /proc)
and its JSON stdout.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


# --- the child that runs ours ---------------------------------------------------------------

# Run as `python -c OURS_CHILD RAW_DIR OUT_DIR PARAMS` with the source tree under test as the
# working directory, so it measures whatever `tasks.ingest` that tree holds (the working copy,
# or a commit exported with --ref) and depends on nothing in benchmarks/.
INGEST_CODE = ("tasks/ingest.py", "tasks/ingest")  # the module of older commits, the package


def ingest_code_sha256(tasks_dir: Path) -> str:
    """sha256 of the ingestion code under `tasks_dir`: every .py file of the package
    tasks/ingest/ (name, NUL, bytes, in name order), or in older commits the bytes of the
    module tasks/ingest.py (so older records keep their meaning). Copied into OURS_CHILD, so
    it uses only `hashlib` and `Path`."""
    package = sorted((tasks_dir / "ingest").glob("*.py"))
    if not package:
        return hashlib.sha256((tasks_dir / "ingest.py").read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for path in package:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


OURS_CHILD = (
    """
import hashlib, json, sys, time
from pathlib import Path
start = time.perf_counter()
import tasks.ingest as ingest_module
from tasks.config import load_params
"""
    + inspect.getsource(ingest_code_sha256)
    + """
imported_from = Path(ingest_module.__file__)  # tasks/ingest/__init__.py or tasks/ingest.py
module_sha256 = ingest_code_sha256(
    imported_from.parents[1] if imported_from.name == "__init__.py" else imported_from.parent
)
cfg = load_params(sys.argv[3]).ingest
imported = time.perf_counter()
report = ingest_module.ingest_ali_ccp(Path(sys.argv[1]), Path(sys.argv[2]), cfg)
done = time.perf_counter()
json.dump({
    "seconds_inner": round(done - start, 3),
    "seconds_imports": round(imported - start, 3),
    "ingest_module": ingest_module.__file__,
    "ingest_module_sha256": module_sha256,  # hashed right after import: what actually ran
    "config": cfg.model_dump(mode="json"),
    "rows_read": report.rows_read,
    "rows_written": report.rows_written,
    "rows_quarantined": report.rows_quarantined,
    "split_rows": report.split_rows,
    "split_contexts": report.split_contexts,
}, sys.stdout)
"""
)
# --- measuring one subprocess ---------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    """root and every live descendant (by scanning /proc/*/stat for parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:  # no smaps_rollup: resident pages
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        return 0


class _TreeSampler(threading.Thread):
    """Samples the summed PSS and the process count of a process tree until stopped."""

    def __init__(self, pid: int, interval: float, skip_root: bool = False):
        super().__init__(daemon=True)
        self.pid, self.interval, self.skip_root = pid, interval, skip_root
        self.peak_kb = 0
        self.max_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            tree = _descendants(self.pid)[1 if self.skip_root else 0 :]
            self.peak_kb = max(self.peak_kb, sum(_pss_kb(p) for p in tree))
            self.max_processes = max(self.max_processes, len(tree))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def warm_cache(paths: list[Path]) -> None:
    """Read the raw files once so every measured run starts from the same (warm) page cache."""
    for path in paths:
        with open(path, "rb", buffering=0) as fh:
            while fh.read(16 * MB):
                pass


TIME = shutil.which("time", path="/usr/bin:/bin")  # GNU time: %M is the child's ru_maxrss


def child_env(work: Path) -> dict[str, str]:
    """The environment of every measured child: bytecode cached under `work`.

    An installed package normally has its .pyc files; without them (e.g.
    PYTHONDONTWRITEBYTECODE=1 and a venv installed without compiling) each run would
    recompile every imported module from source (about 0.8 s for ours). A PYTHONPYCACHEPREFIX
    under --work gives every side compiled imports without writing into the venv."""
    env = {**os.environ, "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def measure(
    cmd: list[str],
    log_dir: Path,
    name: str,
    cwd: Path = REPO,
    sample_interval: float = 0.25,
    env: dict[str, str] | None = None,
) -> dict:
    """Run cmd in a fresh child; wall/CPU seconds, peak memory and its JSON stdout.

    The child is started through /usr/bin/time when present: ru_maxrss survives exec, so a
    child forked straight from this process could report this process's own peak; `time`
    is tiny. Without it, wait4's rusage of the direct child is used.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = log_dir / f"{name}.stdout", log_dir / f"{name}.stderr"
    time_path = log_dir / f"{name}.time"
    full_cmd = [TIME, "-f", "%e %U %S %M", "-o", str(time_path), *cmd] if TIME else cmd
    load_before = os.getloadavg()[0]
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        start = time.perf_counter()
        child = subprocess.Popen(full_cmd, stdout=out, stderr=err, cwd=cwd, env=env)
        sampler = _TreeSampler(child.pid, sample_interval, skip_root=bool(TIME))
        sampler.start()
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop()
        child.returncode = os.waitstatus_to_exitcode(status)
    cpu_s, maxrss_kb, source = usage.ru_utime + usage.ru_stime, usage.ru_maxrss, "wait4"
    if TIME:
        fields = time_path.read_text().strip().splitlines()[-1].split()
        cpu_s, maxrss_kb, source = float(fields[1]) + float(fields[2]), int(fields[3]), "time -f %M"
    result: dict = {
        "exit_code": child.returncode,
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu_s, 2),
        "peak_rss_mb": round(maxrss_kb / 1024, 1),  # Linux: kB
        "peak_rss_source": source,
        "peak_tree_pss_mb": round(sampler.peak_kb / 1024, 1),
        "max_processes": sampler.max_processes,
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }
    text = stdout_path.read_text()
    try:
        result["child"] = json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        result["child"] = None
        result["stdout_tail"] = text[-2000:]
    if child.returncode != 0:
        result["stderr_tail"] = stderr_path.read_text(errors="replace")[-4000:]
    return result
