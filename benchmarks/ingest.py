"""Ingestion benchmark: our `ingest_ali_ccp` against two pure-Python parsers.

Generates raw Ali-CCP text of a given size once (cached under `--work`, keyed by size,
profile, seed and the profile's definition), then measures, each in a fresh subprocess and on
the same files with a warm page cache:

- ours: `tasks.ingest.ingest_ali_ccp` with the `ingest` section of the params file of the
  code measured (the working copy, or with `--ref` a commit exported by `git archive`);
- usual: `benchmarks.baseline_parser --usual`, the algorithm of the usual public Ali-CCP
  script (regex split into a numpy array, dict of common features, join, label-encoding
  second pass, CSV out): the issue's reference point;
- optimised: `benchmarks.baseline_parser`, the same first pass written as fast as pure
  Python allows (no regex, no numpy, no second pass): a stricter reference, always reported
  alongside.

For each: wall seconds (parent clock, interpreter start-up included), impressions per second
(train + test skeleton lines), CPU seconds, and peak memory: `peak_rss_mb` is the child's
`ru_maxrss` (via /usr/bin/time, else wait4; the largest single process of its tree),
`peak_tree_pss_mb` the largest sampled sum of PSS over the child and all its descendants.
Also the speed-up against each baseline (baseline seconds / ours), raw text size vs our
output folder vs each baseline's CSV, the load average when the run started (other jobs share
the cores), the git commit, whether the ingestion code (the package tasks/ingest/, in older
commits the module tasks/ingest.py) had uncommitted changes, and the sha256 of the code each
run imported (`ingest_code_sha256`; a change during the run is flagged).

    python -m benchmarks.ingest --impressions 1000000 --repeat 3 --ref HEAD --max-load 1.5
    python -m benchmarks.ingest --impressions 10000000 --ref HEAD --max-load 1.5
    python -m benchmarks.ingest --markdown      # README table of all recorded results
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.machine import machine_info, write_record

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
RAW_NAMES = (
    "sample_skeleton_train.csv",
    "common_features_train.csv",
    "sample_skeleton_test.csv",
    "common_features_test.csv",
)
PREFERRED_PROFILE = "realistic"
MB = 2**20


# --- child entry points ---------------------------------------------------------------------

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


def _child_prepare(work: str, n_train: str, n_test: str, seed: str, requested: str) -> None:
    """Run in a subprocess (keeps numpy & co. out of the measuring parent): raw data as JSON."""
    profile, note = _resolve_profile(requested or None)
    info = prepare_raw(Path(work), int(n_train), int(n_test), int(seed), profile)
    json.dump({**info, "profile_note": note}, sys.stdout)


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


def _warm_cache(paths: list[Path]) -> None:
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


# --- data, sizes, provenance ----------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_bytes(path: Path, suffix: str | None = None) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and (suffix is None or p.name.endswith(suffix))
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
        ).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError) as err:
        return f"unavailable: {err}"


def _code_state(src: Path | None = None) -> dict:
    """What `ours` runs: the working copy (commit + uncommitted changes) or an exported commit."""
    if src is not None:
        return {
            "source": f"commit exported to {src}",
            "commit": (src / "COMMIT").read_text().strip(),
            "tasks_ingest_uncommitted": False,
            "uncommitted": [],
            "tasks_ingest_sha256": ingest_code_sha256(src / "tasks"),
        }
    dirty = _git("status", "--porcelain", "--", "tasks", "params.yaml")
    return {
        "source": "working copy",
        "commit": _git("rev-parse", "HEAD"),
        "tasks_ingest_uncommitted": bool(_git("status", "--porcelain", "--", *INGEST_CODE)),
        "uncommitted": dirty.splitlines() if dirty else [],
        "tasks_ingest_sha256": ingest_code_sha256(REPO / "tasks"),
    }


def _export_commit(ref: str, work: Path) -> Path:
    """`git archive` of ref under work (reused when already there); returns the folder."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    if sha.startswith("unavailable"):
        sys.exit(f"--ref {ref!r}: {sha}")
    src = work / f"src-{sha[:12]}"
    if not (src / "COMMIT").is_file():
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", sha], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        (src / "COMMIT").write_text(sha + "\n")
    return src


def _resolve_profile(requested: str | None) -> tuple[str, str | None]:
    from aliccp.synth import PROFILES

    if requested:
        if requested not in PROFILES:
            sys.exit(f"--profile {requested!r} not in aliccp.synth.PROFILES {sorted(PROFILES)}")
        return requested, None
    if PREFERRED_PROFILE in PROFILES:
        return PREFERRED_PROFILE, None
    return "default", (
        f"profile {PREFERRED_PROFILE!r} not in aliccp.synth.PROFILES {sorted(PROFILES)} "
        "when this ran: fell back to 'default' (far fewer behaviour entries per context)"
    )


def prepare_raw(work: Path, n_train: int, n_test: int, seed: int, profile: str) -> dict:
    """Generate (or reuse) the raw files; returns their description."""
    from aliccp import synth

    definition = repr(synth.PROFILES[profile])
    key = hashlib.sha256(definition.encode()).hexdigest()[:10]
    raw = work / f"raw-{profile}-{n_train}-{n_test}-seed{seed}-{key}"
    marker = raw / "bench-raw.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        print(f"reusing raw data in {raw}", file=sys.stderr, flush=True)
        return info
    if raw.exists():
        shutil.rmtree(raw)  # an earlier generation was interrupted
    print(
        f"generating {n_train:,} + {n_test:,} impressions ({profile}) in {raw} ...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    summary = synth.synthesize_ali_ccp(raw, n_train, n_test, seed, profile=profile)
    info = {
        "dir": str(raw),
        "profile": profile,
        "profile_definition": definition,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "counts": {s: vars(c) for s, c in summary.counts.items()},
        "synth_seconds": round(time.perf_counter() - start, 1),
        "synth_sha256": _sha256(Path(synth.__file__)),
        "generated": machine_info()["date"],
    }
    info["bytes"] = {name: (raw / name).stat().st_size for name in RAW_NAMES}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    print(f"generated in {info['synth_seconds']} s", file=sys.stderr, flush=True)
    return info


def _overrides(pairs: list[str]) -> dict:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"--ingest {pair!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _params_with(params: Path, overrides: dict, dest: Path) -> Path:
    """A copy of the params file with `ingest` settings overridden (validated by the child)."""
    import yaml

    raw = yaml.safe_load(params.read_text()) or {}
    raw["ingest"] = {**(raw.get("ingest") or {}), **overrides}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


# --- report ---------------------------------------------------------------------------------

# Baselines: name -> (label, extra arguments of benchmarks.baseline_parser).
BASELINES = {
    "usual": ("usual script", ["--usual"]),
    "optimised": ("optimised parser", []),
}


def _median_run(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["exit_code"] == 0] or runs
    return sorted(ok, key=lambda r: r["wall_s"])[len(ok) // 2]


def _get(d: dict | None, key: str, spec: str = ",.0f") -> str:
    """d[key] formatted, or '-' when the run is missing, failed or the value is unknown."""
    if not d or d.get(key) is None or (d.get("ok") is False and key != "wall_s"):
        return "-"
    return format(d[key], spec)


def _baselines_of(record: dict) -> dict[str, dict | None]:
    """name -> summary of each baseline; records before the usual script had one baseline
    (`baseline`, the optimised parser)."""
    if "baselines" in record:
        return record["baselines"]
    return {"usual": None, "optimised": record.get("baseline")}


def _csv_mb_of(record: dict) -> dict[str, float | None]:
    sizes = record["sizes_mb"]
    if "baseline_csv_mb" in sizes:
        return sizes["baseline_csv_mb"]
    return {"usual": None, "optimised": sizes.get("baseline_csv")}


def _load_of(record: dict) -> float | None:
    """1-min load average when the record's runs started (older records: before ours ran)."""
    if record.get("loadavg_start"):
        return record["loadavg_start"][0]
    runs = (record.get("ours") or {}).get("runs") or []
    loads = [r["loadavg_1min_before"] for r in runs if "loadavg_1min_before" in r]
    return loads[0] if loads else None


def _max_load_of(record: dict) -> float | None:
    """Highest 1-min load average seen before or after any run of the record."""
    sides = [record.get("ours"), *_baselines_of(record).values()]
    loads = [
        r[key]
        for side in sides
        if side
        for r in side.get("runs", [])
        for key in ("loadavg_1min_before", "loadavg_1min_after")
        if key in r
    ]
    return max(loads) if loads else None


def _fmt_load(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _table(record: dict) -> str:
    ours, bases, csv_mb = record["ours"], _baselines_of(record), _csv_mb_of(record)
    sizes = record["sizes_mb"]
    names = [n for n, b in bases.items() if b]
    sides = [("ours", ours)] + [(BASELINES[n][0], bases[n]) for n in names]
    rows = [
        ("", *[name for name, _ in sides]),
        ("ok", *[str(s.get("ok", "-")) for _, s in sides]),
        ("wall s", *[_get(s, "wall_s", ".1f") for _, s in sides]),
        ("impressions/s", *[_get(s, "impressions_per_s") for _, s in sides]),
        ("CPU s", *[_get(s, "cpu_s", ".1f") for _, s in sides]),
        ("peak RSS MB", *[_get(s, "peak_rss_mb") for _, s in sides]),
        ("peak tree PSS MB", *[_get(s, "peak_tree_pss_mb") for _, s in sides]),
        ("interpreter+imports MB", *[_get(s, "floor_rss_mb") for _, s in sides]),
        (
            "output MB",
            _get(sizes, "ours_output", ",.1f"),
            *[_get(csv_mb, n, ",.1f") for n in names],
        ),
        ("impressions written", *[_get(s, "impressions_written") for _, s in sides]),
    ]
    lines = ["".join(f"{c:>18}" if i else f"{c:<24}" for i, c in enumerate(r)) for r in rows]
    for n in names:
        lines.append(f"speed-up vs {BASELINES[n][0]}: {record['speedups'][n]}x")
    lines.append(
        f"raw text {sizes['raw_text']:,.1f} MB -> ours {sizes['ours_output']:,.1f} MB "
        f"(Parquet {sizes['ours_parquet']:,.1f}); 1-min load average at start "
        f"{_fmt_load(_load_of(record))}, at most {_fmt_load(_max_load_of(record))} between runs"
    )
    return "\n".join(lines)


def markdown_table(results: Path) -> str:
    """One README row per recorded ingest result (older records: no usual-script columns)."""
    head = (
        "| date | machine | code | profile | impressions (train+test) "
        "| load (1 min): at start / max between runs "
        "| ours imp/s | usual script imp/s | optimised parser imp/s "
        "| speed-up vs usual script | speed-up vs optimised parser "
        "| ours peak RSS MB (tree PSS) | usual script peak RSS MB | optimised parser peak RSS MB "
        "| raw text MB | ours output MB | usual script CSV MB | optimised parser CSV MB |\n"
        + "|---" * 18
        + "|"
    )
    rows = [head]
    records = [json.loads(p.read_text()) for p in results.glob("ingest-*.json")]
    for r in sorted(records, key=lambda r: (r["impressions"]["total"], r["machine"]["date"])):
        m, o, s, c = r["machine"], r["ours"], r["sizes_mb"], r["code"]
        bases, csv_mb = _baselines_of(r), _csv_mb_of(r)
        code = f"{c['commit'][:7]} (ingest code {c['tasks_ingest_sha256'][:8]})"
        if c["tasks_ingest_uncommitted"]:
            code += " + uncommitted ingest code"
        if c.get("changed_during_run"):
            code += " (changed during run)"
        for key, value in (r.get("params_ingest_overrides") or {}).items():
            code += f", {key}={value}"
        speedups = []
        for name in BASELINES:
            b = bases.get(name)
            ok = o["ok"] and b and b["ok"]
            speedups.append(f"{b['wall_s'] / o['wall_s']:.2f}x" if ok else "-")
        load = f"{_fmt_load(_load_of(r))} / {_fmt_load(_max_load_of(r))}"
        rss = " | ".join(_get(bases.get(n), "peak_rss_mb") for n in BASELINES)
        rates = " | ".join(_get(bases.get(n), "impressions_per_s") for n in BASELINES)
        csvs = " | ".join(_get(csv_mb, n) for n in BASELINES)
        rows.append(
            f"| {m['date'][:10]} | {m['cores']} cores, {m['cpu']} | {code} "
            f"| {r['raw']['profile']} | {r['impressions']['total']:,} "
            f"| {load} "
            f"| {_get(o, 'impressions_per_s')} | {rates} | {' | '.join(speedups)} "
            f"| {_get(o, 'peak_rss_mb')} ({_get(o, 'peak_tree_pss_mb')}) | {rss} "
            f"| {s['raw_text']:,.0f} | {_get(s, 'ours_output')} | {csvs} |"
        )
    return "\n".join(rows)


def _wait_for_load(max_load: float | None, max_wait: float) -> None:
    """Wait (at most max_wait seconds) until the 1-min load average is at most max_load."""
    if max_load is None:
        return
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting ...", flush=True)
        time.sleep(30)


# --- main -----------------------------------------------------------------------------------


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impressions", type=int, default=1_000_000, help="train impressions")
    parser.add_argument(
        "--test-impressions", type=int, help="test impressions (default: 30%% of --impressions)"
    )
    parser.add_argument(
        "--profile", help=f"aliccp.synth profile (default: {PREFERRED_PROFILE!r} if it exists)"
    )
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "esmm-ingest-bench",
        help="cache of generated raw data, exported commits and scratch outputs",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--ref",
        help="measure tasks.ingest of this git commit (exported with git archive) instead of "
        "the working copy, e.g. HEAD while someone is editing tasks/ingest/",
    )
    parser.add_argument(
        "--params", type=Path, help="ingest settings (default: params.yaml of the code measured)"
    )
    parser.add_argument(
        "--ingest",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one `ingest` setting of the params file, e.g. --ingest workers=1",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of each (median reported)")
    parser.add_argument(
        "--prepare-only", action="store_true", help="generate (or find) the raw data and exit"
    )
    parser.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help=f"comma-separated baselines to measure, of {list(BASELINES)} (default: all)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="measure ours only")
    parser.add_argument(
        "--max-load",
        type=float,
        help="before each measured run, wait until the 1-min load average is at most this",
    )
    parser.add_argument(
        "--max-wait", type=float, default=900, help="seconds --max-load waits at most"
    )
    parser.add_argument("--keep-outputs", action="store_true", help="keep the ingested outputs")
    parser.add_argument("--tag", help="suffix of the result file name")
    parser.add_argument(
        "--markdown", action="store_true", help="print the README table of --out and exit"
    )
    return parser.parse_args()


def _prepared_raw(python: str, work: Path, n_train: int, n_test: int, args) -> dict:
    """The raw data (generated or found in the cache), in a subprocess: this process stays
    small (see `measure`)."""
    prepared = subprocess.run(
        [python, "-m", "benchmarks.ingest", "--child-prepare", str(work), str(n_train),
         str(n_test), str(args.seed), args.profile or ""],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    if prepared.returncode != 0:
        sys.exit(f"generating the raw data failed (exit {prepared.returncode})")
    return json.loads(prepared.stdout)


def _floors(python: str, logs: Path, ours_cwd: Path, env: dict[str, str]) -> dict[str, dict]:
    """Interpreter + imports only: the fixed part of each peak (and .pyc written)."""
    return {
        "ours": measure(
            [python, "-c", "import tasks.ingest, tasks.config"],
            logs,
            "floor-ours",
            ours_cwd,
            env=env,
        ),
        "optimised": measure(
            [python, "-c", "import benchmarks.baseline_parser"], logs, "floor-optimised", env=env
        ),
        "usual": measure(  # the usual script also loads numpy
            [python, "-c", "import benchmarks.baseline_parser, numpy"],
            logs,
            "floor-usual",
            env=env,
        ),
    }


def _run_all(
    args, commands: dict, outputs: dict, raw_paths: list[Path], logs: Path, env, src, n_lines: int
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """`args.repeat` runs of each command, in turn; the runs and the output sizes."""
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    sizes: dict[str, int] = {}
    for i in range(args.repeat):
        for name, (cmd, cwd) in commands.items():
            shutil.rmtree(outputs[name], ignore_errors=True)
            _warm_cache(raw_paths)
            _wait_for_load(args.max_load, args.max_wait)
            print(f"run {i + 1}/{args.repeat}: {name} ...", flush=True)
            run = measure(cmd, logs, f"{name}-{i + 1}", cwd, env=env)
            if name == "ours":
                run["code_after"] = _code_state(src)
            runs[name].append(run)
            status = "ok" if run["exit_code"] == 0 else f"FAILED (exit {run['exit_code']})"
            print(
                f"  {status}: {run['wall_s']:.1f} s, {n_lines / run['wall_s']:,.0f} impressions/s, "
                f"peak RSS {run['peak_rss_mb']:,.0f} MB (tree PSS {run['peak_tree_pss_mb']:,.0f})"
                f", load {run['loadavg_1min_before']} -> {run['loadavg_1min_after']}",
                flush=True,
            )
            if run["exit_code"] != 0:
                print(run.get("stderr_tail", ""), file=sys.stderr)
            elif name == "ours":
                sizes["ours_output"] = _tree_bytes(outputs["ours"])
                sizes["ours_parquet"] = _tree_bytes(outputs["ours"], ".parquet")
            else:  # the final CSVs (the usual script's joined *.csv.tmp are not counted)
                sizes[name] = _tree_bytes(outputs[name], ".csv")
    return runs, sizes


def _summary(name: str, runs: list[dict], floor: dict, n_lines: int) -> dict:
    """The median run of one side, with its rates and counts."""
    run = _median_run(runs)
    child = run.get("child") or {}
    if name == "ours":
        written = child.get("rows_written")
        impressions_out = sum(child["split_rows"].values()) if "split_rows" in child else None
    else:
        splits = child.get("splits")
        written = impressions_out = (
            sum(s["rows_written"] for s in splits.values()) if splits else None
        )
    return {
        "ok": run["exit_code"] == 0,
        "wall_s": run["wall_s"],
        "impressions_per_s": round(n_lines / run["wall_s"]),
        "cpu_s": run["cpu_s"],
        "cpu_per_wall": round(run["cpu_s"] / run["wall_s"], 2),
        "peak_rss_mb": run["peak_rss_mb"],
        "peak_tree_pss_mb": run["peak_tree_pss_mb"],
        "max_processes": run["max_processes"],
        "floor_rss_mb": floor["peak_rss_mb"],
        "rows_written": written,  # ours: impressions + contexts
        "impressions_written": impressions_out,
        "runs": runs,
    }


def _code_record(code_before: dict, code_after: dict, ours_runs: list[dict], src) -> dict:
    """The code measured, and whether it changed while it was measured."""
    ran = {(r.get("child") or {}).get("ingest_module_sha256") for r in ours_runs} - {None}
    ingest_sha = code_before["tasks_ingest_sha256"]
    changed = bool(  # did the ingestion code change while we measured it?
        ran - {ingest_sha}
        or code_after["tasks_ingest_sha256"] != ingest_sha
        or any(r["code_after"]["tasks_ingest_sha256"] != ingest_sha for r in ours_runs)
    )
    return {
        **code_before,
        "tasks_ingest_uncommitted": code_before["tasks_ingest_uncommitted"]
        or code_after["tasks_ingest_uncommitted"],
        "changed_during_run": changed,
        "ingest_module_sha256_ran": sorted(ran),
        **({"working_copy_at_end": _code_state()} if src else {}),
        **({"after": code_after} if changed else {}),
    }


def _sizes_record(raw: dict, sizes: dict[str, int]) -> dict:
    return {
        "raw_text": round(sum(raw["bytes"].values()) / MB, 1),
        "ours_output": round(sizes.get("ours_output", 0) / MB, 1),
        "ours_parquet": round(sizes.get("ours_parquet", 0) / MB, 1),
        "baseline_csv_mb": {
            name: round(sizes[name] / MB, 1) if name in sizes else None for name in BASELINES
        },
    }


def _print_warnings(record: dict) -> None:
    if record["code"]["changed_during_run"]:
        print("WARNING: the code measured changed while the benchmark ran; see code.after")
    ours, bases = record["ours"], record["baselines"]
    for name, same in record["same_impressions_written"].items():
        if not same:
            print(
                f"WARNING: ours and the {BASELINES[name][0]} wrote different impression counts: "
                f"{ours['impressions_written']} vs {bases[name]['impressions_written']}"
            )


def main() -> None:
    """Measure, record (benchmarks/results/ingest-*.json) and print; see the module docstring.

    Longer than 80 lines: the run's steps in order, sharing many local settings (the
    measuring is in `_floors`, `_run_all` and `_summary`)."""
    if len(sys.argv) == 7 and sys.argv[1] == "--child-prepare":
        _child_prepare(*sys.argv[2:])
        return
    args = _arguments()
    if args.markdown:
        print(markdown_table(args.out))
        return
    baselines = [] if args.skip_baseline else [b for b in args.baselines.split(",") if b]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        sys.exit(f"--baselines: unknown {sorted(unknown)}; choose from {list(BASELINES)}")

    n_train = args.impressions
    n_test = args.test_impressions or max(1, round(0.3 * n_train))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = _export_commit(args.ref, work) if args.ref else None
    ours_cwd = src or REPO
    params = (args.params or ours_cwd / "params.yaml").resolve()
    overrides = _overrides(args.ingest)

    python = sys.executable
    raw = _prepared_raw(python, work, n_train, n_test, args)
    profile_note = raw.pop("profile_note")
    if profile_note:
        print(f"NOTE: {profile_note}", flush=True)
    raw_dir = Path(raw.pop("dir"))
    raw_paths = [raw_dir / name for name in RAW_NAMES]
    n_lines = raw["counts"]["train"]["impressions"] + raw["counts"]["test"]["impressions"]
    if args.prepare_only:
        print(f"raw data in {raw_dir} ({sum(raw['bytes'].values()) / MB:,.0f} MB)")
        return

    scratch = work / f"run-{os.getpid()}"
    logs = scratch / "logs"
    if overrides:
        params = _params_with(params, overrides, scratch / "params.yaml")
    outputs = {"ours": scratch / "ours", **{b: scratch / b for b in baselines}}
    commands = {
        "ours": ([python, "-c", OURS_CHILD, str(raw_dir), str(outputs["ours"]), str(params)],
                 ours_cwd),
        **{b: ([python, "-m", "benchmarks.baseline_parser", str(raw_dir), str(outputs[b]),
                *BASELINES[b][1]], REPO) for b in baselines},
    }  # fmt: skip
    env = child_env(work)
    floors = _floors(python, logs, ours_cwd, env)
    _wait_for_load(args.max_load, args.max_wait)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    code_before = _code_state(src)  # and again after every run of ours, and at the end
    print(
        f"{n_lines:,} impressions, {sum(raw['bytes'].values()) / MB:,.0f} MB of raw text; "
        f"load average {loadavg_start}"
    )
    runs, sizes = _run_all(args, commands, outputs, raw_paths, logs, env, src, n_lines)
    code_after = _code_state(src)
    if not args.keep_outputs:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)

    ours = _summary("ours", runs["ours"], floors["ours"], n_lines)
    bases = {name: _summary(name, runs[name], floors[name], n_lines) for name in baselines}
    record = {
        "benchmark": "ingest",
        "machine": machine_info(),
        "loadavg_start": loadavg_start,  # 1, 5, 15 min, before the first measured run
        "bytecode_cache": env["PYTHONPYCACHEPREFIX"],  # imports from .pyc, see child_env
        "code": _code_record(code_before, code_after, runs["ours"], src),
        "raw": raw,
        "profile_note": profile_note,
        "impressions": {"train": n_train, "test": n_test, "total": n_lines},
        "params_ingest": (ours["runs"][-1].get("child") or {}).get("config"),
        "params_ingest_overrides": overrides,
        "ours": ours,
        "baselines": {name: bases.get(name) for name in BASELINES},
        "speedups": {  # baseline wall seconds / ours
            name: round(b["wall_s"] / ours["wall_s"], 2) for name, b in bases.items()
        },
        "same_impressions_written": {
            name: ours["impressions_written"] == b["impressions_written"]
            for name, b in bases.items()
        },
        "sizes_mb": _sizes_record(raw, sizes),
    }
    path = write_record(args.out, f"ingest-{n_train}", record, args.tag)
    print(_table(record))
    _print_warnings(record)
    print(f"wrote {path}")
    if all(r["exit_code"] == 0 for rs in runs.values() for r in rs):
        shutil.rmtree(logs if args.keep_outputs else scratch, ignore_errors=True)
    else:
        print(f"logs kept in {logs}")


if __name__ == "__main__":
    main()
