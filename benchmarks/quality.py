"""Quality: test AUCs (with standard errors) of ESMM, ESMM fed only the first id of each
field, ESMM-NS and BASE, against the generator's Bayes oracle; and a learning curve.

Each run generates (or reuses) data of a synth profile (`--profile`, default `default`)
with a fixed seed, ingests it with the
`ingest` section of `--params`, trains with `tasks.train.train_esmm` (the `model` and
`train` sections, optionally a preset and overrides) and scores the test split with
`tasks.inputs.predict_split` + `tasks.evaluate.compute_metrics`. Standard errors are Hanley &
McNeil's (1982) from the AUC and the positive / negative counts; the oracle's use the same
counts. Writes a JSON record to benchmarks/results/.

    python -m benchmarks.quality --train 1000000 --test 300000            # the table
    python -m benchmarks.quality --curve 250000 1000000 4000000 --runs esmm   # learning curve
    python -m benchmarks.quality --runs esmm esmm_first_id --train-seeds 42 7 1 2 3

Training-seed noise moves an AUC by more than most effects (up to about 0.004 CTR and 0.006
CVR at 1M); `--train-seeds` trains every run once per seed on the same data and adds, per
run and per paired difference, the mean over the seeds with its standard error across
them (sd / sqrt(seeds)) and how many seeds had ours ahead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
METRICS = ("ctr_auc", "ctcvr_auc", "cvr_auc_clicked")
RUNS = {  # name: (model.variant, fed only the first id of each field: benchmarks.first_id)
    "esmm": ("esmm", False),
    "esmm_first_id": ("esmm", True),
    "esmm_ns": ("esmm_ns", False),
    "base": ("base", False),
}


def auc_se(auc: float, positives: int, negatives: int) -> float:
    """Hanley-McNeil standard error of an AUC."""
    if not positives or not negatives or math.isnan(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives
    )
    return math.sqrt(max(var, 0.0))


def counts(metrics: dict) -> dict[str, tuple[int, int]]:
    """Positives and negatives behind each AUC."""
    n, clicks, conv = metrics["impressions"], metrics["clicks"], metrics["conversions"]
    return {
        "ctr_auc": (clicks, n - clicks),
        "ctcvr_auc": (conv, n - conv),
        "cvr_auc_clicked": (conv, clicks - conv),
    }


def prepare(
    work: Path,
    n_train: int,
    n_test: int,
    seed: int,
    ingest_cfg,
    profile: str = "default",
    raw: Path | None = None,
) -> Path:
    """The work folder of one data set: `raw/` (generated unless `raw` names a folder of
    Ali-CCP files to use as they are) and `ingest-<min_count>/`."""
    from aliccp.synth import synthesize_ali_ccp
    from tasks.ingest import ingest_ali_ccp

    if raw is not None:
        root = work / f"raw-{raw.resolve().name}"
        ingest = root / f"ingest-{ingest_cfg.min_count}"
    else:
        root = work / f"{profile}-{n_train}-{n_test}-{seed}"
        raw, ingest = root / "raw", root / f"ingest-{ingest_cfg.min_count}"
        if not (raw / "oracle.json").is_file():
            synthesize_ali_ccp(raw, n_train, n_test, seed, profile=profile)
    if not (ingest / "vocab.parquet").is_file():
        ingest_ali_ccp(raw, ingest, ingest_cfg)
    return root


def _train_and_score(args, model_params, train_cfg, ingest, root, n_train, oracle, label):
    """Train and score every run of `args.runs` once; their rows (each printed when ready,
    with `label` added), then ESMM's paired differences against each other run; and the
    positive / negative counts."""
    import keras

    from benchmarks.first_id import FirstIdReader
    from tasks.evaluate import auc_differences, compute_metrics
    from tasks.inputs import SplitReader, predict_split
    from tasks.train import train_esmm

    rows, predictions = [], {}
    for name in args.runs:
        variant, first_id_only = RUNS[name]
        reader = FirstIdReader if first_id_only else SplitReader
        model_cfg = model_params.model_copy(update={"variant": variant})
        suffix = f"-seed{label['train_seed']}" if label else ""
        out = root / f"train-{name}-{args.tag or 'default'}{suffix}"
        start = time.perf_counter()
        result = train_esmm(
            ingest, out, model_cfg, train_cfg, verbose=2, resume=False, split_reader=reader
        )
        seconds = time.perf_counter() - start
        model = keras.models.load_model(result.model_path)
        predictions[name] = predict_split(model, reader(ingest / "test"))
        metrics = compute_metrics(predictions[name])
        n = counts(metrics)
        rows.append(
            {
                "run": name,
                "train_impressions": n_train,
                "epochs_run": result.epochs_run,
                "best_epoch": json.loads((out / "history.json").read_text()).get("best_epoch"),
                "train_seconds": round(seconds, 1),
                **{m: round(metrics[m], 4) for m in METRICS},
                **{f"{m}_se": round(auc_se(metrics[m], *n[m]), 4) for m in METRICS},
                **{f"{m}_gap": round(oracle[m] - metrics[m], 4) for m in METRICS if oracle},
                **label,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if "esmm" in predictions:  # paired DeLong: ours against each other run
        for name, other in predictions.items():
            if name != "esmm":
                deltas = auc_differences(predictions["esmm"], other)
                rows.append(
                    {
                        "run": f"esmm - {name}",
                        "train_impressions": n_train,
                        **{key: round(value, 4) for key, value in deltas.items()},
                        **label,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    return rows, n


def seed_summary(per_seed: list[list[dict]]) -> list[dict]:
    """Per run (and per paired difference) over the training seeds: the mean of each AUC
    (or difference), its standard error across the seeds (sd / sqrt(seeds)) and, for the
    differences, the number of seeds with ours ahead."""
    import numpy as np

    summary = []
    for name in [row["run"] for row in per_seed[0]]:
        same = [row for rows in per_seed for row in rows if row["run"] == name]
        keys = [f"{m}_delta" for m in METRICS] if " - " in name else list(METRICS)
        out = {"run": f"{name} (mean over {len(same)} seeds)", "seeds": len(same)}
        for key in keys:
            values = np.array([row[key] for row in same], dtype=float)
            out[key] = round(float(values.mean()), 4)
            out[f"{key}_se_across_seeds"] = round(
                float(values.std(ddof=1) / np.sqrt(len(values))), 4
            )
            if " - " in name:
                out[f"{key}_seeds_ahead"] = int((values > 0).sum())
        summary.append(out)
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--preset", help="apply a params preset (e.g. paper)")
    parser.add_argument(
        "--set", nargs="*", default=[], help="overrides, e.g. train.learning_rate=0.002"
    )
    parser.add_argument("--train", type=int, default=1_000_000)
    parser.add_argument("--test", type=int, default=300_000)
    parser.add_argument("--curve", type=int, nargs="*", help="train sizes for a learning curve")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--profile", default="default", help="synth profile (default, realistic)")
    parser.add_argument(
        "--raw",
        type=Path,
        help="a folder of Ali-CCP files (train and test; oracle.json optional) to use instead "
        "of generated data; --train/--test/--seed/--profile/--curve then do not apply",
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "esmm-quality")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--train-seeds",
        type=int,
        nargs="*",
        help="train every run once per seed (train.seed) and summarise across the seeds",
    )
    return parser


def _params(args: argparse.Namespace):
    """The params file with `--preset` (its model keys then apply) and `--set` overrides."""
    from tasks.config import Params

    raw_params = yaml.safe_load(args.params.read_text())
    if args.preset:
        raw_params["preset"] = args.preset
        for key in ("embedding_dim",):  # let the preset's model keys apply
            raw_params.get("model", {}).pop(key, None)
        for tower in ("ctr_tower", "cvr_tower"):
            raw_params.get("model", {}).get(tower, {}).pop("units", None)
    for item in args.set:
        key, value = item.split("=", 1)
        section, *path = key.split(".")
        node = raw_params.setdefault(section, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = yaml.safe_load(value)
    return Params.model_validate(raw_params)


def _one_size(
    args: argparse.Namespace, params, n_train: int, train_seeds: list[int]
) -> tuple[list[dict], int, dict | None]:
    """Every run on the data of one train size (or of `--raw`), once per training seed;
    the rows (each printed when ready), the train impressions and the data's oracle.json."""
    root = prepare(args.work, n_train, args.test, args.seed, params.ingest, args.profile, args.raw)
    ingest = root / f"ingest-{params.ingest.min_count}"
    oracle_path = (args.raw or root / "raw") / "oracle.json"
    oracle_file = json.loads(oracle_path.read_text()) if oracle_path.is_file() else None
    oracle = oracle_file["test"] if oracle_file else None
    if args.raw is not None:  # the size of the data set given
        n_train = json.loads((ingest / "report.json").read_text())["split_rows"]["train"]
    rows, per_seed = [], []
    for train_seed in train_seeds:
        train_cfg = params.train.model_copy(update={"seed": train_seed})
        label = {"train_seed": train_seed} if args.train_seeds else {}
        seed_rows, n = _train_and_score(
            args, params.model, train_cfg, ingest, root, n_train, oracle, label
        )
        per_seed.append(seed_rows)
        rows.extend(seed_rows)
    if args.train_seeds and len(train_seeds) > 1:
        for row in seed_summary(per_seed):
            row["train_impressions"] = n_train
            rows.append(row)
            print(json.dumps(row), flush=True)
    if oracle:
        oracle_row = {
            "run": "oracle",
            "train_impressions": n_train,
            **{m: round(oracle[m], 4) for m in METRICS},
            **{f"{m}_se": round(auc_se(oracle[m], *n[m]), 4) for m in METRICS},
        }
        rows.append(oracle_row)
        print(json.dumps(oracle_row), flush=True)
    return rows, n_train, oracle_file


def _record_name(args: argparse.Namespace, sizes: list[int], n_train: int) -> tuple[str, str]:
    """The result file's name and tag (a profile other than the default, or the --raw
    folder, is named in the tag)."""
    kind = "curve" if args.curve else "table"
    tag = args.tag
    if args.raw is not None:
        tag = args.raw.resolve().name + (f"-{tag}" if tag else "")
    elif args.profile != "default" and not tag.startswith(args.profile):
        tag = f"{args.profile}-{tag}" if tag else args.profile
    size = n_train if args.raw is not None else max(sizes)
    return f"quality-{kind}-{size}", tag


def main() -> None:
    """Train and score every run at each size, record and print the rows."""
    parser = _parser()
    args = parser.parse_args()

    import models.esmm  # noqa: F401  (custom layers)
    from benchmarks.machine import machine_info, write_record

    params = _params(args)
    if args.raw is not None and args.curve:
        parser.error("--curve generates data of each size; it does not apply with --raw")
    sizes = args.curve or [args.train]
    train_seeds = args.train_seeds or [params.train.seed]
    load_before = os.getloadavg()
    rows = []
    for n_train in sizes:
        size_rows, n_train, oracle_file = _one_size(args, params, n_train, train_seeds)
        rows.extend(size_rows)

    record = {
        "benchmark": "quality",
        "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "profile": None if args.raw else args.profile,
        "raw": str(args.raw.resolve()) if args.raw else None,
        "raw_oracle": oracle_file if args.raw else None,
        "seed": None if args.raw else args.seed,
        "train_seeds": train_seeds,
        "test_impressions": None if args.raw else args.test,
        "params": params.model_dump(
            by_alias=True, mode="json", include={"preset", "model", "train", "ingest"}
        ),
        "rows": rows,
    }
    name, tag = _record_name(args, sizes, n_train)
    path = write_record(args.out, name, record, tag)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
