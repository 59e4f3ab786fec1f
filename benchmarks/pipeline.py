"""End-to-end pipeline benchmark: wall time of every step and the test AUCs against the oracle.

Runs the same step functions as the flow and `dvc repro` (tasks/steps.py) on the data and
parameters of `--params`, in a scratch working copy, and writes a JSON record with the
machine and date to benchmarks/results/.

    python -m benchmarks.pipeline                  # params.yaml defaults (500k/100k impressions)
    python -m benchmarks.pipeline --train 1000000 --test 300000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.machine import machine_info, write_record

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--train", type=int, help="train impressions (default: synth.train)")
    parser.add_argument("--test", type=int, help="test impressions (default: synth.test)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    from aliccp.synth import synthesize_ali_ccp
    from tasks import steps
    from tasks.config import Params

    raw_params = yaml.safe_load(args.params.read_text())
    work = Path(tempfile.mkdtemp(prefix="esmm-bench-"))
    raw_params["paths"] = {"raw_dir": "data", "artifacts_dir": "artifacts"}
    raw_params["validate"] = {**raw_params.get("validate", {}), "schema_dir": str(REPO / "schema")}
    params = Params.model_validate(raw_params)
    n_train = args.train or params.synth.train
    n_test = args.test or params.synth.test
    os.chdir(work)

    timings: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 2)
        print(f"{name:<10} {timings[name]:8.1f} s", flush=True)
        return result

    timed("synth", lambda: synthesize_ali_ccp(work / "data", n_train, n_test, params.synth.seed))
    report = timed("ingest", lambda: steps.ingest(params))
    timed("validate", lambda: steps.validate(params))
    trained = timed("train", lambda: steps.train(params, verbose=2))
    evaluation = timed("evaluate", lambda: steps.evaluate(params))

    train_rows = report.split_rows["train"]
    record = {
        "benchmark": "pipeline",
        "machine": machine_info(),
        "impressions": {"train_raw": n_train, "test_raw": n_test, **report.split_rows},
        "seconds": timings,
        "ingest_impressions_per_s": round((n_train + n_test) / timings["ingest"]),
        "train_samples_per_s_wall_incl_validation": round(
            train_rows * trained.epochs_run / timings["train"]
        ),
        "epochs_run": trained.epochs_run,
        "metrics": {k: evaluation.metrics[k] for k in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked")},
        "oracle": {k: evaluation.oracle[k] for k in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked")},
        "params": params.model_dump(
            by_alias=True, mode="json", include={"model", "train", "ingest"}
        ),
    }
    path = write_record(args.out, f"pipeline-{n_train}", record)
    for name in ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked"):
        m, o = record["metrics"][name], record["oracle"][name]
        print(f"{name:<16} model {m:.4f}  oracle {o:.4f}  gap {o - m:.4f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
