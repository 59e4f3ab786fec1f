"""Past one machine, measured on one: the overhead of the multi-machine paths on loopback.

Three comparisons, each in fresh processes on the same synthetic data:

- training samples/s: one worker process pinned to one core (`taskset -c 0`, plain Keras)
  against two `MultiWorkerMirroredStrategy` workers pinned to one core each (all-reduce
  over gRPC on loopback), steady state (the first steps, which trace the graph, excluded);
- validation (TFDV statistics of the train split, both tables) impressions/s: the
  DirectRunner in one in-memory process against the PortableRunner with Beam's Python job
  service and an external worker pool running 2 SDK workers;
- batch scoring impressions/s: the local scorer against `score_raw_beam` on the DirectRunner
  and on the same portable runner.

On 2 cores parity is the best to expect: what this shows is each path's overhead. Writes
benchmarks/results/scale-<date>.json and prints a summary; the page is benchmarks/scale.md.

    .venv/bin/python -m benchmarks.scale --impressions 200000
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.machine import machine_info, write_record

REPO = Path(__file__).resolve().parents[1]

_TRAIN_CHILD = """
import json, sys, time
from pathlib import Path
import keras
from models.config import ModelConfig
from tasks.config import TrainConfig
from tasks.train import train_esmm

SKIP = 10  # steps that trace the graph and warm up, left out of the rate

class Clock(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch == SKIP - 1:
            self.start, self.first = time.perf_counter(), batch
        self.last, self.end = batch, time.perf_counter()

clock = Clock()
cfg = TrainConfig(epochs=1, early_stopping=None, recalibrate=False, distribute=sys.argv[3])
result = train_esmm(Path(sys.argv[1]), Path(sys.argv[2]), ModelConfig(), cfg, verbose=0,
                    callbacks=[clock])
print(json.dumps({"steps": clock.last - clock.first, "seconds": clock.end - clock.start,
                  "batch_size": cfg.batch_size, "chief": result.chief}))
"""

_VALIDATE_CHILD = """
import json, sys, time
from pathlib import Path
from tasks.config import ValidateConfig
from tasks.validate_stats import generate_statistics
ingest, out, runner, options = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
tables = {n: ingest / "train" / f"{n}.parquet" for n in ("impressions", "common")}
start = time.perf_counter()
generate_statistics(tables, out, ValidateConfig(beam_runner=runner, beam_options=options))
print(json.dumps({"seconds": time.perf_counter() - start}))
"""

_SCORE_CHILD = """
import json, sys, time
from pathlib import Path
raw, out, model, options = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
start = time.perf_counter()
if options is None:
    import keras
    import models.esmm
    from serving.score import score_raw
    report = score_raw(raw, out, keras.models.load_model(model, compile=False), progress=False)
else:
    from serving.beam_score import score_raw_beam
    report = score_raw_beam(raw, out, model, options)
print(json.dumps({"seconds": time.perf_counter() - start, "rows": report.rows_scored}))
"""

_IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _env() -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3", "PATH": path}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(code: str, *args: str, pin: str | None = None, env: dict | None = None):
    """Start a child Python process (pinned to CPUs `pin` with taskset)."""
    cmd = [sys.executable, "-c", code, *args]
    if pin is not None:
        cmd = ["taskset", "-c", pin, *cmd]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{proc.args[:4]} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _prepare(work: Path, impressions: int, test: int) -> tuple[Path, Path]:
    from aliccp.synth import synthesize_ali_ccp
    from tasks.config import IngestConfig
    from tasks.ingest import ingest_ali_ccp

    raw, ingest = work / "data", work / "ingest"
    if not (ingest / "report.json").is_file():
        if not raw.is_dir():
            synthesize_ali_ccp(raw, impressions, test, 1)
        ingest_ali_ccp(raw, ingest, IngestConfig())
    return raw, ingest


def _train(ingest: Path, work: Path) -> dict:
    """Samples/s of one worker on one core, and of two workers on a core each."""
    one = _result(_child(_TRAIN_CHILD, str(ingest), str(work / "train-1"), "none", pin="0"))
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    procs = []
    for i in range(2):
        from tasks.distribute import tf_config

        env = {**_env(), "TF_CONFIG": tf_config(workers, i)}
        out = str(work / "train-2")
        procs.append(_child(_TRAIN_CHILD, str(ingest), out, "multi_worker", pin=str(i), env=env))
    two = [_result(p) for p in procs]
    rate_one = one["steps"] * one["batch_size"] / one["seconds"]
    chief = next(r for r in two if r["chief"])
    rate_two = 2 * chief["steps"] * chief["batch_size"] / chief["seconds"]
    return {
        "one_worker": {**one, "samples_per_second": rate_one},
        "two_workers": {"workers": two, "samples_per_second": rate_two},
        "ratio_two_to_one": rate_two / rate_one,
    }


class _BeamServices:
    """Beam's Python job service and an external worker pool on loopback."""

    def __enter__(self) -> list[str]:
        self.job, self.pool = _free_port(), _free_port()
        mods = (
            ("apache_beam.runners.portability.local_job_service_main", "--port", self.job),
            ("apache_beam.runners.worker.worker_pool_main", "--service_port", self.pool),
        )
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-m", mod, flag, str(port)],
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for mod, flag, port in mods
        ]
        for port in (self.job, self.pool):
            while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
                time.sleep(0.2)
        return [
            f"--job_endpoint=localhost:{self.job}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{self.pool}",
            "--direct_num_workers=2",  # SDK workers the job service asks the pool for
        ]

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.terminate()
            proc.wait()


def _validate(ingest: Path, work: Path, portable: list[str], rows: int) -> dict:
    out = {}
    for name, runner, options in (
        ("direct_in_memory", "DirectRunner", _IN_MEMORY),
        ("portable_2_external_workers", "PortableRunner", portable),
    ):
        args = (str(ingest), str(work / f"stats-{name}"), runner, json.dumps(options))
        res = _result(_child(_VALIDATE_CHILD, *args))
        out[name] = {**res, "options": options, "impressions_per_second": rows / res["seconds"]}
    out["ratio_portable_to_direct"] = (
        out["portable_2_external_workers"]["impressions_per_second"]
        / out["direct_in_memory"]["impressions_per_second"]
    )
    return out


def _score(raw: Path, model: Path, work: Path, portable: list[str], pair: str) -> dict:
    score_dir = work / f"score-raw-{pair}"
    score_dir.mkdir(exist_ok=True)
    for name in (f"sample_skeleton_{pair}.csv", f"common_features_{pair}.csv"):
        if not (score_dir / name).exists():
            (score_dir / name).symlink_to(raw / name)
    out = {}
    for name, options in (
        ("local", None),
        ("beam_direct_in_memory", _IN_MEMORY),
        ("beam_portable_2_external_workers", ["--runner=PortableRunner", *portable]),
    ):
        args = (str(score_dir), str(work / f"{name}.parquet"), str(model), json.dumps(options))
        res = _result(_child(_SCORE_CHILD, *args))
        out[name] = {
            **res,
            "options": options,
            "impressions_per_second": res["rows"] / res["seconds"],
        }
    for name in ("beam_direct_in_memory", "beam_portable_2_external_workers"):
        out[f"ratio_{name}_to_local"] = (
            out[name]["impressions_per_second"] / out["local"]["impressions_per_second"]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--impressions", type=int, default=200_000, help="train impressions")
    parser.add_argument("--test-impressions", type=int, default=50_000, help="scored impressions")
    parser.add_argument(
        "--parts", default="training,validation,scoring", help="comma-separated parts to run"
    )
    parser.add_argument(
        "--score-pair", default="test", choices=("test", "train"), help="raw file pair scored"
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "esmm-scale")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    work = args.work / f"{args.impressions}-{args.test_impressions}"
    raw, ingest = _prepare(work, args.impressions, args.test_impressions)
    report = json.loads((ingest / "report.json").read_text())
    train_rows = report["split_rows"]["train"]
    load = {"before": os.getloadavg()}
    parts = set(args.parts.split(","))
    training = validation = scoring = None
    if "training" in parts or not (work / "train-1" / "model.keras").is_file():
        training = _train(ingest, work)  # its one-worker model is the one scored
        print(f"training: {json.dumps(training, indent=1)}", flush=True)
    with _BeamServices() as portable:
        if "validation" in parts:
            validation = _validate(ingest, work, portable, train_rows)
            print(f"validation: {json.dumps(validation, indent=1)}", flush=True)
        if "scoring" in parts:
            model = work / "train-1" / "model.keras"
            scoring = _score(raw, model, work, portable, args.score_pair)
            print(f"scoring: {json.dumps(scoring, indent=1)}", flush=True)
    load["after"] = os.getloadavg()
    record = {
        "benchmark": "scale",
        "impressions": args.impressions,
        "train_rows": train_rows,
        "test_impressions": args.test_impressions,
        "score_pair": args.score_pair,
        "training": training,
        "validation": validation,
        "scoring": scoring,
        "load_average": load,
        "note": "2 cores shared with other jobs; all processes on loopback",
        "machine": machine_info(),
    }
    tag = "" if parts == {"training", "validation", "scoring"} else "-".join(sorted(parts))
    print(
        f"wrote {write_record(args.out, 'scale', record, tag=tag + ('-' + args.score_pair if 'scoring' in parts and args.score_pair != 'test' else ''))}"
    )


if __name__ == "__main__":
    main()
