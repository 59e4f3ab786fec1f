"""Ingestion benchmark: our `ingest_ali_ccp` against a straightforward pure-Python parser.

Generates raw Ali-CCP text of a given size once (cached under `--work`, keyed by size,
profile, seed and the profile's definition), then measures, each in a fresh subprocess and on
the same files with a warm page cache:

- ours: `tasks.ingest.ingest_ali_ccp` with the `ingest` section of the params file of the
  code measured (the working copy, or with `--ref` a commit exported by `git archive`);
- baseline: `benchmarks.baseline_parser` (dict of common features, line-by-line split and
  join, last id of each multi-valued field, CSV out).

For each: wall seconds (parent clock, interpreter start-up included), impressions per second
(train + test skeleton lines), CPU seconds, and peak memory: `peak_rss_mb` is the child's
`ru_maxrss` (via /usr/bin/time, else wait4; the largest single process of its tree),
`peak_tree_pss_mb` the largest sampled sum of PSS over the child and all its descendants
(what matters once parsing is spread over worker processes). Also the speed-up (baseline
seconds / ours), raw text size vs our output folder vs the baseline CSV, the git commit,
whether tasks/ingest.py had uncommitted changes, and the sha256 of the tasks/ingest.py each
run imported (a change during the run is flagged).

    python -m benchmarks.ingest --impressions 1000000 --repeat 3 --ref HEAD
    python -m benchmarks.ingest --impressions 10000000 --ref HEAD
    python -m benchmarks.ingest --markdown      # README table of all recorded results
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.machine import machine_info

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
OURS_CHILD = """
import hashlib, json, sys, time
from pathlib import Path
start = time.perf_counter()
import tasks.ingest as ingest_module
from tasks.config import load_params
module_sha256 = hashlib.sha256(Path(ingest_module.__file__).read_bytes()).hexdigest()
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


def measure(
    cmd: list[str], log_dir: Path, name: str, cwd: Path = REPO, sample_interval: float = 0.25
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
        child = subprocess.Popen(full_cmd, stdout=out, stderr=err, cwd=cwd)
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
            "tasks_ingest_sha256": _sha256(src / "tasks" / "ingest.py"),
        }
    dirty = _git("status", "--porcelain", "--", "tasks", "params.yaml")
    return {
        "source": "working copy",
        "commit": _git("rev-parse", "HEAD"),
        "tasks_ingest_uncommitted": bool(_git("status", "--porcelain", "--", "tasks/ingest.py")),
        "uncommitted": dirty.splitlines() if dirty else [],
        "tasks_ingest_sha256": _sha256(REPO / "tasks" / "ingest.py"),
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
    from tasks.synth import PROFILES

    if requested:
        if requested not in PROFILES:
            sys.exit(f"--profile {requested!r} not in tasks.synth.PROFILES {sorted(PROFILES)}")
        return requested, None
    if PREFERRED_PROFILE in PROFILES:
        return PREFERRED_PROFILE, None
    return "default", (
        f"profile {PREFERRED_PROFILE!r} not in tasks.synth.PROFILES {sorted(PROFILES)} "
        "when this ran: fell back to 'default' (far fewer behaviour entries per context)"
    )


def prepare_raw(work: Path, n_train: int, n_test: int, seed: int, profile: str) -> dict:
    """Generate (or reuse) the raw files; returns their description."""
    from tasks import synth

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


def _median_run(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["exit_code"] == 0] or runs
    return sorted(ok, key=lambda r: r["wall_s"])[len(ok) // 2]


def _get(d: dict | None, key: str, spec: str = ",.0f") -> str:
    """d[key] formatted, or '-' when the run is missing, failed or the value is unknown."""
    if not d or d.get(key) is None or (d.get("ok") is False and key != "wall_s"):
        return "-"
    return format(d[key], spec)


def _table(record: dict) -> str:
    ours, base = record["ours"], record["baseline"] or {}
    sizes = record["sizes_mb"]
    rows = [
        ("", "ours", "baseline"),
        ("ok", str(ours["ok"]), str(base.get("ok", "-"))),
        ("wall s", _get(ours, "wall_s", ".1f"), _get(base, "wall_s", ".1f")),
        ("impressions/s", _get(ours, "impressions_per_s"), _get(base, "impressions_per_s")),
        ("CPU s", _get(ours, "cpu_s", ".1f"), _get(base, "cpu_s", ".1f")),
        ("peak RSS MB", _get(ours, "peak_rss_mb"), _get(base, "peak_rss_mb")),
        ("peak tree PSS MB", _get(ours, "peak_tree_pss_mb"), _get(base, "peak_tree_pss_mb")),
        ("interpreter+imports MB", _get(ours, "floor_rss_mb"), _get(base, "floor_rss_mb")),
        ("output MB", _get(sizes, "ours_output", ",.1f"), _get(sizes, "baseline_csv", ",.1f")),
        (
            "impressions written",
            _get(ours, "impressions_written"),
            _get(base, "impressions_written"),
        ),
    ]
    lines = [f"{a:<24} {b:>14} {c:>14}" for a, b, c in rows]
    lines.append(
        f"speed-up {_get(record, 'speedup', '')}x; raw text {sizes['raw_text']:,.1f} MB "
        f"-> ours {sizes['ours_output']:,.1f} MB (Parquet {sizes['ours_parquet']:,.1f}), "
        f"baseline CSV {_get(sizes, 'baseline_csv', ',.1f')} MB"
    )
    return "\n".join(lines)


def markdown_table(results: Path) -> str:
    """One README row per recorded ingest result."""
    head = (
        "| date | machine | code | profile | impressions (train+test) | ours imp/s "
        "| baseline imp/s | speed-up (baseline s / ours s) | ours peak RSS MB (tree PSS) "
        "| baseline peak RSS MB "
        "| raw text MB | ours output MB | baseline CSV MB |\n" + "|---" * 13 + "|"
    )
    rows = [head]
    records = [json.loads(p.read_text()) for p in results.glob("ingest-*.json")]
    for r in sorted(records, key=lambda r: (r["impressions"]["total"], r["machine"]["date"])):
        m, o, b, s, c = r["machine"], r["ours"], r["baseline"], r["sizes_mb"], r["code"]
        code = f"{c['commit'][:7]} (ingest.py {c['tasks_ingest_sha256'][:8]})"
        if c["tasks_ingest_uncommitted"]:
            code += " + uncommitted tasks/ingest.py"
        if c.get("changed_during_run"):
            code += " (changed during run)"
        for key, value in (r.get("params_ingest_overrides") or {}).items():
            code += f", {key}={value}"
        both_ok = o["ok"] and b and b["ok"]
        speedup = f"{b['wall_s'] / o['wall_s']:.2f}x" if both_ok else "-"
        rows.append(
            f"| {m['date'][:10]} | {m['cores']} cores, {m['cpu']} | {code} "
            f"| {r['raw']['profile']} | {r['impressions']['total']:,} "
            f"| {_get(o, 'impressions_per_s')} | {_get(b, 'impressions_per_s')} "
            f"| {speedup} "
            f"| {_get(o, 'peak_rss_mb')} ({_get(o, 'peak_tree_pss_mb')}) | {_get(b, 'peak_rss_mb')} "
            f"| {s['raw_text']:,.0f} | {_get(s, 'ours_output')} | {_get(s, 'baseline_csv')} |"
        )
    return "\n".join(rows)


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--child-prepare":
        _child_prepare(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impressions", type=int, default=1_000_000, help="train impressions")
    parser.add_argument(
        "--test-impressions", type=int, help="test impressions (default: 30%% of --impressions)"
    )
    parser.add_argument(
        "--profile", help=f"tasks.synth profile (default: {PREFERRED_PROFILE!r} if it exists)"
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
        "the working copy, e.g. HEAD while someone is editing tasks/ingest.py",
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
    parser.add_argument("--skip-baseline", action="store_true", help="measure ours only")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the ingested outputs")
    parser.add_argument("--tag", help="suffix of the result file name")
    parser.add_argument(
        "--markdown", action="store_true", help="print the README table of --out and exit"
    )
    args = parser.parse_args()
    if args.markdown:
        print(markdown_table(args.out))
        return

    n_train = args.impressions
    n_test = args.test_impressions or max(1, round(0.3 * n_train))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = _export_commit(args.ref, work) if args.ref else None
    ours_cwd = src or REPO
    params = (args.params or ours_cwd / "params.yaml").resolve()
    overrides = _overrides(args.ingest)

    # Raw data, in a subprocess: this process stays small (see `measure`).
    python = sys.executable
    prepared = subprocess.run(
        [python, "-m", "benchmarks.ingest", "--child-prepare", str(work), str(n_train),
         str(n_test), str(args.seed), args.profile or ""],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    if prepared.returncode != 0:
        sys.exit(f"generating the raw data failed (exit {prepared.returncode})")
    raw = json.loads(prepared.stdout)
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
    outputs = {"ours": scratch / "ours", "baseline": scratch / "baseline"}
    commands = {
        "ours": ([python, "-c", OURS_CHILD, str(raw_dir), str(outputs["ours"]), str(params)],
                 ours_cwd),
        "baseline": ([python, "-m", "benchmarks.baseline_parser", str(raw_dir),
                      str(outputs["baseline"])], REPO),
    }  # fmt: skip
    if args.skip_baseline:
        del commands["baseline"]
    floors = {  # interpreter + imports only: the fixed part of each peak
        "ours": measure([python, "-c", "import tasks.ingest"], logs, "floor-ours", ours_cwd),
        "baseline": measure(
            [python, "-c", "import benchmarks.baseline_parser"], logs, "floor-base"
        ),
    }
    code_before = _code_state(src)  # and again after every run of ours, and at the end
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    sizes: dict[str, int] = {}
    print(f"{n_lines:,} impressions, {sum(raw['bytes'].values()) / MB:,.0f} MB of raw text")
    for i in range(args.repeat):
        for name, (cmd, cwd) in commands.items():
            shutil.rmtree(outputs[name], ignore_errors=True)
            _warm_cache(raw_paths)
            print(f"run {i + 1}/{args.repeat}: {name} ...", flush=True)
            run = measure(cmd, logs, f"{name}-{i + 1}", cwd)
            if name == "ours":
                run["code_after"] = _code_state(src)
            runs[name].append(run)
            status = "ok" if run["exit_code"] == 0 else f"FAILED (exit {run['exit_code']})"
            print(
                f"  {status}: {run['wall_s']:.1f} s, {n_lines / run['wall_s']:,.0f} impressions/s, "
                f"peak RSS {run['peak_rss_mb']:,.0f} MB (tree PSS {run['peak_tree_pss_mb']:,.0f})",
                flush=True,
            )
            if run["exit_code"] != 0:
                print(run.get("stderr_tail", ""), file=sys.stderr)
            elif name == "ours":
                sizes["ours_output"] = _tree_bytes(outputs["ours"])
                sizes["ours_parquet"] = _tree_bytes(outputs["ours"], ".parquet")
            else:
                sizes["baseline_csv"] = _tree_bytes(outputs["baseline"], ".csv")
    code_after = _code_state(src)
    if not args.keep_outputs:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)

    def summary(name: str) -> dict | None:
        if name not in runs:
            return None
        run = _median_run(runs[name])
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
            "floor_rss_mb": floors[name]["peak_rss_mb"],
            "rows_written": written,  # ours: impressions + contexts
            "impressions_written": impressions_out,
            "runs": runs[name],
        }

    ours, base = summary("ours"), summary("baseline")
    ran = {(r.get("child") or {}).get("ingest_module_sha256") for r in runs["ours"]} - {None}
    ingest_sha = code_before["tasks_ingest_sha256"]
    changed = bool(  # did tasks/ingest.py change while we measured it?
        ran - {ingest_sha}
        or code_after["tasks_ingest_sha256"] != ingest_sha
        or any(r["code_after"]["tasks_ingest_sha256"] != ingest_sha for r in runs["ours"])
    )
    record = {
        "benchmark": "ingest",
        "machine": machine_info(),
        "code": {
            **code_before,
            "tasks_ingest_uncommitted": code_before["tasks_ingest_uncommitted"]
            or code_after["tasks_ingest_uncommitted"],
            "changed_during_run": changed,
            "ingest_module_sha256_ran": sorted(ran),
            **({"working_copy_at_end": _code_state()} if src else {}),
            **({"after": code_after} if changed else {}),
        },
        "raw": raw,
        "profile_note": profile_note,
        "impressions": {"train": n_train, "test": n_test, "total": n_lines},
        "params_ingest": (ours["runs"][-1].get("child") or {}).get("config"),
        "params_ingest_overrides": overrides,
        "ours": ours,
        "baseline": base,
        "speedup": round(base["wall_s"] / ours["wall_s"], 2) if base else None,
        "same_impressions_written": (
            ours["impressions_written"] == base["impressions_written"] if base else None
        ),
        "sizes_mb": {
            "raw_text": round(sum(raw["bytes"].values()) / MB, 1),
            "ours_output": round(sizes.get("ours_output", 0) / MB, 1),
            "ours_parquet": round(sizes.get("ours_parquet", 0) / MB, 1),
            "baseline_csv": round(sizes.get("baseline_csv", 0) / MB, 1) if base else None,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    path = args.out / f"ingest-{n_train}-{record['machine']['date'][:10]}{suffix}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(_table(record))
    if changed:
        print("WARNING: the code measured changed while the benchmark ran; see code.after")
    if base and not record["same_impressions_written"]:
        print(
            "WARNING: ours and the baseline wrote different impression counts: "
            f"{ours['impressions_written']} vs {base['impressions_written']}"
        )
    print(f"wrote {path}")
    if all(r["exit_code"] == 0 for rs in runs.values() for r in rs):
        shutil.rmtree(logs if args.keep_outputs else scratch, ignore_errors=True)
    else:
        print(f"logs kept in {logs}")


if __name__ == "__main__":
    main()
