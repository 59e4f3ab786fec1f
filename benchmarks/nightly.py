"""Nightly retraining: staleness, windowed retraining from scratch and warm start, compared.

A drifting series of `--days` days (`aliccp.synth.days`, default churn and drift) is
generated; every night d = 1 .. days-1 has three models, each scored on day d+1's test
split (tomorrow's traffic) against that split's oracle AUCs:

- (a) **stale**: the model trained from scratch on day 1, never retrained;
- (b) **window**: from scratch every night on the latest `--window` days (the train step's
  `ingest.window`), `--epochs-scratch` epochs with early stopping (the default params);
- (c) **warm**: every night from the previous night's (c) model (`tasks.warm_start`, grown
  vocabularies, fresh optimiser) on the newest day only, `--epochs-warm` epochs; night 1 is
  (a)'s model.

Per night it records the AUCs, their gaps to the oracle and the wall time of each
approach's ingestion and training, then writes `benchmarks/results/nightly-<date>.json` and
the plot `benchmarks/results/nightly-<date>.png`. The model and training settings are
params.yaml's. The target (issue 26): (c) within 0.003 CTR AUC and 0.01 CTCVR AUC of (b),
averaged over the nights, with at most a third of (b)'s nightly training time (the ratio of
the two measured in the same run).

    python -m benchmarks.nightly                      # 8 days of 900k + 100k impressions
    python -m benchmarks.nightly --days 8 --train 200000 --test 50000
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def score(model_path: Path, test_dir: Path) -> dict[str, float]:
    """CTR and CTCVR AUC of a saved model on a test split."""
    import keras

    import models.esmm  # noqa: F401  (custom layers)
    from models.features import CLICK_LABEL_KEY, CONVERSION_LABEL_KEY
    from tasks.inputs import predict_split

    frame = predict_split(keras.models.load_model(model_path, compile=False), test_dir)
    click = frame[CLICK_LABEL_KEY].to_numpy()
    ctcvr = click * frame[CONVERSION_LABEL_KEY].to_numpy()
    return {"ctr_auc": _auc(click, frame["p_ctr"]), "ctcvr_auc": _auc(ctcvr, frame["p_ctcvr"])}


def _timed(call, *args, **kwargs):
    """(call(*args, **kwargs), its wall time in seconds)."""
    started = time.perf_counter()
    result = call(*args, **kwargs)
    return result, time.perf_counter() - started


def run(args: argparse.Namespace, work: Path) -> dict:
    """The whole benchmark in `work`; the record (without the machine)."""
    from aliccp.synth.days import day_dir_name, synthesize_days
    from tasks.config import load_params
    from tasks.ingest import ingest_ali_ccp
    from tasks.train import train_esmm
    from tasks.warm_start import WarmStart, read_source

    params = load_params(REPO / "params.yaml")
    series = work / "series"
    _, synth_seconds = _timed(
        lambda: synthesize_days(
            series,
            args.days,
            args.train,
            args.test,
            args.seed,
            progress=lambda s: print(s, flush=True),
        )
    )
    day = {d: series / day_dir_name(d) for d in range(1, args.days + 1)}
    oracle = {d: json.loads((day[d] / "oracle.json").read_text())["test"] for d in day}
    scratch_cfg = params.train.model_copy(update={"epochs": args.epochs_scratch})
    warm_cfg = params.train.model_copy(update={"epochs": args.epochs_warm})

    def ingest_day(d: int) -> tuple[Path, float]:
        out = work / "ingest" / day_dir_name(d)
        return out, _timed(lambda: ingest_ali_ccp(day[d], out, params.ingest))[1]

    nights = []
    day_ingest = {1: ingest_day(1)}
    stale, stale_seconds = _timed(
        lambda: train_esmm(day_ingest[1][0], work / "a", params.model, scratch_cfg, verbose=0)
    )
    warm_model = stale.model_path
    for night in range(1, args.days):
        day_ingest[night + 1] = ingest_day(night + 1)
        test_dir = day_ingest[night + 1][0] / "test"
        record = {
            "night": night,
            "oracle": {k: oracle[night + 1][k] for k in ("ctr_auc", "ctcvr_auc")},
        }
        # (b) the latest `window` days, from scratch.
        window = list(range(max(1, night - args.window + 1), night + 1))
        b_ingest = work / "ingest-window" / f"night-{night:02d}"
        history = [(day_dir_name(d), day[d]) for d in window[:-1]]
        _, b_ingest_s = _timed(ingest_ali_ccp, day[night], b_ingest, params.ingest, history)
        b_out = work / "b" / f"night-{night:02d}"
        b, b_train_s = _timed(train_esmm, b_ingest, b_out, params.model, scratch_cfg, verbose=0)
        # (c) warm start from last night's (c) on the newest day (night 1: (a)'s model).
        if night == 1:
            c_path, c_train_s, c_ingest_s = stale.model_path, stale_seconds, day_ingest[1][1]
        else:
            source = read_source(warm_model, f"night-{night - 1}")
            c_out = work / "c" / f"night-{night:02d}"
            c, c_train_s = _timed(
                train_esmm,
                day_ingest[night][0],
                c_out,
                params.model,
                warm_cfg,
                verbose=0,
                warm_start=WarmStart(source, args.retire_after),
            )
            c_path, c_ingest_s = c.model_path, day_ingest[night][1]
        warm_model = c_path
        record |= {
            "window_days": window,
            "a_stale": score(stale.model_path, test_dir),
            "b_window": score(b.model_path, test_dir),
            "c_warm": score(c_path, test_dir),
            "seconds": {
                "b_ingest": b_ingest_s,
                "b_train": b_train_s,
                "c_ingest": c_ingest_s,
                "c_train": c_train_s,
            },
            "b_epochs": len(json.loads((b_out / "history.json").read_text()).get("loss", [])),
            "load_average": os.getloadavg(),
        }
        nights.append(record)
        print(_night_line(record), flush=True)
    return {
        "args": vars(args),
        "synth_seconds": synth_seconds,
        "model": params.model.model_dump(mode="json"),
        "train": params.train.model_dump(mode="json"),
        "nights": nights,
        "summary": summarise(nights),
    }


def _night_line(r: dict) -> str:
    parts = [f"night {r['night']}"]
    for key in ("a_stale", "b_window", "c_warm"):
        parts.append(f"{key} ctr {r[key]['ctr_auc']:.4f} ctcvr {r[key]['ctcvr_auc']:.4f}")
    s = r["seconds"]
    parts.append(f"train b {s['b_train']:.0f} s c {s['c_train']:.0f} s")
    return " | ".join(parts)


def summarise(nights: list[dict]) -> dict:
    """Means over the nights the approaches differ (night 2 on: night 1's (c) is (a))."""
    later = [r for r in nights if r["night"] > 1] or nights

    def mean(f):
        return float(np.mean([f(r) for r in later]))

    out = {}
    for key in ("a_stale", "b_window", "c_warm"):
        for m in ("ctr_auc", "ctcvr_auc"):
            out[f"{key}_{m}"] = mean(lambda r, k=key, m=m: r[k][m])
            out[f"{key}_{m}_gap_to_oracle"] = mean(lambda r, k=key, m=m: r["oracle"][m] - r[k][m])
    out["c_minus_b_ctr_auc"] = out["c_warm_ctr_auc"] - out["b_window_ctr_auc"]
    out["c_minus_b_ctcvr_auc"] = out["c_warm_ctcvr_auc"] - out["b_window_ctcvr_auc"]
    out["b_train_seconds"] = mean(lambda r: r["seconds"]["b_train"])
    out["c_train_seconds"] = mean(lambda r: r["seconds"]["c_train"])
    out["c_over_b_train_time"] = out["c_train_seconds"] / out["b_train_seconds"]
    b_night = mean(lambda r: r["seconds"]["b_train"] + r["seconds"]["b_ingest"])
    c_night = mean(lambda r: r["seconds"]["c_train"] + r["seconds"]["c_ingest"])
    out["c_over_b_night_time"] = c_night / b_night
    out["target_met"] = bool(
        out["c_minus_b_ctr_auc"] >= -0.003
        and out["c_minus_b_ctcvr_auc"] >= -0.01
        and out["c_over_b_train_time"] <= 1 / 3
    )
    return out


def table(record: dict) -> str:
    """The markdown table of benchmarks/nightly.md: per night, each approach's AUCs on day
    d+1 (gap to the oracle in brackets) and the training seconds of (b) and (c)."""
    lines = [
        "| night | oracle CTR / CTCVR | (a) stale | (b) window | (c) warm | train (b) s | train (c) s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["nights"]:
        cells = [f"{r['night']}", f"{r['oracle']['ctr_auc']:.4f} / {r['oracle']['ctcvr_auc']:.4f}"]
        for key in ("a_stale", "b_window", "c_warm"):
            cells.append(f"{r[key]['ctr_auc']:.4f} / {r[key]['ctcvr_auc']:.4f}")
        cells += [f"{r['seconds']['b_train']:.0f}", f"{r['seconds']['c_train']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(record: dict, path: Path) -> None:
    """Gap to the oracle per night (CTR, CTCVR) and training seconds per night."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nights = record["nights"]
    x = [r["night"] for r in nights]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    labels = {"a_stale": "(a) stale day-1", "b_window": "(b) window, scratch", "c_warm": "(c) warm"}
    for ax, m in zip(axes[:2], ("ctr_auc", "ctcvr_auc"), strict=True):
        for key, label in labels.items():
            ax.plot(x, [r["oracle"][m] - r[key][m] for r in nights], marker="o", label=label)
        ax.set_title(f"oracle - model, {m} on day d+1")
        ax.set_xlabel("night d")
        ax.grid(alpha=0.3)
    axes[0].legend()
    width = 0.4
    axes[2].bar(
        [n - width / 2 for n in x], [r["seconds"]["b_train"] for r in nights], width, label="(b)"
    )
    axes[2].bar(
        [n + width / 2 for n in x], [r["seconds"]["c_train"] for r in nights], width, label="(c)"
    )
    axes[2].set_title("training wall time per night (s)")
    axes[2].set_xlabel("night d")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=8, help="days in the series (nights: days-1)")
    parser.add_argument("--train", type=int, default=900_000, help="train impressions per day")
    parser.add_argument("--test", type=int, default=100_000, help="test impressions per day")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--window", type=int, default=3, help="(b): days trained on")
    parser.add_argument("--epochs-scratch", type=int, default=2, help="(a), (b): epochs")
    parser.add_argument("--epochs-warm", type=int, default=1, help="(c): epochs")
    parser.add_argument("--retire-after", type=int, default=0, help="(c): retire ids (0: never)")
    parser.add_argument("--work", type=Path, default=None, help="keep the data here")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    from benchmarks.machine import machine_info, write_record

    load_before = os.getloadavg()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        record = run(args, args.work)
    else:
        with tempfile.TemporaryDirectory(prefix="esmm-nightly-") as tmp:
            record = run(args, Path(tmp))
    record["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in record["args"].items()}
    record["machine"] = machine_info() | {"load_average_before": load_before}
    path = write_record(args.out, "nightly", record)
    plot(record, path.with_suffix(".png"))
    print(table(record))
    print(json.dumps(record["summary"], indent=2))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
