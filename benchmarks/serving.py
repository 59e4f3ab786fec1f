"""Serving latency: the served model over HTTP on loopback, single records and batches of 100.

Generates raw data (`aliccp.synth`), ingests it for vocabularies and realistic request
records (test split, user and impression fields), builds the `params.yaml` model (weights do
not change latency, so it is not trained), logs it with `serving.pyfunc.log_serving_model`
to a scratch SQLite store as `esmm@champion`, starts `esmm serve` (a real `mlflow models
serve --env-manager local`) on 127.0.0.1 and times sequential requests from one client on a
keep-alive connection: client-side wall time per request, from sending the JSON body to
having parsed the JSON answer. Requests use `{"dataframe_records": [...]}`; batches are also
timed as `{"inputs": [...]}`, which MLflow deep-copies while parsing (slower). The same
payloads through the pyfunc model in process give the share of the latency that is HTTP and
MLflow's request handling.

    python -m benchmarks.serving                       # realistic profile, 300 singles, 60 batches
    python -m benchmarks.serving --profile default
    python -m benchmarks.serving --markdown            # the table rows, from benchmarks/results/

Writes a JSON record (machine, date, load averages before and after, commit) to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.machine import machine_info, write_record

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "n": len(ms),
        "median_ms": round(float(np.median(ms)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "min_ms": round(float(ms.min()), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return proc.stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(work: Path, tracking_uri: str, port: int) -> subprocess.Popen:
    (work / "params.yaml").write_text(yaml.safe_dump({"register": {"tracking_uri": tracking_uri}}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--port", str(port)],
        cwd=work,
        env=env,
        stdout=open(work / "server.log", "w"),  # noqa: SIM115  (lives as long as the server)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> float:
    import requests

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"no /ping answer in {timeout} s:\n{log.read_text()}")


def _time_requests(session, url: str, bodies: list[str], warmup: int) -> list[float]:
    times = []
    for i, body in enumerate(bodies):
        start = time.perf_counter()
        response = session.post(
            f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        response.json()
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise SystemExit(f"request failed {response.status_code}: {response.text[:500]}")
        if i >= warmup:
            times.append(elapsed)
    return times


def _time_in_process(model, payloads: list[list[dict]], warmup: int) -> list[float]:
    times = []
    for i, payload in enumerate(payloads):
        start = time.perf_counter()
        model.predict(payload)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


# The project, MLflow and requests are imported inside the functions below: aliccp.synth
# (scikit-learn), models.esmm (Keras) and MLflow take seconds to import, and `--markdown`
# needs none of them.


def _build_model(args: argparse.Namespace, params: Any, work: Path) -> Path:
    """Raw data, its ingested vocabularies and test split, and an untrained model file."""
    from aliccp.synth import synthesize_ali_ccp
    from models.esmm import build_esmm
    from tasks.config import IngestConfig
    from tasks.ingest import ingest_ali_ccp, load_vocabularies

    synthesize_ali_ccp(work / "raw", args.train, args.test, args.seed, profile=args.profile)
    ingest_ali_ccp(work / "raw", work / "ingest", IngestConfig(min_count=params.ingest.min_count))
    model = build_esmm(params.model, load_vocabularies(work / "ingest" / "vocab.parquet"))
    model.save(work / "model.keras")
    return work / "model.keras"


def _request_records(split_dir: Path, n_records: int) -> list[dict]:
    """At least `n_records` request records (user and impression fields) of an ingested split."""
    from serving.records import table_to_records
    from tasks.inputs import SplitReader

    reader = SplitReader(split_dir)
    records = []
    for table in reader.tables(4096):
        common, rows = reader.contexts(table)
        contexts = common.take(rows)  # one user-side row per impression
        joined = table
        for name in contexts.column_names:
            if name.startswith(("ids_", "wts_")):
                joined = joined.append_column(name, contexts[name])
        records += table_to_records(joined)
        if len(records) >= n_records:
            break
    return records


def _register_champion(work: Path, model_path: Path) -> str:
    """Log the served model to a scratch SQLite store as esmm@champion; its tracking URI."""
    import mlflow
    from mlflow import MlflowClient

    from serving.pyfunc import log_serving_model

    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("bench", artifact_location=str(work / "mlruns"))
    with mlflow.start_run(experiment_id=experiment):
        info = log_serving_model(model_path, registered_model_name="esmm")
    MlflowClient(tracking_uri).set_registered_model_alias(
        "esmm", "champion", info.registered_model_version
    )
    return tracking_uri


def _time_server(
    work: Path, tracking_uri: str, singles: list, batches: list, warmup: int
) -> tuple[float, list[float], list[float], list[float]]:
    """Start `esmm serve`; its start-up time and the times of the singles, the batches and
    the batches in the `inputs` form."""
    import requests

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(work, tracking_uri, port)
    try:
        startup = _wait_ready(proc, url, work / "server.log")
        print(f"server ready after {startup:.1f} s", flush=True)
        with requests.Session() as session:
            single_s = _time_requests(
                session, url, [json.dumps({"dataframe_records": p}) for p in singles], warmup
            )
            batch_s = _time_requests(
                session, url, [json.dumps({"dataframe_records": p}) for p in batches], warmup
            )
            batch_inputs_s = _time_requests(
                session, url, [json.dumps({"inputs": p}) for p in batches], warmup
            )
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return startup, single_s, batch_s, batch_inputs_s


def run(args: argparse.Namespace) -> dict:
    import mlflow

    from tasks.config import load_params

    load_before = os.getloadavg()
    params = load_params(args.params)
    work = Path(tempfile.mkdtemp(prefix="esmm-serving-bench-"))
    print(f"work folder {work}", flush=True)
    model_path = _build_model(args, params, work)

    n_records = args.singles + args.batches * args.batch_size + 2 * args.warmup * args.batch_size
    records = _request_records(work / "ingest" / "test", n_records)
    entries = [sum(len(v) for v in r.values()) for r in records]
    behaviour = [sum(len(pairs) for f, pairs in r.items() if f.endswith("_14")) for r in records]

    tracking_uri = _register_champion(work, model_path)

    singles = [[{"features": records[i % len(records)]}] for i in range(args.warmup + args.singles)]
    batches = []
    for b in range(args.warmup + args.batches):
        start = (b * args.batch_size) % max(1, len(records) - args.batch_size)
        batches.append([{"features": r} for r in records[start : start + args.batch_size]])

    startup, single_s, batch_s, batch_inputs_s = _time_server(
        work, tracking_uri, singles, batches, args.warmup
    )

    pyfunc = mlflow.pyfunc.load_model("models:/esmm@champion")
    local_single = _time_in_process(pyfunc, singles, args.warmup)
    local_batch = _time_in_process(pyfunc, batches, args.warmup)
    if not args.keep:
        shutil.rmtree(work)

    dirty = _git(
        "status",
        "--porcelain",
        "--",
        "tasks",
        "models",
        "flows",
        "serving",
        "benchmarks/serving.py",
    )
    return {
        "benchmark": "serving",
        "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted": dirty.splitlines() if dirty else [],
        "profile": args.profile,
        "data": {"train": args.train, "test": args.test, "seed": args.seed},
        "model": params.model.model_dump(mode="json"),
        "record_entries": {
            "mean": round(float(np.mean(entries)), 1),
            "median": float(np.median(entries)),
            "max": int(np.max(entries)),
            "behaviour_mean": round(float(np.mean(behaviour)), 1),
        },
        "server": {"command": "esmm serve (mlflow models serve --env-manager local, 1 worker)"},
        "server_startup_s": round(startup, 1),
        "warmup_requests": args.warmup,
        "http_single": _percentiles(single_s),
        f"http_batch_{args.batch_size}": _percentiles(batch_s),
        f"http_batch_{args.batch_size}_inputs_format": _percentiles(batch_inputs_s),
        "in_process_pyfunc_single": _percentiles(local_single),
        f"in_process_pyfunc_batch_{args.batch_size}": _percentiles(local_batch),
        "batch_records_per_s": round(args.batch_size / statistics.median(batch_s)),
    }


def markdown_rows(results: Path = RESULTS) -> str:
    rows = []
    for path in sorted(results.glob("serving-*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        missing = {"median_ms": "n/a", "p99_ms": "n/a"}
        single, inputs = r["http_single"], r["http_batch_100_inputs_format"]
        batch = r.get("http_batch_100", missing)  # absent from runs that sent only `inputs`
        local_single, local_batch = r["in_process_pyfunc_single"], r["in_process_pyfunc_batch_100"]
        rows.append(
            f"| {m['date'][:10]} | {m['cores']} cores, {m['cpu'].split()[0]} "
            f"{' '.join(m['cpu'].split()[1:2])} | {r['commit'][:7]} | {r['profile']} "
            f"({r['record_entries']['mean']:.0f} entries/record) "
            f"| {single['median_ms']} / {single['p99_ms']} "
            f"| {batch['median_ms']} / {batch['p99_ms']} "
            f"| {inputs['median_ms']} / {inputs['p99_ms']} "
            f"| {local_single['median_ms']} / {local_batch['median_ms']} "
            f"| {r['batch_records_per_s']:,} "
            f"| {' '.join(str(x) for x in r['load_average_before'])} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", default="realistic", help="aliccp.synth data profile")
    parser.add_argument("--train", type=int, default=20_000, help="impressions for vocabularies")
    parser.add_argument("--test", type=int, default=8_000, help="impressions to draw requests from")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--singles", type=int, default=300, help="timed single-record requests")
    parser.add_argument("--batches", type=int, default=60, help="timed batch requests")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests of each kind")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the scratch work folder")
    parser.add_argument("--markdown", action="store_true", help="print the README table rows")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_rows(args.out))
        return
    record = run(args)
    path = write_record(args.out, f"serving-{args.profile}", record)
    for key in (
        "http_single",
        f"http_batch_{args.batch_size}",
        f"http_batch_{args.batch_size}_inputs_format",
        "in_process_pyfunc_single",
        f"in_process_pyfunc_batch_{args.batch_size}",
    ):
        p = record[key]
        print(
            f"{key:<32} median {p['median_ms']:8.2f} ms   p99 {p['p99_ms']:8.2f} ms   (n={p['n']})"
        )
    print(
        f"load average before {record['load_average_before']}, after {record['load_average_after']}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
