"""Statistics throughput of the validation step: one Beam process against all cores.

Generates (once, cached under --work) and ingests a data set, then times
`tasks.validate_stats.generate_statistics` over every split and table, the Beam pipeline the
validate step runs, once per runner setting:

- `in_memory`: DirectRunner, one process;
- `multi_processing`: DirectRunner with one worker process per core (`--direct_num_workers=0`).

Each run is a fresh subprocess (Beam and TFDV imports excluded from the timing). It records
impressions/s (every impression of train + valid + test over the pipeline's wall time), the
load average before and after (other jobs may share the CPU), and checks that both settings
produced the same statistics. Writes benchmarks/results/validate-<impressions>-<date>.json.

    python -m benchmarks.validate --impressions 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as stats_mod
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import machine_info, write_record

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "in_memory": ["--direct_running_mode=in_memory", "--direct_num_workers=1"],
    "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=0"],
}

_CHILD = """
import json, sys, time
from pathlib import Path
from tasks.config import ValidateConfig
from tasks.validate_stats import TABLES, generate_statistics
from aliccp.format import SPLITS
ingest, out, options = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
inputs = {f"{s}_{t}": ingest / s / f for t, f in TABLES.items() for s in SPLITS}
start = time.perf_counter()
result = generate_statistics(inputs, out, ValidateConfig(beam_options=options))
seconds = time.perf_counter() - start
summary = {
    name: [d.num_examples for d in s.datasets]
    + sorted(
        (f.path.step[0], f.string_stats.common_stats.tot_num_values
         + f.num_stats.common_stats.tot_num_values)
        for d in s.datasets for f in d.features
    )
    for name, s in result.items()
}
print(json.dumps({"seconds": seconds, "summary": summary}))
"""


def _prepare(work: Path, impressions: int, test: int, seed: int) -> Path:
    from aliccp.synth import synthesize_ali_ccp
    from tasks.config import IngestConfig
    from tasks.ingest import ingest_ali_ccp

    raw, ingest = work / "data", work / "ingest"
    if not (ingest / "report.json").is_file():
        if not raw.is_dir():
            synthesize_ali_ccp(raw, impressions, test, seed)
        ingest_ali_ccp(raw, ingest, IngestConfig())
    return ingest


def _git_commit() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "tasks/validate_stats.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return proc.stdout.strip() + ("+dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impressions", type=int, default=1_000_000, help="train impressions")
    parser.add_argument("--test-impressions", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting (median kept)")
    parser.add_argument(
        "--work", type=Path, default=Path(tempfile.gettempdir()) / "esmm-validate-bench"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    work = args.work / f"{args.impressions}-{args.test_impressions}-{args.seed}"
    ingest = _prepare(work, args.impressions, args.test_impressions, args.seed)
    report = json.loads((ingest / "report.json").read_text())
    total = sum(report["split_rows"].values())
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}

    runs: dict[str, dict] = {}
    summaries = {}
    for name, options in SETTINGS.items():
        seconds, loads = [], []
        for i in range(args.repeat):
            load_before = os.getloadavg()
            with tempfile.TemporaryDirectory() as out:
                proc = subprocess.run(
                    [sys.executable, "-c", _CHILD, str(ingest), out, json.dumps(options)],
                    cwd=REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                )
            if proc.returncode:
                raise SystemExit(f"{name} run failed:\n{proc.stderr[-3000:]}")
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            seconds.append(child["seconds"])
            loads.append({"before": load_before, "after": os.getloadavg()})
            summaries[name] = child["summary"]
            print(
                f"{name} run {i + 1}: {child['seconds']:.1f} s, "
                f"{total / child['seconds']:,.0f} impressions/s, load {load_before[0]:.2f}"
            )
        median = stats_mod.median(seconds)
        runs[name] = {
            "beam_options": options,
            "seconds": seconds,
            "median_seconds": median,
            "impressions_per_second": total / median,
            "load_average": loads,
        }
    record = {
        "benchmark": "validate statistics",
        "machine": machine_info(),
        "code": _git_commit(),
        "data": {
            "train_impressions": args.impressions,
            "test_impressions": args.test_impressions,
            "seed": args.seed,
            "split_rows": report["split_rows"],
            "impressions_profiled": total,
        },
        "runs": runs,
        "same_statistics": summaries["in_memory"] == summaries["multi_processing"],
        "speed_up": runs["in_memory"]["median_seconds"]
        / runs["multi_processing"]["median_seconds"],
    }
    path = write_record(args.out, f"validate-{args.impressions}", record)
    print(
        f"same statistics: {record['same_statistics']}; speed-up {record['speed_up']:.2f}x; "
        f"wrote {path}"
    )


if __name__ == "__main__":
    main()
