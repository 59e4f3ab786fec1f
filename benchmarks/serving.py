"""Serving latency and throughput over HTTP on loopback: candidate requests against record
requests with the same candidates, concurrency, and fuzzing under load.

Generates raw data (`aliccp.synth`, realistic profile by default: about 500 user-side
entries per context), ingests it for vocabularies and request contents, builds the
`params.yaml` model (weights do not change latency, so it is not trained), registers it in a
scratch SQLite store as `esmm@champion`, starts `esmm serve` on 127.0.0.1 and measures, with
the bounded load generator of `benchmarks/serving_load.py` (a fixed number of requests and
a time limit each):

1. one client, 100 candidates per request: the candidate form (one context + 100
   candidates) against the record form (100 whole records: that context with each
   candidate), the same candidates, in the same run; their latency ratio;
2. one client, 1,000 candidates per request (candidate form);
3. 4 concurrent clients, 100-candidate requests: candidates/s and latency;
4. fuzzing: 10,000 seeded malformed, oversized and valid requests from 2 clients; every
   answer's status by kind, the valid requests' latency during it and (1.) again after
   it, and the server's RSS before and after;
5. the model alone in process on the same 100-candidate inputs (what HTTP and parsing add).

    python -m benchmarks.serving                       # ~5 min on 2 cores
    python -m benchmarks.serving --markdown            # the table rows, from benchmarks/results/

Writes a JSON record (machine, date, load averages before and after, commit, targets met)
to benchmarks/results/ (`serving-candidates-<profile>-<date>.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.machine import machine_info, write_record
from benchmarks.serving_load import bounded_load, fuzz_bodies

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TARGETS = {  # issue 25
    "candidates_100_p50_ms": 10.0,
    "candidates_100_p99_ms": 30.0,
    "candidates_1000_p50_ms": 40.0,
    "concurrent_4_candidates_per_s": 10_000.0,
    "concurrent_4_p99_ms": 60.0,
}


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {
        "n": len(ms),
        "p50_ms": round(float(np.median(ms)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return proc.stdout.strip()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(args: argparse.Namespace, work: Path) -> tuple[str, list[dict]]:
    """Data, an untrained params.yaml model registered as esmm@champion, and request records
    (user and impression fields) of the test split; the tracking URI and the records."""
    import mlflow

    from aliccp.synth import synthesize_ali_ccp
    from models.esmm import build_esmm
    from serving.pyfunc import log_serving_model
    from serving.records import table_to_records
    from tasks.config import IngestConfig, load_params
    from tasks.ingest import ingest_ali_ccp, load_vocabularies
    from tasks.inputs import SplitReader
    from tasks.tracking import mlflow_client, mlflow_uris

    params = load_params(args.params)
    synthesize_ali_ccp(work / "raw", args.train, args.test, args.seed, profile=args.profile)
    ingest_ali_ccp(work / "raw", work / "ingest", IngestConfig(min_count=params.ingest.min_count))
    model = build_esmm(params.model, load_vocabularies(work / "ingest" / "vocab.parquet"))
    model.save(work / "model.keras")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with mlflow_uris(uri):
        experiment = mlflow.create_experiment("bench", artifact_location=str(work / "mlruns"))
        with mlflow.start_run(experiment_id=experiment):
            info = log_serving_model(work / "model.keras", registered_model_name="esmm")
    mlflow_client(uri).set_registered_model_alias("esmm", "champion", info.registered_model_version)

    reader = SplitReader(work / "ingest" / "test")
    records: list[dict] = []
    for table in reader.tables(4096):
        common, rows = reader.contexts(table)
        contexts = common.take(rows)
        for name in contexts.column_names:
            if name.startswith(("ids_", "wts_")):
                table = table.append_column(name, contexts[name])
        records += table_to_records(table)
        if len(records) >= args.candidates_max:
            break
    return uri, records


def _requests(records: list[dict], n: int) -> tuple[dict, list[dict]]:
    """The candidate request for `n` candidates (the context of median size: as many user-side
    entries as a typical user has) and the equivalent records (that context joined to each
    candidate)."""
    from models.features import COMMON_FIELDS

    sizes = np.array([sum(len(v) for f, v in r.items() if f in COMMON_FIELDS) for r in records])
    typical = records[int(np.argmin(np.abs(sizes - np.median(sizes))))]
    context = {f: v for f, v in typical.items() if f in COMMON_FIELDS}
    candidates = [{f: v for f, v in r.items() if f not in COMMON_FIELDS} for r in records[:n]]
    return {"context": context, "candidates": candidates}, [{**context, **c} for c in candidates]


def _start_server(work: Path, uri: str, port: int, workers: int) -> subprocess.Popen:
    (work / "params.yaml").write_text(yaml.safe_dump({"register": {"tracking_uri": uri}}))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
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


def _rss_mib(pid: int) -> float:
    """Resident memory of the server: its process and, with --workers, its worker processes."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    return round(sum(p.memory_info().rss for p in procs) / 2**20, 1)


def _timed(url: str, body: bytes, n: int, clients: int = 1, warmup: int = 10) -> dict[str, Any]:
    """`warmup` untimed requests, then `n` timed ones (time limit 300 s); all must be 200."""
    bounded_load(url, [(body, "valid")], clients=clients, max_requests=warmup, time_limit=120)
    load = bounded_load(url, [(body, "valid")], clients=clients, max_requests=n, time_limit=300)
    failed = [a.status for a in load.answers if a.status != 200]
    if failed:
        raise SystemExit(f"{len(failed)} requests failed: {sorted(set(failed))}")
    return {
        **_percentiles([a.seconds for a in load.answers]),
        "clients": clients,
        "requests_per_s": round(len(load.answers) / load.seconds, 1),
        "body_bytes": len(body),
    }


def _fuzz(url: str, pid: int, request: dict, n: int) -> dict[str, Any]:
    from tasks.config import ServeConfig

    limits = ServeConfig()
    bodies = fuzz_bodies(request, n, 11, limits.max_candidates, limits.max_body_bytes)
    rss_before = _rss_mib(pid)
    # Two halves, the RSS after each: growth that stops (allocator pools filling up) against
    # growth that goes on (a leak).
    first = bounded_load(url, bodies[: n // 2], clients=2, max_requests=n // 2, time_limit=300)
    rss_middle = _rss_mib(pid)
    second = bounded_load(url, bodies[n // 2 :], clients=2, max_requests=n - n // 2, time_limit=300)
    answers = first.answers + second.answers
    by_kind: dict[str, dict[str, int]] = {}
    for a in answers:
        counts = by_kind.setdefault(a.kind, {})
        counts[str(a.status)] = counts.get(str(a.status), 0) + 1
    valid = [a.seconds for a in answers if a.kind == "valid" and a.status == 200]
    return {
        "requests": len(answers),
        "seconds": round(first.seconds + second.seconds, 1),
        "status_by_kind": by_kind,
        "server_errors_5xx": sum(a.status >= 500 for a in answers),
        "valid_latency_during_fuzzing": _percentiles(valid),
        "rss_mib_before": rss_before,
        "rss_mib_middle": rss_middle,
        "rss_mib_after": _rss_mib(pid),
    }


def _in_process(request: dict, uri: str, n: int = 200) -> dict[str, float]:
    from serving.candidates import candidates_to_inputs
    from serving.pyfunc import load_keras_model
    from tasks.tracking import mlflow_uris

    with mlflow_uris(uri):
        model = load_keras_model("models:/esmm@champion")
    times = []
    for i in range(n + 10):
        start = time.perf_counter()
        model.predict_batch(candidates_to_inputs(request["context"], request["candidates"]))
        if i >= 10:
            times.append(time.perf_counter() - start)
    return _percentiles(times)


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="esmm-serving-bench-"))
    print(f"work folder {work}", flush=True)
    uri, records = _build(args, work)
    req100, records100 = _requests(records, 100)
    req1000, _ = _requests(records, args.candidates_max)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(work, uri, port, args.workers)
    out: dict[str, Any] = {}
    try:
        out["server_startup_s"] = round(_wait_ready(proc, url, work / "server.log"), 1)
        out["rss_mib_after_start"] = _rss_mib(proc.pid)
        body100 = json.dumps(req100).encode()
        print("candidate form, 100 candidates, 1 client", flush=True)
        out["candidates_100"] = _timed(url, body100, args.requests)
        print("record form, the same 100 candidates, 1 client", flush=True)
        records_body = json.dumps({"dataframe_records": [{"features": r} for r in records100]})
        out["records_100"] = _timed(url, records_body.encode(), args.requests // 3)
        print(f"candidate form, {args.candidates_max} candidates, 1 client", flush=True)
        out["candidates_1000"] = _timed(url, json.dumps(req1000).encode(), args.requests // 2)
        print("candidate form, 100 candidates, 4 clients", flush=True)
        out["concurrent_4"] = _timed(url, body100, args.requests * 4, clients=4)
        print(f"fuzzing: {args.fuzz} requests, 2 clients", flush=True)
        out["fuzz"] = _fuzz(url, proc.pid, req100, args.fuzz)
        print("candidate form, 100 candidates, 1 client, after the fuzzing", flush=True)
        out["candidates_100_after_fuzz"] = _timed(url, body100, args.requests)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    out["in_process_candidates_100"] = _in_process(req100, uri)
    if not args.keep:
        shutil.rmtree(work)

    c100, r100, c1000, conc = (
        out["candidates_100"],
        out["records_100"],
        out["candidates_1000"],
        out["concurrent_4"],
    )
    conc["candidates_per_s"] = round(conc["requests_per_s"] * 100)
    measured = {
        "candidates_100_p50_ms": c100["p50_ms"],
        "candidates_100_p99_ms": c100["p99_ms"],
        "candidates_1000_p50_ms": c1000["p50_ms"],
        "concurrent_4_candidates_per_s": conc["candidates_per_s"],
        "concurrent_4_p99_ms": conc["p99_ms"],
    }
    met = {
        k: (v >= TARGETS[k] if k.endswith("_per_s") else v <= TARGETS[k])
        for k, v in measured.items()
    }
    context_entries = sum(len(v) for v in req100["context"].values())
    candidate_entries = np.mean([sum(len(v) for v in c.values()) for c in req100["candidates"]])
    dirty = _git("status", "--porcelain", "--", "serving", "models", "benchmarks/serving.py")
    return {
        "benchmark": "serving-candidates",
        "machine": machine_info(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted": dirty.splitlines() if dirty else [],
        "profile": args.profile,
        "data": {"train": args.train, "test": args.test, "seed": args.seed},
        "server": f"esmm serve (FastAPI on uvicorn, {args.workers} worker(s))",
        "workers": args.workers,
        "context_entries": context_entries,
        "candidate_entries_mean": round(float(candidate_entries), 1),
        **out,
        "record_over_candidate_p50_ratio": round(r100["p50_ms"] / c100["p50_ms"], 1),
        "targets": TARGETS,
        "measured": measured,
        "met": met,
    }


def markdown_rows(results: Path = RESULTS) -> str:
    rows = []
    for path in sorted(results.glob("serving-candidates-*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        c, rec, k, conc = (
            r["candidates_100"],
            r["records_100"],
            r["candidates_1000"],
            r["concurrent_4"],
        )
        rows.append(
            f"| {m['date'][:10]} | {m['cpu']} | {r['commit'][:7]} | {r.get('workers', 1)} "
            f"| {c['p50_ms']} / {c['p99_ms']} | {rec['p50_ms']} / {rec['p99_ms']} "
            f"({r['record_over_candidate_p50_ratio']}x) | {k['p50_ms']} / {k['p99_ms']} "
            f"| {conc['candidates_per_s']:,} / {conc['p99_ms']} "
            f"| {r['fuzz']['server_errors_5xx']} / {r['fuzz']['rss_mib_before']}"
            f"->{r['fuzz']['rss_mib_after']} MiB "
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
    parser.add_argument("--test", type=int, default=4_000, help="impressions for the requests")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--requests", type=int, default=300, help="timed 1-client requests")
    parser.add_argument("--candidates-max", type=int, default=1000, help="the large request")
    parser.add_argument("--fuzz", type=int, default=10_000, help="fuzzing requests")
    parser.add_argument("--workers", type=int, default=1, help="server processes (esmm serve)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the scratch work folder")
    parser.add_argument("--markdown", action="store_true", help="print the table rows")
    args = parser.parse_args()
    if args.markdown:
        print(markdown_rows(args.out))
        return
    record = run(args)
    tag = f"workers{args.workers}" if args.workers > 1 else ""
    path = write_record(args.out, f"serving-candidates-{args.profile}", record, tag)
    print(json.dumps({k: record[k] for k in ("measured", "met")}, indent=1))
    print(f"record/candidate p50 ratio: {record['record_over_candidate_p50_ratio']}x")
    print(f"fuzz: {json.dumps(record['fuzz'])}")
    print(
        f"load average before {record['load_average_before']}, after {record['load_average_after']}"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
