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
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.ingest_data import (
    PREFERRED_PROFILE,
    RAW_NAMES,
    code_state,
    export_commit,
    params_with,
    parse_overrides,
    prepare_raw,
    resolve_profile,
    tree_bytes,
)
from benchmarks.ingest_measure import MB, OURS_CHILD, child_env, measure, warm_cache
from benchmarks.ingest_report import BASELINES, markdown_table, median_run, result_table
from benchmarks.machine import machine_info, write_record

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _child_prepare(work: str, n_train: str, n_test: str, seed: str, requested: str) -> None:
    """Run in a subprocess (keeps numpy & co. out of the measuring parent): raw data as JSON."""
    profile, note = resolve_profile(requested or None)
    info = prepare_raw(Path(work), int(n_train), int(n_test), int(seed), profile)
    json.dump({**info, "profile_note": note}, sys.stdout)


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
            warm_cache(raw_paths)
            _wait_for_load(args.max_load, args.max_wait)
            print(f"run {i + 1}/{args.repeat}: {name} ...", flush=True)
            run = measure(cmd, logs, f"{name}-{i + 1}", cwd, env=env)
            if name == "ours":
                run["code_after"] = code_state(src)
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
                sizes["ours_output"] = tree_bytes(outputs["ours"])
                sizes["ours_parquet"] = tree_bytes(outputs["ours"], ".parquet")
            else:  # the final CSVs (the usual script's joined *.csv.tmp are not counted)
                sizes[name] = tree_bytes(outputs[name], ".csv")
    return runs, sizes


def _summary(name: str, runs: list[dict], floor: dict, n_lines: int) -> dict:
    """The median run of one side, with its rates and counts."""
    run = median_run(runs)
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
        **({"working_copy_at_end": code_state()} if src else {}),
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


def _chosen_baselines(args: argparse.Namespace) -> list[str]:
    """The baselines to measure (none with --skip-baseline); exits on an unknown name."""
    baselines = [] if args.skip_baseline else [b for b in args.baselines.split(",") if b]
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        sys.exit(f"--baselines: unknown {sorted(unknown)}; choose from {list(BASELINES)}")
    return baselines


def _commands(
    python: str, raw_dir: Path, params: Path, ours_cwd: Path, outputs: dict[str, Path]
) -> dict[str, tuple[list[str], Path]]:
    """name -> (command, working directory) of ours and of each baseline in `outputs`."""
    return {
        "ours": ([python, "-c", OURS_CHILD, str(raw_dir), str(outputs["ours"]), str(params)],
                 ours_cwd),
        **{b: ([python, "-m", "benchmarks.baseline_parser", str(raw_dir), str(outputs[b]),
                *BASELINES[b][1]], REPO) for b in outputs if b != "ours"},
    }  # fmt: skip


def _record(
    *,
    runs: dict[str, list[dict]],
    floors: dict[str, dict],
    sizes: dict[str, int],
    raw: dict,
    profile_note: str | None,
    impressions: dict[str, int],
    code_before: dict,
    code_after: dict,
    src: Path | None,
    loadavg_start: list[float],
    bytecode_cache: str,
    overrides: dict,
) -> dict:
    """The JSON record of one benchmark run: each side's median run, the speed-ups, sizes,
    load and provenance (`src`: the exported commit measured, None for the working copy)."""
    n_lines = impressions["total"]
    ours = _summary("ours", runs["ours"], floors["ours"], n_lines)
    bases = {
        name: _summary(name, runs[name], floors[name], n_lines) for name in runs if name != "ours"
    }
    return {
        "benchmark": "ingest",
        "machine": machine_info(),
        "loadavg_start": loadavg_start,  # 1, 5, 15 min, before the first measured run
        "bytecode_cache": bytecode_cache,  # imports from .pyc, see child_env
        "code": _code_record(code_before, code_after, runs["ours"], src),
        "raw": raw,
        "profile_note": profile_note,
        "impressions": impressions,
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


def main() -> None:
    """Measure, record (benchmarks/results/ingest-*.json) and print; see the module docstring.

    The steps in order: the raw data (`_prepared_raw`), the floors (`_floors`), the measured
    runs (`_run_all`) and the record (`_record`)."""
    if len(sys.argv) == 7 and sys.argv[1] == "--child-prepare":
        _child_prepare(*sys.argv[2:])
        return
    args = _arguments()
    if args.markdown:
        print(markdown_table(args.out))
        return
    baselines = _chosen_baselines(args)
    n_train = args.impressions
    n_test = args.test_impressions or max(1, round(0.3 * n_train))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = export_commit(args.ref, work) if args.ref else None
    ours_cwd = src or REPO
    params = (args.params or ours_cwd / "params.yaml").resolve()
    overrides = parse_overrides(args.ingest)

    python = sys.executable
    raw = _prepared_raw(python, work, n_train, n_test, args)
    profile_note = raw.pop("profile_note")
    if profile_note:
        print(f"NOTE: {profile_note}", flush=True)
    raw_dir = Path(raw.pop("dir"))
    n_lines = raw["counts"]["train"]["impressions"] + raw["counts"]["test"]["impressions"]
    if args.prepare_only:
        print(f"raw data in {raw_dir} ({sum(raw['bytes'].values()) / MB:,.0f} MB)")
        return

    scratch = work / f"run-{os.getpid()}"
    logs = scratch / "logs"
    if overrides:
        params = params_with(params, overrides, scratch / "params.yaml")
    outputs = {"ours": scratch / "ours", **{b: scratch / b for b in baselines}}
    commands = _commands(python, raw_dir, params, ours_cwd, outputs)
    env = child_env(work)
    floors = _floors(python, logs, ours_cwd, env)
    _wait_for_load(args.max_load, args.max_wait)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    code_before = code_state(src)  # and again after every run of ours, and at the end
    print(
        f"{n_lines:,} impressions, {sum(raw['bytes'].values()) / MB:,.0f} MB of raw text; "
        f"load average {loadavg_start}"
    )
    raw_paths = [raw_dir / name for name in RAW_NAMES]
    runs, sizes = _run_all(args, commands, outputs, raw_paths, logs, env, src, n_lines)
    code_after = code_state(src)
    if not args.keep_outputs:
        for out in outputs.values():
            shutil.rmtree(out, ignore_errors=True)

    record = _record(
        runs=runs,
        floors=floors,
        sizes=sizes,
        raw=raw,
        profile_note=profile_note,
        impressions={"train": n_train, "test": n_test, "total": n_lines},
        code_before=code_before,
        code_after=code_after,
        src=src,
        loadavg_start=loadavg_start,
        bytecode_cache=env["PYTHONPYCACHEPREFIX"],
        overrides=overrides,
    )
    path = write_record(args.out, f"ingest-{n_train}", record, args.tag)
    print(result_table(record))
    _print_warnings(record)
    print(f"wrote {path}")
    if all(r["exit_code"] == 0 for rs in runs.values() for r in rs):
        shutil.rmtree(logs if args.keep_outputs else scratch, ignore_errors=True)
    else:
        print(f"logs kept in {logs}")


if __name__ == "__main__":
    main()
