"""Training speed: samples/s of the paper preset, real input against in-memory tensors.

Generates (or reuses) `--train` impressions of `--profile` (default: default), ingests
them, and fits the model of `--preset` (default: paper) on them for a fixed number of
steps, timing the steps after a warm-up, in four settings:

- every entry and weight, read and batched from the Parquet files by the real pipeline
  (`tasks.inputs.make_dataset`, per-context batches);
- the same batches taken once into memory (`Dataset.take(k).cache().repeat()`): the
  step time with an input pipeline that costs nothing;
- the same two with only the first id of each field (`benchmarks.first_id`).

Also reported: dense FLOPs per training sample (forward + backward = 3x the forward
multiply-adds of the towers, with the user part of the first layer counted once per
context as computed, and as a per-impression model would compute it), the GFLOP/s this
achieves, and a plain float32 matmul of the first layer's shape, (batch, inputs) x
(inputs, units), timed in the same process. Writes a JSON record to benchmarks/results/.

    python -m benchmarks.train                        # 300k impressions, 150 timed steps
    python -m benchmarks.train --train 1000000 --steps 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare(work: Path, n_train: int, seed: int, profile: str = "default") -> Path:
    """Raw data and its ingestion, cached under `work` by profile, size and seed."""
    from aliccp.synth import synthesize_ali_ccp
    from tasks.config import IngestConfig
    from tasks.ingest import ingest_ali_ccp

    root = work / f"{profile}-{n_train}-{seed}"
    ingest = root / "ingest"
    if not (ingest / "vocab.parquet").is_file():
        synthesize_ali_ccp(root / "raw", n_train, max(n_train // 10, 1000), seed, profile=profile)
        ingest_ali_ccp(root / "raw", ingest, IngestConfig())
    return ingest


def dense_flops(model, model_cfg, batch_features) -> dict[str, float]:
    """Multiply-add FLOPs per training sample of the towers (3x forward for fwd + bwd).

    The first layer's user (per context) and item (per impression) input widths are read
    from the built model (`ctr_dense_0`), so embeddings, weight features and dots count
    as the model has them."""
    from models.features import CROSSES

    d = model_cfg.embedding_dim
    first = model.get_layer("ctr_dense_0")
    user_dim = first.user_dim
    item_dim = int(first.kernel.shape[0]) - user_dim
    dots = 2 * d * len(CROSSES) if model_cfg.interactions else 0  # user x item dots
    dots += 2 * d if model_cfg.interest_match else 0  # products and their sum
    batch = len(batch_features["context_row"])
    contexts = len(batch_features["ids_101"])
    per_context, per_impression = 0.0, 0.0
    for tower in (model_cfg.ctr_tower, model_cfg.cvr_tower):
        units = [*tower.units, 1]
        rest = sum(2 * a * b for a, b in zip(units[:-1], units[1:], strict=True))
        ours = 2 * item_dim * units[0] + 2 * user_dim * units[0] * contexts / batch + rest
        plain = 2 * (user_dim + item_dim) * units[0] + rest
        per_context += 3 * ours
        per_impression += 3 * plain
    per_context += 3 * dots  # computed once, shared by both towers
    per_impression += 3 * dots
    return {
        "flops_per_sample": per_context,
        "flops_per_sample_per_impression_model": per_impression,
        "impressions_per_context_in_batch": batch / contexts,
    }


def matmul_gflops(batch: int, inputs: int, units: int, seconds: float = 3.0) -> float:
    """Achieved GFLOP/s of a plain float32 (batch, inputs) x (inputs, units) matmul."""
    import tensorflow as tf

    a = tf.random.uniform((batch, inputs))
    b = tf.random.uniform((inputs, units))
    step = tf.function(lambda: tf.reduce_sum(tf.matmul(a, b)))
    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return 2 * batch * inputs * units * n / (time.perf_counter() - start) / 1e9


def time_fit(model, dataset, steps: int, warmup: int, repeats: int) -> list[float]:
    """Seconds per training step in `repeats` segments of `steps` steps, after `warmup`.

    Callbacks run after each call into TF (`train.steps_per_execution` steps), so each
    segment runs from the first call end at or after its start to the first at or after
    its end, and is divided by the steps actually between them."""
    import keras

    from tasks.checkpoints import steps_done

    total = warmup + steps * repeats
    marks: list[tuple[int, float]] = []  # (steps done, time)

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.append((steps_done(self, batch), time.perf_counter()))

    model.fit(
        dataset,
        steps_per_epoch=total,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[Clock()],
    )
    bounds = [warmup + k * steps for k in range(repeats + 1)]
    points = [next(m for m in marks if m[0] >= b) for b in bounds]
    return [
        (t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points[:-1], points[1:], strict=True)
    ]


def _arguments() -> argparse.Namespace:
    from aliccp.synth import PROFILES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", type=int, default=300_000, help="train impressions")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--profile", default="default", choices=sorted(PROFILES))
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--batch-size", type=int, help="default: train.batch_size")
    parser.add_argument("--steps", type=int, default=150, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed segments per setting (median reported)"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "esmm-bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="")
    parser.add_argument("--no-determinism", action="store_true", help="leave TF op determinism off")
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        help="training steps per call into TF (default: train.steps_per_execution)",
    )
    return parser.parse_args()


def _time_settings(args: argparse.Namespace, model_cfg, train_cfg, batch_size: int, ingest: Path):
    """Samples/s of the four settings (every entry or first id, real input or in memory)
    and each kind of input's FLOPs per sample; the results and the last model built."""
    import keras
    import numpy as np

    from benchmarks.first_id import FirstIdReader
    from tasks.ingest import load_vocabularies
    from tasks.inputs import SplitReader, make_dataset
    from tasks.train import compiled_model

    vocab = load_vocabularies(ingest / "vocab.parquet")
    results: dict[str, dict] = {}
    for first_id_only in (False, True):
        reader = (FirstIdReader if first_id_only else SplitReader)(ingest / "train")
        needed = args.warmup + args.steps * args.repeats
        if reader.num_batches(batch_size) < needed:
            raise SystemExit(f"--train too small: {reader.num_batches(batch_size)} batches")
        sample = reader.features(next(reader.tables(batch_size, seed=1)))
        for source in ("real_input", "in_memory"):
            keras.utils.set_random_seed(train_cfg.seed)
            model = compiled_model(model_cfg, train_cfg, vocab)
            ds = make_dataset(reader, batch_size, seed=1, variant=model_cfg.variant)
            if source == "in_memory":
                ds = ds.take(100).cache().repeat()
                for _ in ds.take(100):  # fill the cache before timing
                    pass
            segments = time_fit(model, ds, args.steps, args.warmup, args.repeats)
            step = float(np.median(segments))
            key = f"{'first_id' if first_id_only else 'all_entries'}/{source}"
            results[key] = {
                "seconds_per_step": round(step, 5),
                "samples_per_s": round(batch_size / step),
                "samples_per_s_segments": [round(batch_size / t) for t in segments],
            }
            print(f"{key:<26} {step * 1e3:7.1f} ms/step  {batch_size / step:9,.0f} samples/s")
        flops = dense_flops(model, model_cfg, sample)
        for source in ("real_input", "in_memory"):
            entry = results[f"{'first_id' if first_id_only else 'all_entries'}/{source}"]
            entry["gflops_per_s"] = round(
                flops["flops_per_sample"] * entry["samples_per_s"] / 1e9, 1
            )
        results["first_id" if first_id_only else "all_entries"] = flops
    return results, model


def _matmul_reference(model, model_cfg, batch_size: int) -> tuple[list[float], list[int]]:
    """GFLOP/s of three plain matmuls of the first layer's shape (printed with their
    median), and that shape (batch, inputs, units)."""
    import numpy as np

    first_units = model_cfg.ctr_tower.units[0]
    inputs = int(model.get_layer("ctr_dense_0").kernel.shape[0])  # the first layer's inputs
    matmuls = [matmul_gflops(batch_size, inputs, first_units) for _ in range(3)]
    matmul = float(np.median(matmuls))
    print(
        f"plain matmul ({batch_size} x {inputs}) x ({inputs} x {first_units}): {matmul:.1f} GFLOP/s"
    )
    return matmuls, [batch_size, inputs, first_units]


def main() -> None:
    """Time the four settings and the plain matmul, record and print the result."""
    args = _arguments()

    import numpy as np
    import tensorflow as tf

    from benchmarks.machine import machine_info, write_record
    from tasks.config import Params

    load_before = os.getloadavg()
    params = Params.model_validate({"preset": args.preset})
    model_cfg, train_cfg = params.model, params.train
    if args.steps_per_execution:
        train_cfg = train_cfg.model_copy(update={"steps_per_execution": args.steps_per_execution})
    batch_size = args.batch_size or train_cfg.batch_size
    ingest = prepare(args.work, args.train, args.seed, args.profile)
    deterministic = train_cfg.deterministic and not args.no_determinism
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    results, model = _time_settings(args, model_cfg, train_cfg, batch_size, ingest)
    matmuls, shape = _matmul_reference(model, model_cfg, batch_size)
    for key in ("all_entries", "first_id"):
        f = results[key]
        print(
            f"{key}: {f['flops_per_sample'] / 1e6:.2f} MFLOP/sample (per-impression model "
            f"{f['flops_per_sample_per_impression_model'] / 1e6:.2f}), "
            f"{f['impressions_per_context_in_batch']:.1f} impressions per context in a batch"
        )
    record = {
        "benchmark": "train",
        "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "train_impressions": args.train,
        "profile": args.profile,
        "preset": args.preset,
        "batch_size": batch_size,
        "timed_steps": args.steps,
        "deterministic": deterministic,
        "steps_per_execution": train_cfg.steps_per_execution,
        "results": results,
        "plain_matmul_first_layer_gflops_per_s": round(float(np.median(matmuls)), 1),
        "plain_matmul_runs_gflops_per_s": [round(x, 1) for x in matmuls],
        "plain_matmul_shape": shape,
        "model": model_cfg.model_dump(mode="json"),
    }
    path = write_record(args.out, f"train-{args.train}", record, args.tag)
    print(f"load average before {load_before}, after {os.getloadavg()}; wrote {path}")


if __name__ == "__main__":
    main()
