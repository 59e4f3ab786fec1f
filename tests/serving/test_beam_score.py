"""Beam beyond the DirectRunner: batch scoring as a Beam pipeline (RunInference) and TFDV
statistics, on the DirectRunner and on Beam's portable runner with Beam's own Python job
service and an external SDK worker pool on loopback (the path Flink and Spark job servers
take). Both live in this file so that one job service and one worker pool serve them all."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from aliccp.format import R_COLUMNS, R_ENTRY, R_UNKNOWN_KEY
from serving.beam_score import score_raw_beam
from serving.score import score_raw
from tasks.config import ValidateConfig

_IN_MEMORY = ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@pytest.fixture(scope="module")
def portable_options(tmp_path_factory) -> Iterator[list[str]]:
    """Beam's Python job service and one external worker pool on loopback (free ports chosen
    now), as PortableRunner flags; both processes stopped afterwards."""
    logs = tmp_path_factory.mktemp("beam-services")
    job_port, pool_port = _free_port(), _free_port()
    # The pool starts SDK workers as `python -c ...`: this environment's python first.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    commands = [
        [sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main"]
        + ["--port", str(job_port)],
        [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main"]
        + ["--service_port", str(pool_port)],
    ]
    procs = []
    try:
        for i, cmd in enumerate(commands):
            log = open(logs / f"service{i}.log", "w")  # noqa: SIM115
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
        for port, proc in zip((job_port, pool_port), procs, strict=True):
            _wait_for_port(port, proc)
        yield [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{pool_port}",
        ]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def raw_with_bad_lines(small_raw, tmp_path_factory) -> Path:
    """Two file pairs: the test pair, and a short pair with one bad line of each kind."""
    raw = tmp_path_factory.mktemp("beam-raw")
    for name in ("sample_skeleton_test.csv", "common_features_test.csv"):
        shutil.copy(small_raw / name, raw / name)
    shutil.copy(small_raw / "common_features_test.csv", raw / "common_features_x.csv")
    good = (small_raw / "sample_skeleton_test.csv").read_text().splitlines()[:30]
    fields = good[0].split(",")
    unknown_key = ",".join([fields[0] + "u", fields[1], fields[2], "f" * 32, *fields[4:]])
    nan_weight = good[1].rsplit("\x03", 1)[0] + "\x03nan"
    lines = [*good[:10], good[2][:15], *good[10:20], unknown_key, *good[20:], nan_weight]
    (raw / "sample_skeleton_x.csv").write_text("\n".join(lines) + "\n")
    return raw


@pytest.fixture(scope="module")
def local_scores(raw_with_bad_lines, keras_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-score") / "p.parquet"
    return score_raw(raw_with_bad_lines, out, keras_model, batch_size=500, progress=False)


def _assert_same_scoring(beam_report, local_report) -> None:
    """Same predictions file (columns, rows, order, values), bad-lines CSV and counts."""
    beam_frame = pd.read_parquet(beam_report.out_path)
    local_frame = pd.read_parquet(local_report.out_path)
    pd.testing.assert_frame_equal(beam_frame, local_frame)
    assert beam_report.bad_lines_path.read_text() == local_report.bad_lines_path.read_text()
    for key in ("rows_read", "rows_scored", "rows_not_scored", "bad_lines", "unknown_fields"):
        assert getattr(beam_report, key) == getattr(local_report, key), key

    def summary(report) -> str:
        text = report.summary().replace(str(report.bad_lines_path), "BAD")
        return text.replace(str(report.out_path), "OUT")

    assert summary(beam_report) == summary(local_report)


def test_beam_scoring_equals_local_scoring(
    raw_with_bad_lines, keras_model_path, local_scores, portable_options, tmp_path
):
    """`esmm score --beam-options`: the same predictions, bad lines and counts as the local
    scorer on the DirectRunner, and on the portable runner with the raw files and the model
    staged through Beam's filesystems (what remote workers read)."""
    assert local_scores.bad_lines == {R_COLUMNS: 1, R_UNKNOWN_KEY: 1, R_ENTRY: 1}
    direct = score_raw_beam(
        raw_with_bad_lines,
        tmp_path / "direct" / "p.parquet",
        keras_model_path,
        _IN_MEMORY,
        batch_size=500,
    )
    _assert_same_scoring(direct, local_scores)

    staging = tmp_path / "staging"
    portable = score_raw_beam(
        raw_with_bad_lines,
        tmp_path / "portable" / "p.parquet",
        keras_model_path,
        portable_options,
        staging=str(staging),
        batch_size=500,
    )
    _assert_same_scoring(portable, local_scores)
    assert list(staging.iterdir()) == []  # the run's staging folder is removed


def test_portable_runner_statistics_equal_direct_runner_statistics(
    ingested, portable_options, tmp_path
):
    """TFDV statistics of an ingested split (both tables, one pipeline) computed by external
    SDK workers through a staging folder equal the DirectRunner's."""
    from tasks.validate_stats import generate_statistics

    tables = {name: ingested / "test" / f"{name}.parquet" for name in ("impressions", "common")}
    direct = generate_statistics(
        tables, tmp_path / "direct", ValidateConfig(beam_options=_IN_MEMORY)
    )
    staging = tmp_path / "staging"
    portable = generate_statistics(
        tables,
        tmp_path / "portable",
        ValidateConfig(
            beam_runner="PortableRunner",
            beam_options=portable_options[1:],
            beam_staging=str(staging),
        ),
    )
    assert direct.keys() == portable.keys() == tables.keys()
    for name in tables:
        assert portable[name].datasets[0].num_examples > 0
        assert portable[name] == direct[name], name
    assert list(staging.iterdir()) == []
