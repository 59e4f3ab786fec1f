"""Multi-worker training (`train.distribute: multi_worker`): two real TensorFlow worker
processes on loopback, one killed mid-epoch and the job restarted, and the cluster taken
from the params (`esmm train --worker-index`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import pytest
from sklearn.metrics import roc_auc_score

from tasks.config import ConfigError, TrainConfig
from tasks.distribute import TF_CONFIG, configure_worker, tf_config
from tasks.inputs import SplitReader, predict_split

# One worker process: trains tests/tasks/conftest.py's MODEL/TRAIN (two epochs, no early
# stopping, a checkpoint every 2 steps) under MultiWorkerMirroredStrategy; worker 1 of the
# first attempt SIGKILLs itself at epoch 1, step 3 (after the checkpoint at step 2).
_WORKER = """
import json, os, signal, sys
from pathlib import Path
import keras
from tests.tasks.conftest import MODEL, TRAIN
from tasks.train import train_esmm

class Die(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if os.environ.get("KILL_AT") == f"{self.epoch},{batch}":
            os.kill(os.getpid(), signal.SIGKILL)

cfg = TRAIN.model_copy(update={
    "early_stopping": None, "distribute": "multi_worker", "checkpoint_every_steps": 2})
result = train_esmm(Path(sys.argv[1]), Path(sys.argv[2]), MODEL, cfg, verbose=0,
                    callbacks=[Die()])
print(json.dumps({"chief": result.chief, "epochs": result.epochs_run,
                  "resumed_from": result.resumed_from}))
"""

_WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_job(script: Path, ingest: Path, out: Path, tmp: Path, attempt: int, kill_at: str):
    """Both workers of one attempt; worker 1 runs under strace, which records the files it
    opens, renames and deletes."""
    workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
    procs = []
    for index in (0, 1):
        env = {
            **os.environ,
            TF_CONFIG: tf_config(workers, index),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "PYTHONPATH": str(Path.cwd()),
            "KILL_AT": kill_at if index == 1 else "",
        }
        cmd = [sys.executable, str(script), str(ingest), str(out)]
        if index == 1:
            trace = tmp / f"worker1-attempt{attempt}.strace"
            calls = "openat,open,creat,rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat"
            cmd = ["strace", "-f", "--seccomp-bpf", "-e", f"trace={calls}", "-o", str(trace), *cmd]
        log = open(tmp / f"worker{index}-attempt{attempt}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:  # nothing left running, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()


def _writes_under(trace: Path, folder: Path) -> list[str]:
    """The traced calls that create, change or delete a file under `folder`."""
    found = []
    for line in trace.read_text().splitlines():
        if str(folder) not in line or "= -1" in line:
            continue
        opening = "open" in line or "creat(" in line
        if not opening or any(flag in line for flag in _WRITE_FLAGS):
            found.append(line)
    return found


def _last_result(log: Path) -> dict:
    return json.loads(log.read_text().strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/usr/bin/strace").exists(), reason="strace records worker 1's files")
def test_two_workers_survive_a_killed_worker_and_match_one_worker(
    ingested, uninterrupted, tmp_path
):
    """Two workers on loopback: worker 1 is SIGKILLed mid-epoch, the chief then fails (its
    collective has no peer), and the job restarted with the same commands resumes from the
    chief's mid-epoch checkpoint and finishes. Worker 1 never creates, changes or deletes a
    file in the training folder; the model's test AUCs are those of one worker within noise."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    out = tmp_path / "train"

    first = _start_job(script, ingested, out, tmp_path, 1, kill_at="0,2")
    codes = _wait(first, timeout=300)
    assert codes[1] == -signal.SIGKILL, (tmp_path / "worker1-attempt1.log").read_text()[-2000:]
    assert codes[0] != 0  # the chief cannot go on without its peer
    state = json.loads((out / "checkpoints" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (0, 2)  # the checkpoint before the kill

    second = _start_job(script, ingested, out, tmp_path, 2, kill_at="")
    assert _wait(second, timeout=300) == [0, 0], (tmp_path / "worker0-attempt2.log").read_text()[
        -3000:
    ]
    chief, other = (_last_result(tmp_path / f"worker{i}-attempt2.log") for i in (0, 1))
    assert chief == {"chief": True, "epochs": 2, "resumed_from": [0, 2]}
    assert other == {"chief": False, "epochs": 2, "resumed_from": [0, 2]}
    history = json.loads((out / "history.json").read_text())
    assert history["replicas"] == 2 and len(history["loss"]) == 2

    for attempt in (1, 2):
        trace = tmp_path / f"worker1-attempt{attempt}.strace"
        assert trace.read_text()  # strace did record
        assert _writes_under(trace, out) == [], f"worker 1 wrote in {out} (attempt {attempt})"

    two = predict_split(keras.models.load_model(out / "model.keras"), ingested / "test")
    one = predict_split(keras.models.load_model(uninterrupted[1].model_path), ingested / "test")
    for key, label in (("p_ctr", two["click"]), ("p_ctcvr", two["click"] * two["conversion"])):
        auc_two, auc_one = roc_auc_score(label, two[key]), roc_auc_score(label, one[key])
        assert auc_two > 0.55, (key, auc_two)
        assert abs(auc_two - auc_one) < 0.05, (key, auc_two, auc_one)


def test_each_worker_gets_its_own_contexts(ingested):
    """Context shards of the train split: every impression in exactly one shard, every
    context's impressions in the same one, and the counts the steps are derived from."""
    whole = SplitReader(ingested / "train")
    keys = []
    for index in (0, 1):
        shard = SplitReader(ingested / "train")
        shard.shard_contexts(index, 2)
        tables = list(shard.tables(128, seed=1, epoch=0))
        ids = [k for t in tables for k in t["common_feature_index"].to_pylist()]
        keys.append(ids)
        assert sum(t.num_rows for t in tables) == sum(whole.shard_group_rows(2)[index])
    assert len(keys[0]) + len(keys[1]) == whole.num_rows
    assert not set(keys[0]) & set(keys[1])
    assert min(len(k) for k in keys) > 0.3 * whole.num_rows  # both shards hold real work


def test_the_cluster_comes_from_the_params_or_tf_config(monkeypatch):
    """`esmm train --worker-index N` sets TF_CONFIG from train.workers; a TF_CONFIG already
    set wins, and contradictions are clear errors."""
    monkeypatch.delenv(TF_CONFIG, raising=False)
    cfg = TrainConfig(distribute="multi_worker", workers=["10.0.0.1:2222", "10.0.0.2:2222"])
    configure_worker(cfg, 1)
    assert json.loads(os.environ[TF_CONFIG]) == {
        "cluster": {"worker": ["10.0.0.1:2222", "10.0.0.2:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    configure_worker(cfg, 1)  # the same worker again: consistent, kept
    with pytest.raises(ConfigError, match="contradicts TF_CONFIG"):
        configure_worker(cfg, 0)
    monkeypatch.delenv(TF_CONFIG)
    with pytest.raises(ConfigError, match="not an index of train.workers"):
        configure_worker(cfg, 2)
    with pytest.raises(ConfigError, match="needs train.distribute: multi_worker"):
        configure_worker(TrainConfig(), 0)
